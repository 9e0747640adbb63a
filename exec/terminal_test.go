package exec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// screen collects a terminal's output from a reader goroutine.
type screen struct {
	mu   sync.Mutex
	b    bytes.Buffer
	next int           // expect searches from here
	err  error         // the reader's final error
	done chan struct{} // closed when the reader stopped
}

func watch(r io.Reader) *screen {
	s := &screen{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			s.mu.Lock()
			s.b.Write(buf[:n])
			if err != nil {
				s.err = err
			}
			s.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return s
}

// expect waits until the output after the previous match contains want.
func (s *screen) expect(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.Lock()
		out := s.b.String()
		if i := strings.Index(out[s.next:], want); i >= 0 {
			s.next += i + len(want)
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the terminal's output after %d bytes:\n%q", want, s.next, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// end waits for the reader to stop and returns its error.
func (s *screen) end(t *testing.T) error {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Fatal("terminal output did not end")
	}
	return s.err
}

func startTerminal(t *testing.T, c *Client, cmd Command) *Terminal {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	term, err := c.StartTerminal(ctx, cmd)
	if err != nil {
		t.Fatalf("start %q: %v", cmd.Args, err)
	}
	t.Cleanup(func() { term.Close() })
	return term
}

func typeIn(t *testing.T, term *Terminal, s string) {
	t.Helper()
	if _, err := term.Write([]byte(s)); err != nil {
		t.Fatalf("typing %q: %v", s, err)
	}
}

// waitChild waits for a process named comm in the session sid.
func waitChild(t *testing.T, sid int, comm string) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
			if err != nil {
				continue
			}
			s := string(b)
			open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
			f := strings.Fields(s[end+1:]) // state ppid pgrp session
			if open < 0 || len(f) < 4 || s[open+1:end] != comm || f[0] == "Z" {
				continue
			}
			if sess, _ := strconv.Atoi(f[3]); sess == sid {
				return pid
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s in session %d", comm, sid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A shell on a terminal: the initial size, a resize (seen by stty and as
// SIGWINCH), echo of typed input, a real tty as stdin, and the exit code.
func TestTerminalShell(t *testing.T) {
	c := startServer(t, ServerOptions{})
	term := startTerminal(t, c, Command{
		Args: []string{"sh"},
		Env:  []string{"PS1=$ ", "TERM=xterm-256color"},
		TTY:  &TTY{Rows: 30, Cols: 100},
	})
	out := watch(term)
	// Typing before the prompt would put the prompt after the echo.
	out.expect(t, "$ ")
	typeIn(t, term, "stty size\r")
	out.expect(t, "stty size\r\n30 100\r\n$ ")
	typeIn(t, term, "echo hi\r")
	out.expect(t, "echo hi\r\nhi\r\n$ ") // the terminal's echo, then the output
	typeIn(t, term, `test -t 0 && test -t 1 && echo "tty:$(tty) term:$TERM"`+"\r")
	out.expect(t, "tty:/dev/pts/")
	out.expect(t, " term:xterm-256color\r\n$ ")

	// SIGWINCH reaches the shell's foreground job, which sees the new size.
	typeIn(t, term, `sh -c 'trap "stty size; exit 0" WINCH; echo waiting; while :; do sleep 0.05; done'`+"\r")
	out.expect(t, "waiting\r\n")
	if err := term.Resize(40, 120); err != nil {
		t.Fatal(err)
	}
	out.expect(t, "40 120\r\n$ ")
	typeIn(t, term, "stty size; exit\r")
	out.expect(t, "40 120\r\n")
	if err := out.end(t); err != io.EOF {
		t.Errorf("read: %v, want EOF", err)
	}
	if st := term.Wait(); st.Code != 0 || st.Signal != "" || st.Error != "" {
		t.Errorf("exit %+v", st)
	}
	if _, err := term.Write([]byte("x")); !errdefs.Is(err, errdefs.ExecAlreadyFinished) {
		t.Errorf("write after exit: %v", err)
	}

	// exit N is the code.
	term = startTerminal(t, c, Command{Args: []string{"sh"}, TTY: &TTY{}})
	out = watch(term)
	typeIn(t, term, "stty size; exit 7\r")
	out.expect(t, "24 80\r\n") // the default size
	if err := out.end(t); err != io.EOF {
		t.Errorf("read: %v, want EOF", err)
	}
	if st := term.Wait(); st.Code != 7 {
		t.Errorf("exit %+v, want 7", st)
	}
}

// Ctrl-C interrupts the foreground command, not the shell; a user's
// terminal is the user's.
func TestTerminalInterruptAndUser(t *testing.T) {
	c := startServer(t, ServerOptions{})
	term := startTerminal(t, c, Command{Args: []string{"sh"}, Env: []string{"PS1=$ "}, User: "nobody"})
	out := watch(term)
	typeIn(t, term, "sleep 100\r")
	sleep := waitChild(t, term.Pid(), "sleep")
	typeIn(t, term, "\x03")
	waitGone(t, sleep)
	typeIn(t, term, `echo "status $? uid $(id -u) owner $(stat -c %u $(tty))"`+"\r")
	out.expect(t, "status 130 uid 65534 owner 65534\r\n")
	typeIn(t, term, "exit\r")
	out.end(t)
	if st := term.Wait(); st.Code != 0 {
		t.Errorf("exit %+v", st)
	}
}

// Close hangs up a running session (SIGHUP), and kills one that ignores
// the hangup; a reader that stops reading holds a bounded amount.
func TestTerminalClose(t *testing.T) {
	defer func(g time.Duration) { HangupGrace = g }(HangupGrace)
	HangupGrace = 300 * time.Millisecond
	c := startServer(t, ServerOptions{})

	// An interactive shell running a command dies of the hangup.
	term := startTerminal(t, c, Command{Args: []string{"sh"}, Env: []string{"PS1=$ "}})
	out := watch(term)
	typeIn(t, term, "sleep 100\r")
	sleep := waitChild(t, term.Pid(), "sleep")
	start := time.Now()
	term.Close()
	if el := time.Since(start); el > HangupGrace+2*time.Second {
		t.Errorf("close took %v", el)
	}
	waitGone(t, term.Pid())
	waitGone(t, sleep)
	if st := term.Wait(); st.Signal != "SIGHUP" {
		t.Errorf("exit after hangup %+v", st)
	}
	if err := out.end(t); !errors.Is(err, os.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
	if _, err := term.Write([]byte("x")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
	if err := term.Resize(1, 1); !errors.Is(err, os.ErrClosed) {
		t.Errorf("resize after close: %v", err)
	}
	term.Close() // idempotent

	// One that ignores SIGHUP, with output nobody reads: the reader's
	// side holds a bounded amount while the command is blocked writing.
	term = startTerminal(t, c, Command{Args: []string{"sh", "-c", `trap '' HUP; while :; do echo yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy; done`}})
	time.Sleep(500 * time.Millisecond)
	term.mu.Lock()
	held := len(term.buf)
	term.mu.Unlock()
	if held == 0 || held > terminalBuffer+maxDataFrame {
		t.Errorf("terminal holds %d bytes of unread output (bound %d)", held, terminalBuffer+maxDataFrame)
	}
	n, err := term.Read(make([]byte, 100))
	if n == 0 || err != nil {
		t.Errorf("read: %d, %v", n, err)
	}
	term.Close()
	waitGone(t, term.Pid())
	if st := term.Wait(); st.Signal != "SIGKILL" {
		t.Errorf("exit after hangup and kill %+v", st)
	}
}

// A terminal's start errors are those of Start; plain processes have no
// terminal to type on.
func TestTerminalErrors(t *testing.T) {
	c := startServer(t, ServerOptions{})
	_, err := c.StartTerminal(context.Background(), Command{Args: []string{"no-such-shell"}})
	if !errdefs.Is(err, errdefs.RuntimeError) || !strings.Contains(err.Error(), "executable file not found") {
		t.Errorf("missing command: %v", err)
	}
	p, err := c.Start(context.Background(), Command{Args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Write([]byte("x")); !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("write without a terminal: %v", err)
	}
	if err := p.Resize(1, 1); !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("resize without a terminal: %v", err)
	}
	collect(t, p)
	// A canceled start leaves nothing running.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.StartTerminal(ctx, Command{Args: []string{"sh"}}); !errdefs.Is(err, errdefs.Canceled) {
		t.Errorf("canceled start: %v", err)
	}
	if r := run(t, c, Command{Args: []string{"echo", fmt.Sprint("still", " works")}}); r.stdout != "still works\n" {
		t.Errorf("after terminals: %q", r.stdout)
	}
}

// A terminal ends with the connection (the box going away), even when
// nobody reads its output.
func TestTerminalConnectionLoss(t *testing.T) {
	c := startServer(t, ServerOptions{})
	busy := startTerminal(t, c, Command{Args: []string{"sh", "-c", "while :; do echo yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy; done"}})
	idle := startTerminal(t, c, Command{Args: []string{"sleep", "1000"}})
	out := watch(idle)
	time.Sleep(200 * time.Millisecond) // the busy one fills its buffer
	c.Close()
	for _, term := range []*Terminal{busy, idle} {
		select {
		case <-term.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("terminal did not end with the connection")
		}
		if st := term.Wait(); st.Code != -1 || st.Error == "" {
			t.Errorf("exit after connection loss %+v", st)
		}
		waitGone(t, term.Pid()) // the server kills what its host left
	}
	if err := out.end(t); err != io.EOF {
		t.Errorf("read: %v, want EOF", err)
	}
	if _, err := busy.Write([]byte("x")); err == nil || errdefs.Is(err, errdefs.ExecAlreadyFinished) {
		t.Errorf("write after connection loss: %v", err)
	}
}
