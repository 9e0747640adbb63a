package exec

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"golang.org/x/sys/unix"
)

func TestExecOutputAndExitCodes(t *testing.T) {
	c := startServer(t, ServerOptions{})
	for _, code := range []int{0, 1, 42} {
		r := run(t, c, sh(fmt.Sprintf("echo out; echo err >&2; exit %d", code)))
		if r.stdout != "out\n" || r.stderr != "err\n" {
			t.Errorf("exit %d: stdout %q stderr %q", code, r.stdout, r.stderr)
		}
		if r.exit.Code != code || r.exit.Signal != "" || r.exit.TimedOut || r.exit.Error != "" {
			t.Errorf("exit %d: got %+v", code, r.exit)
		}
	}
	// No shell: argv goes to the program as is.
	r := run(t, c, Command{Args: []string{"echo", "a  b", "$HOME"}})
	if r.stdout != "a  b $HOME\n" {
		t.Errorf("argv: %q", r.stdout)
	}
}

func TestExecEnvDirUser(t *testing.T) {
	c := startServer(t, ServerOptions{})
	dir := t.TempDir()
	r := run(t, c, Command{
		Args: []string{"sh", "-c", `echo "$FOO|$(pwd)|$PATH|$HOME"`},
		Env:  []string{"FOO=bar baz"},
		Dir:  dir,
	})
	want := "bar baz|" + dir + "|" + defaultPath + "|/root\n"
	if r.stdout != want {
		t.Errorf("got %q, want %q", r.stdout, want)
	}
	r = run(t, c, Command{Args: []string{"sh", "-c", `echo "$PATH|$HOME"`}, Env: []string{"PATH=/bin:/usr/bin", "HOME=/h"}})
	if r.stdout != "/bin:/usr/bin|/h\n" {
		t.Errorf("explicit PATH/HOME: %q", r.stdout)
	}
	if r := run(t, c, Command{Args: []string{"pwd"}}); r.stdout != "/\n" {
		t.Errorf("default dir: %q", r.stdout)
	}

	for _, tc := range []struct{ user, want string }{
		{"", "0 0"},
		{"nobody", "65534 65534"},
		{"65534", "65534 65534"},
		{"65534:0", "65534 0"},
		{"nobody:nogroup", "65534 65534"},
		{"4242:4343", "4242 4343"}, // numeric ids need no passwd entry
	} {
		r := run(t, c, Command{Args: []string{"sh", "-c", "echo $(id -u) $(id -g)"}, User: tc.user})
		if trim(r.stdout) != tc.want || r.exit.Code != 0 {
			t.Errorf("user %q: got %q (%+v), want %q", tc.user, r.stdout, r.exit, tc.want)
		}
	}
	r = run(t, c, Command{Args: []string{"sh", "-c", "echo $HOME"}, User: "nobody"})
	if trim(r.stdout) != "/nonexistent" {
		t.Errorf("nobody's HOME: %q", r.stdout)
	}
}

func TestExecStartErrors(t *testing.T) {
	c := startServer(t, ServerOptions{})
	for _, tc := range []struct {
		cmd  Command
		want string
	}{
		{Command{Args: []string{"nope-not-here"}}, `start "nope-not-here": executable file not found in $PATH`},
		{Command{Args: []string{"/no/such/bin"}}, `start "/no/such/bin": no such file or directory`},
		{Command{Args: []string{"/etc/passwd"}}, `start "/etc/passwd": permission denied`},
		{Command{Args: []string{"ls"}, Dir: "/no/such/dir"}, `start "ls": chdir /no/such/dir: no such file or directory`},
		{Command{Args: []string{"ls"}, User: "no-such-user"}, `start "ls": user "no-such-user": unable to find user no-such-user`},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		p, err := c.Start(ctx, tc.cmd)
		cancel()
		if err == nil {
			t.Errorf("%q: started (pid %d)", tc.cmd.Args, p.Pid())
			continue
		}
		var e *errdefs.Error
		if !errors.As(err, &e) || e.Code != errdefs.RuntimeError || !strings.HasPrefix(e.Message, tc.want) {
			t.Errorf("%q: got %#v, want RuntimeError %q", tc.cmd.Args, err, tc.want)
		}
	}
	_, err := c.Start(context.Background(), Command{})
	if !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("empty command: %v", err)
	}
	// The connection still works.
	if r := run(t, c, Command{Args: []string{"true"}}); r.exit.Code != 0 {
		t.Errorf("true after errors: %+v", r.exit)
	}
}

func TestExecStreamOrder(t *testing.T) {
	c := startServer(t, ServerOptions{})
	// Two pipes: the order across them is the order the agent's readers
	// got the chunks, so leave the readers time between writes.
	r := run(t, c, sh(`for i in 1 2 3 4; do echo o$i; sleep 0.1; echo e$i >&2; sleep 0.1; done`))
	var got []string
	for _, ev := range r.events[:len(r.events)-1] {
		got = append(got, ev.Stream+":"+trim(string(ev.Data)))
	}
	var want []string
	for i := 1; i <= 4; i++ {
		want = append(want, fmt.Sprintf("stdout:o%d", i), fmt.Sprintf("stderr:e%d", i))
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("order:\n got %v\nwant %v", got, want)
	}
	if last := r.events[len(r.events)-1]; last.Exit == nil || last.Stream != "" || last.Data != nil {
		t.Errorf("last event %+v", last)
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && len(s) > i+2 && s[i+2] != 'Z'
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Errorf("process %d still alive", pid)
			unix.Kill(pid, unix.SIGKILL)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestExecTimeoutKillsGroup(t *testing.T) {
	c := startServer(t, ServerOptions{})
	start := time.Now()
	r := run(t, c, Command{Args: []string{"sh", "-c", "sleep 1000 & echo $!; sleep 1000"}, Timeout: 300 * time.Millisecond})
	elapsed := time.Since(start)
	if !r.exit.TimedOut || r.exit.Code != -1 || r.exit.Signal != "SIGKILL" {
		t.Errorf("exit %+v", r.exit)
	}
	if elapsed > 3*time.Second {
		t.Errorf("took %v for a 300ms timeout", elapsed)
	}
	bg, err := strconv.Atoi(trim(r.stdout))
	if err != nil {
		t.Fatalf("background pid %q", r.stdout)
	}
	waitGone(t, bg)
	t.Logf("timeout exit after %v", elapsed)
}

func TestExecCancelKills(t *testing.T) {
	c := startServer(t, ServerOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	p, err := c.Start(ctx, sh("sleep 1000 & echo $!; wait"))
	if err != nil {
		t.Fatal(err)
	}
	ev := <-p.Events()
	bg, _ := strconv.Atoi(trim(string(ev.Data)))
	cancel()
	r := collect(t, p)
	if r.exit.Code != -1 || r.exit.Signal != "SIGKILL" || r.exit.TimedOut {
		t.Errorf("exit %+v", r.exit)
	}
	waitGone(t, bg)
	waitGone(t, p.Pid())
}

func TestExecSignal(t *testing.T) {
	c := startServer(t, ServerOptions{})
	p, err := c.Start(context.Background(), Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r := collect(t, p)
	if r.exit.Code != -1 || r.exit.Signal != "SIGTERM" {
		t.Errorf("exit %+v", r.exit)
	}
	if err := p.Signal(syscall.SIGTERM); !errdefs.Is(err, errdefs.ExecAlreadyFinished) {
		t.Errorf("signal after exit: %v", err)
	}
}

func TestExecBackgroundHoldsOutput(t *testing.T) {
	c := startServer(t, ServerOptions{OutputGrace: 200 * time.Millisecond})
	start := time.Now()
	r := run(t, c, sh("sleep 1000 & echo $!"))
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("exit held back %v by a background process", el)
	}
	bg, _ := strconv.Atoi(trim(r.stdout))
	if r.exit.Code != 0 || bg == 0 {
		t.Errorf("got %q %+v", r.stdout, r.exit)
	}
	if bg > 0 {
		unix.Kill(bg, unix.SIGKILL)
	}
}

func TestExecStdin(t *testing.T) {
	c := startServer(t, ServerOptions{})
	data := make([]byte, 3<<20+17)
	rand.Read(data)
	r := run(t, c, Command{Args: []string{"sha256sum"}, Stdin: bytes.NewReader(data)})
	want := fmt.Sprintf("%x  -\n", sha256.Sum256(data))
	if r.stdout != want {
		t.Errorf("sha256sum of stdin: %q, want %q", r.stdout, want)
	}
	// cat echoes; nil Stdin is /dev/null.
	r = run(t, c, Command{Args: []string{"cat"}, Stdin: strings.NewReader("hello\n")})
	if r.stdout != "hello\n" {
		t.Errorf("cat: %q", r.stdout)
	}
	if r := run(t, c, Command{Args: []string{"cat"}}); r.stdout != "" || r.exit.Code != 0 {
		t.Errorf("cat </dev/null: %q %+v", r.stdout, r.exit)
	}
	// A process that does not read stdin exits; the host is not blocked.
	r = run(t, c, Command{Args: []string{"true"}, Stdin: bytes.NewReader(data)})
	if r.exit.Code != 0 {
		t.Errorf("true with stdin: %+v", r.exit)
	}
}

// A consumer that does not read one process's events must not hold up the
// others: flow control stalls only that process.
func TestExecSlowConsumerIsolated(t *testing.T) {
	c := startServer(t, ServerOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p, err := c.Start(ctx, Command{Args: []string{"head", "-c", "100000000", "/dev/zero"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Events() // read one chunk, then leave it blocked
	time.Sleep(100 * time.Millisecond)
	for i := 0; i < 5; i++ {
		start := time.Now()
		if r := run(t, c, Command{Args: []string{"echo", "hi"}}); r.stdout != "hi\n" {
			t.Fatalf("echo: %q", r.stdout)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("echo took %v next to a stalled process", el)
		}
	}
	// Now drain it: all 100 MB arrive.
	total := 0
	var exit *ExitStatus
	for ev := range p.Events() {
		total += len(ev.Data)
		if ev.Exit != nil {
			exit = ev.Exit
		}
	}
	if exit == nil || exit.Code != 0 || total < 100000000-maxDataFrame {
		t.Errorf("drained %d bytes, exit %+v", total, exit)
	}
}

func TestConcurrentExecsAndCopy(t *testing.T) {
	c := startServer(t, ServerOptions{})
	src := t.TempDir()
	data := make([]byte, 20<<20)
	rand.Read(data)
	if err := os.WriteFile(src+"/big", data, 0o644); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := copyIn(c, src+"/big", dst); err != nil {
			errs <- err
		}
	}()
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := run(t, c, sh(fmt.Sprintf("for j in 1 2 3; do echo %d-$j; sleep 0.01; done; exit %d", i, i)))
			if r.stdout != fmt.Sprintf("%d-1\n%d-2\n%d-3\n", i, i, i) || r.exit.Code != i {
				errs <- fmt.Errorf("exec %d: %q %+v", i, r.stdout, r.exit)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got, err := os.ReadFile(dst + "/big")
	if err != nil || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Errorf("copied file differs (%v)", err)
	}
}

func TestStat(t *testing.T) {
	c := startServer(t, ServerOptions{})
	dir := t.TempDir()
	os.WriteFile(dir+"/f", []byte("12345"), 0o640)
	os.Symlink("f", dir+"/l")
	ctx := context.Background()
	dfi, _ := os.Stat(dir)
	for _, tc := range []struct {
		path string
		want FileInfo
	}{
		{dir + "/f", FileInfo{Exists: true, Mode: 0o640, Size: 5}},
		{dir + "/l", FileInfo{Exists: true, Mode: 0o640, Size: 5}},
		{dir, FileInfo{Exists: true, IsDir: true, Mode: dfi.Mode()}},
		{dir + "/missing", FileInfo{}},
		{dir + "/f/under-a-file", FileInfo{}},
	} {
		fi, err := c.Stat(ctx, tc.path)
		if err != nil {
			t.Errorf("stat %s: %v", tc.path, err)
			continue
		}
		if tc.want.IsDir {
			fi.Size = 0
		}
		if fi != tc.want {
			t.Errorf("stat %s: got %+v, want %+v", tc.path, fi, tc.want)
		}
	}
}

func TestPing(t *testing.T) {
	c := startServer(t, ServerOptions{})
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestShutdown(t *testing.T) {
	halted := make(chan struct{})
	c := startServer(t, ServerOptions{ShutdownGrace: 200 * time.Millisecond, Halt: func() { close(halted) }})
	ignoring, err := c.Start(context.Background(), sh(`trap "" TERM; echo ready; sleep 1000 & wait`))
	if err != nil {
		t.Fatal(err)
	}
	<-ignoring.Events() // the trap is set
	polite, err := c.Start(context.Background(), Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := collect(t, polite); r.exit.Signal != "SIGTERM" {
		t.Errorf("polite process: %+v", r.exit)
	}
	if r := collect(t, ignoring); r.exit.Signal != "SIGKILL" {
		t.Errorf("process ignoring SIGTERM: %+v", r.exit)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("shutdown took %v", el)
	}
	select {
	case <-halted:
	case <-time.After(5 * time.Second):
		t.Fatal("Halt not called")
	}
	if _, err := c.Start(context.Background(), Command{Args: []string{"true"}}); err == nil || !strings.Contains(err.Error(), "shutting down") {
		t.Errorf("start after shutdown: %v", err)
	}
}

// An exec as the agent's own user and groups skips the credential switch;
// any difference keeps it.
func TestOwnCredential(t *testing.T) {
	groups, err := unix.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	own := &syscall.Credential{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid())}
	for _, g := range groups {
		own.Groups = append(own.Groups, uint32(g))
	}
	if !ownCredential(own) || !ownCredential(nil) {
		t.Fatalf("the agent's own credential %+v is not recognised", own)
	}
	for name, c := range map[string]*syscall.Credential{
		"uid":          {Uid: own.Uid + 1, Gid: own.Gid, Groups: own.Groups},
		"gid":          {Uid: own.Uid, Gid: own.Gid + 1, Groups: own.Groups},
		"a group more": {Uid: own.Uid, Gid: own.Gid, Groups: append(append([]uint32{}, own.Groups...), 4242)},
		"NoSetGroups":  {Uid: own.Uid, Gid: own.Gid, Groups: own.Groups, NoSetGroups: true},
	} {
		if ownCredential(c) {
			t.Errorf("%s differs, but the credential %+v counts as the agent's own", name, c)
		}
	}
}

// With LateStart the agent holds Started back until the command's first
// output or its exit (or longExec): no output is lost to it, the pid
// is the command's, a silent command's Start returns while it still runs,
// and a command that cannot start fails Start as without it.
func TestExecLateStart(t *testing.T) {
	c := startServer(t, ServerOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	late := func(args ...string) Command { return Command{Args: args, LateStart: true} }

	// Output on both streams at once: whichever pump sends Started, the
	// other's output must wait for it to be written (many times: the
	// race is narrow).
	for i := range 100 {
		p, err := c.Start(ctx, late("sh", "-c", "echo $$ & echo err >&2; wait; exit 3"))
		if err != nil {
			t.Fatal(err)
		}
		r := collect(t, p)
		if trim(r.stdout) != strconv.Itoa(p.Pid()) || r.stderr != "err\n" || r.exit.Code != 3 {
			t.Fatalf("output first, run %d: pid %d, %q %q %+v", i, p.Pid(), r.stdout, r.stderr, r.exit)
		}
	}
	for _, cmd := range []Command{late("true"), late("sh", "-c", "exit 7")} {
		p, err := c.Start(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		r := collect(t, p)
		if want := map[string]int{"true": 0, "sh": 7}[cmd.Args[0]]; p.Pid() <= 0 || r.exit.Code != want || len(r.events) != 1 {
			t.Errorf("%q, silent: pid %d, events %+v, want only an exit %d", cmd.Args, p.Pid(), r.events, want)
		}
	}

	p, err := c.Start(ctx, late("sleep", "5"))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-p.Events():
		t.Fatalf("first event %+v right after Start: Start waited for the exit", ev)
	default:
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if r := collect(t, p); r.exit.Signal != "SIGKILL" {
		t.Errorf("sleep killed: %+v", r.exit)
	}

	in := late("cat")
	in.Stdin = strings.NewReader("typed\n")
	if r := run(t, c, in); r.stdout != "typed\n" || r.exit.Code != 0 {
		t.Errorf("with stdin: %q %+v", r.stdout, r.exit)
	}
	if _, err := c.Start(ctx, late("no-such-command")); errdefs.CodeOf(err) != errdefs.RuntimeError {
		t.Errorf("a command that is not found: %v, want a RUNTIME_ERROR from Start", err)
	}
}

// A command that exits at once but leaves a process writing to its
// output now and then, in its group or out of it (setsid), must not hold
// the exec open past its timeout: the agent reads what the pipe holds
// when the timeout passes, and no more. The command ended in time: its
// exit status is its own, and what it left running is not killed (that
// writer dies of SIGPIPE). Before, each write extended the wait.
func TestExecTimeoutCutsWhatItLeftWriting(t *testing.T) {
	c := startServer(t, ServerOptions{OutputGrace: 300 * time.Millisecond})
	const loop = `for i in $(seq 300); do echo x; sleep 0.1; done`
	for name, script := range map[string]string{
		"background": "(" + loop + ") & exit 3",
		"setsid":     "setsid sh -c '" + loop + "' & exit 3",
	} {
		start := time.Now()
		cmd := sh(script)
		cmd.Timeout = time.Second
		r := run(t, c, cmd)
		el := time.Since(start)
		t.Logf("%s: ended after %v: %+v, %d bytes", name, el.Round(time.Millisecond), r.exit, len(r.stdout))
		if el > 5*time.Second || r.exit.TimedOut || r.exit.Code != 3 {
			t.Errorf("%s: a 1s timeout ended after %v, exit %+v; want the command's own exit 3", name, el, r.exit)
		}
		if !strings.Contains(r.stdout, "x") {
			t.Errorf("%s: the output before the timeout is missing: %q", name, r.stdout)
		}
	}
	// Killed by its timeout, with a process out of its group writing on.
	start := time.Now()
	cmd := sh("setsid sh -c '" + loop + "' & sleep 30")
	cmd.Timeout = time.Second
	r := run(t, c, cmd)
	if el := time.Since(start); el > 5*time.Second || !r.exit.TimedOut || r.exit.Signal != "SIGKILL" {
		t.Errorf("killed at its timeout: ended after %v, exit %+v", el, r.exit)
	}
}

// What ends within its timeout is reported as it ended, with all its
// output, however the timeout falls: a daemon it left holding the output
// silently is neither killed nor makes it "timed out", and output that
// waited for a slow reader past the timeout is all delivered.
func TestExecTimeoutSparesWhatEndedInTime(t *testing.T) {
	c := startServer(t, ServerOptions{}) // OutputGrace 1s: longer than the time left
	cmd := sh("sleep 5 & echo $!; sleep 0.6; echo done")
	cmd.Timeout = time.Second
	r := run(t, c, cmd)
	lines := strings.Fields(r.stdout)
	if r.exit.Code != 0 || r.exit.TimedOut || len(lines) != 2 || lines[1] != "done" {
		t.Errorf("exit %+v, output %q", r.exit, r.stdout)
	}
	if len(lines) > 0 {
		pid, _ := strconv.Atoi(lines[0])
		if pid <= 0 || unix.Kill(pid, 0) != nil {
			t.Errorf("the daemon it left (%q) was killed", lines[0])
		} else {
			unix.Kill(pid, unix.SIGKILL)
		}
	}

	// 300 kB, more than the credit window and a pipe hold: the rest waits
	// in the pipe while the reader sleeps past the timeout.
	r = readLate(t, c, "head -c 300000 /dev/zero | tr '\\0' x", time.Second, 3*time.Second)
	if len(r.stdout) != 300000 || r.exit.Code != 0 || r.exit.TimedOut {
		t.Errorf("a slow reader got %d of 300000 bytes, exit %+v", len(r.stdout), r.exit)
	}
}

// Should the agent not end an exec with a timeout (here: one that
// ignores the timeout), the host ends it itself, a backstop past the
// timeout, timed out, and tells the agent to kill it. Time its owner
// takes to read the events does not count.
func TestExecTimeoutHostBackstop(t *testing.T) {
	c := startServer(t, ServerOptions{})
	c.backstop = time.Second
	c.ignoredTimeouts = true
	cmd := sh("echo started; sleep 30")
	cmd.Timeout = time.Second
	start := time.Now()
	r := run(t, c, cmd)
	el := time.Since(start)
	t.Logf("ended after %v: %+v", el.Round(time.Millisecond), r.exit)
	if el > 6*time.Second || !r.exit.TimedOut || r.exit.Code != -1 || !strings.Contains(r.exit.Error, "did not end") || trim(r.stdout) != "started" {
		t.Errorf("ended after %v with %+v, output %q; want the host's end at about 2s", el, r.exit, r.stdout)
	}
	// A slow reader of a command that ends in time gets all of it and its
	// own end, though it reads long past timeout and backstop.
	r = readLate(t, c, "head -c 150000 /dev/zero | tr '\\0' y; exit 4", time.Second, 3*time.Second)
	if len(r.stdout) != 150000 || r.exit.Code != 4 || r.exit.TimedOut {
		t.Errorf("a slow reader got %d of 150000 bytes, exit %+v", len(r.stdout), r.exit)
	}
	// The connection still serves.
	if r := run(t, c, sh("echo ok")); trim(r.stdout) != "ok" {
		t.Errorf("after the backstop: %q %+v", r.stdout, r.exit)
	}
}

// readLate runs script with timeout and starts reading its events only
// after pause.
func readLate(t *testing.T, c *Client, script string, timeout, pause time.Duration) runResult {
	t.Helper()
	cmd := sh(script)
	cmd.Timeout = timeout
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := c.Start(ctx, cmd)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(pause)
	return collect(t, p)
}

// What a pump reads once the timeout has passed: what its pipe or
// terminal held then, all of it (a terminal's pending count is only its
// line discipline's buffer, 4 KiB at most, less than what waits behind
// it), and, from a writer that goes on, a bounded amount more.
func TestReadLimitCoversWhatWasWritten(t *testing.T) {
	for _, kind := range []string{"pipe", "terminal"} {
		var r, w *os.File
		var err error
		if kind == "pipe" {
			r, w, err = os.Pipe()
		} else {
			r, w, err = openPTY()
		}
		if err != nil {
			t.Fatal(kind, err)
		}
		const written = 18000
		go func() {
			w.Write(bytes.Repeat([]byte("z"), written))
			// then a writer that goes on
			for i := 0; i < 1000; i++ {
				if _, err := w.Write(bytes.Repeat([]byte("y"), 1024)); err != nil {
					return
				}
			}
		}()
		time.Sleep(300 * time.Millisecond) // the writer has filled what it can
		lim := newReadLimit(r, 0, kind == "terminal")
		var got []byte
		buf := make([]byte, 4096)
		for {
			n, wait := lim.left(r, int64(len(got)))
			if n == 0 {
				break
			}
			if wait > 0 {
				r.SetReadDeadline(time.Now().Add(wait))
			}
			m, err := r.Read(buf[:min(int64(len(buf)), n)])
			got = append(got, buf[:m]...)
			if errors.Is(err, os.ErrDeadlineExceeded) && wait > 0 {
				break
			}
			if err != nil {
				t.Fatal(kind, err)
			}
		}
		r.Close()
		w.Close()
		z := bytes.Count(got, []byte("z"))
		t.Logf("%s: read %d bytes, %d of the %d written first", kind, len(got), z, written)
		if z != written || len(got) > written+ttyBacklog+64<<10 {
			t.Errorf("%s: read %d bytes, %d of the %d written before the limit was taken", kind, len(got), z, written)
		}
	}
}

// openPTY opens a terminal pair: its master (as the agent reads it) and
// its slave (as a command writes it).
func openPTY() (master, slave *os.File, err error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		return nil, nil, err
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	// Raw, as the agent's terminals are: bytes as written.
	if tio, err := unix.IoctlGetTermios(int(s.Fd()), unix.TCGETS); err == nil {
		tio.Oflag &^= unix.OPOST
		unix.IoctlSetTermios(int(s.Fd()), unix.TCSETS, tio)
	}
	return m, s, nil
}
