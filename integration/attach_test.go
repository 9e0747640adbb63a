package integration

import (
	"bytes"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

// termOutput collects a session's output from a reader goroutine.
type termOutput struct {
	mu   sync.Mutex
	b    bytes.Buffer
	next int
	err  error
	done chan struct{}
}

func readTerm(r io.Reader) *termOutput {
	o := &termOutput{done: make(chan struct{})}
	go func() {
		defer close(o.done)
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			o.mu.Lock()
			o.b.Write(buf[:n])
			o.err = err
			o.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return o
}

// expect waits until the output after the previous match contains want.
func (o *termOutput) expect(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		o.mu.Lock()
		out := o.b.String()
		if i := strings.Index(out[o.next:], want); i >= 0 {
			o.next += i + len(want)
			o.mu.Unlock()
			return
		}
		o.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the session's output:\n%q", want, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (o *termOutput) end(t *testing.T) error {
	t.Helper()
	select {
	case <-o.done:
	case <-time.After(30 * time.Second):
		t.Fatal("session output did not end")
	}
	return o.err
}

// TestAttach runs interactive sessions in the shared (busybox) box: the
// default shell, terminal size and resize, TERM, a real terminal inside
// the box root, the exec cgroup, the exit code, Close hanging up a busy
// session, and the box still serving execs afterwards.
func TestAttach(t *testing.T) {
	box := sharedBox(t)
	ctx := ctxT(t, 2*time.Minute)

	sess, err := fx.eng.Attach(ctx, box.ID, boxrun.AttachSpec{Rows: 30, Cols: 100, Env: map[string]string{"PS1": "$ "}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	out := readTerm(sess)
	typeIn := func(s string) {
		t.Helper()
		if _, err := sess.Write([]byte(s)); err != nil {
			t.Fatalf("typing %q: %v", s, err)
		}
	}
	out.expect(t, "$ ")
	typeIn(`echo "shell:$0 term:$TERM size:$(stty size) box:$BOX_VAR"` + "\r")
	out.expect(t, "shell:/bin/sh term:xterm-256color size:30 100 box:from-box")
	out.expect(t, "$ ")
	if err := sess.Resize(40, 120); err != nil {
		t.Fatal(err)
	}
	typeIn(`test -t 0 && test -t 1 && echo "size:$(stty size) tty:$(tty) cg:$(cat /proc/self/cgroup)"` + "\r")
	out.expect(t, "size:40 120 tty:/dev/pts/")
	out.expect(t, "cg:0::/execs/exec-")
	out.expect(t, "$ ")
	typeIn("exit 7\r")
	if err := out.end(t); err != io.EOF {
		t.Errorf("read at the end: %v, want EOF", err)
	}
	if code, err := sess.Wait(); code != 7 || err != nil {
		t.Errorf("wait: %d, %v; want 7", code, err)
	}

	// An explicit command and TERM.
	sess2, err := fx.eng.Attach(ctx, box.ID, boxrun.AttachSpec{Cmd: []string{"sh", "-c", "echo term=$TERM; exit 3"}, Term: "vt100"})
	if err != nil {
		t.Fatal(err)
	}
	defer sess2.Close()
	out = readTerm(sess2)
	out.expect(t, "term=vt100\r\n")
	out.end(t)
	if code, err := sess2.Wait(); code != 3 || err != nil {
		t.Errorf("wait: %d, %v; want 3", code, err)
	}

	// Close ends a busy session: the shell and its foreground job go.
	sess3, err := fx.eng.Attach(ctx, box.ID, boxrun.AttachSpec{Env: map[string]string{"PS1": "$ "}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess3.Close()
	out = readTerm(sess3)
	out.expect(t, "$ ")
	if _, err := sess3.Write([]byte("echo start; sleep 1234\r")); err != nil {
		t.Fatal(err)
	}
	out.expect(t, "start\r\n")
	start := time.Now()
	sess3.Close()
	code, err := sess3.Wait()
	t.Logf("session closed in %v: exit %d, %v", time.Since(start).Round(time.Millisecond), code, err)
	if err != nil || (code != 129 && code != 137) {
		t.Errorf("wait after close: %d, %v; want 129 (SIGHUP) or 137", code, err)
	}
	if n, err := sess3.Read(make([]byte, 10)); n != 0 || err == nil {
		t.Errorf("read after close: %d, %v", n, err)
	}

	// The box still answers, and nothing of the session is left.
	res := sh(t, box, "ps -o args | grep -c '[s]leep 1234'; echo ok")
	if res.Stdout != "0\nok\n" {
		t.Errorf("after the sessions: %q (stderr %q)", res.Stdout, res.Stderr)
	}

	// Errors.
	for _, tc := range []struct {
		box  string
		spec boxrun.AttachSpec
		code boxrun.Code
	}{
		{"no-such-box", boxrun.AttachSpec{}, boxrun.BoxNotFound},
		{box.ID, boxrun.AttachSpec{Workdir: "relative"}, boxrun.ValidationError},
		{box.ID, boxrun.AttachSpec{Cmd: []string{"no-such-command"}}, boxrun.RuntimeError},
	} {
		if s, err := fx.eng.Attach(ctx, tc.box, tc.spec); boxrun.CodeOf(err) != tc.code {
			t.Errorf("attach %s %+v: %v, want %s", tc.box, tc.spec, err, tc.code)
			if s != nil {
				s.Close()
			}
		}
	}
}
