package exec

import (
	"context"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Terminal is a command running on a terminal in the box, as an
// io.ReadWriteCloser: Read is the terminal's output, Write types on it.
// Start one with [Client.StartTerminal].
type Terminal struct {
	p    *Process
	kill context.CancelFunc // makes Start's watcher send Cancel: SIGKILL

	mu     sync.Mutex
	buf    []byte // output not read yet, at most about terminalBuffer
	ended  bool   // the exit event arrived; status is set
	closed bool
	status *ExitStatus

	readable  chan struct{} // poked when buf grows or the process ends
	drained   chan struct{} // poked when Read takes from buf
	closing   chan struct{} // closed by Close
	done      chan struct{} // closed once status is set
	closeOnce sync.Once
}

// terminalBuffer bounds the output a Terminal holds for its reader; past
// it, output waits in the connection's window (256 KiB) and then in the
// guest, where the command blocks writing, as on a real terminal.
const terminalBuffer = 64 << 10

// HangupGrace is how long [Terminal.Close] gives the command to end after
// SIGHUP before it is killed.
var HangupGrace = time.Second

// StartTerminal starts cmd on a terminal of cmd.TTY's size (24×80 when
// cmd.TTY is nil; see [Command.TTY]). ctx bounds only the start: once it
// returned, the command runs until it ends or the Terminal is closed.
// Errors are those of [Client.Start].
func (c *Client) StartTerminal(ctx context.Context, cmd Command) (*Terminal, error) {
	if cmd.TTY == nil {
		cmd.TTY = &TTY{}
	}
	lctx, kill := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, kill)
	p, err := c.Start(lctx, cmd)
	if !stop() && err == nil {
		// ctx ended just as the command started: it is being killed.
		go p.Wait(nil, nil)
		return nil, ctxError(ctx.Err(), "start")
	}
	if err != nil {
		kill()
		return nil, err
	}
	t := &Terminal{
		p:        p,
		kill:     kill,
		readable: make(chan struct{}, 1),
		drained:  make(chan struct{}, 1),
		closing:  make(chan struct{}),
		done:     make(chan struct{}),
	}
	go t.pump()
	return t, nil
}

// pump moves the process's output into buf, waiting while buf is full and
// the connection is up (once it is gone, what can still arrive is bounded
// by the window, and nothing must wait for a reader that never comes).
func (t *Terminal) pump() {
	var st *ExitStatus
	for ev := range t.p.Events() {
		if ev.Exit != nil {
			st = ev.Exit
			continue
		}
		t.mu.Lock()
		for len(t.buf) >= terminalBuffer && !t.closed && t.p.c.Err() == nil {
			t.mu.Unlock()
			select {
			case <-t.drained:
			case <-t.closing:
			case <-t.p.c.Done():
			}
			t.mu.Lock()
		}
		if !t.closed {
			t.buf = append(t.buf, ev.Data...)
		}
		t.mu.Unlock()
		poke(t.readable)
	}
	if st == nil {
		st = &ExitStatus{Code: -1, Error: "no exit status"}
	}
	t.mu.Lock()
	t.status, t.ended = st, true
	t.mu.Unlock()
	t.kill() // releases the context; the process is gone
	close(t.done)
	poke(t.readable)
}

// Pid is the command's process id in the box.
func (t *Terminal) Pid() int { return t.p.Pid() }

// Signal sends sig to the command's process group.
func (t *Terminal) Signal(sig syscall.Signal) error { return t.p.Signal(sig) }

// Read reads the terminal's output. It returns io.EOF once the command
// ended and its output was read, and os.ErrClosed after Close.
func (t *Terminal) Read(b []byte) (int, error) {
	for {
		t.mu.Lock()
		switch {
		case t.closed:
			t.mu.Unlock()
			return 0, os.ErrClosed
		case len(t.buf) > 0:
			n := copy(b, t.buf)
			t.buf = t.buf[n:]
			if len(t.buf) == 0 {
				t.buf = nil
			}
			t.mu.Unlock()
			poke(t.drained)
			return n, nil
		case t.ended:
			t.mu.Unlock()
			return 0, io.EOF
		}
		t.mu.Unlock()
		select {
		case <-t.readable:
		case <-t.closing:
		}
	}
}

// Write types b on the terminal (see [Process.Write]): it blocks while
// the command does not take its input. After the command ended it fails
// with ExecAlreadyFinished, after Close with os.ErrClosed.
func (t *Terminal) Write(b []byte) (int, error) {
	if t.isClosed() {
		return 0, os.ErrClosed
	}
	n, err := t.p.Write(b)
	if err != nil && t.isClosed() {
		return 0, os.ErrClosed
	}
	return n, err
}

// Resize sets the terminal's size; the command gets SIGWINCH.
func (t *Terminal) Resize(rows, cols uint16) error {
	if t.isClosed() {
		return os.ErrClosed
	}
	return t.p.Resize(rows, cols)
}

// Wait waits for the command to end and returns how it ended. Its exit is
// known once all but the last 64 KiB (what a Terminal holds) of its
// output were read, or the Terminal closed; Read may still return that
// output after Wait returned.
func (t *Terminal) Wait() *ExitStatus {
	<-t.done
	st := *t.status
	return &st
}

// Done is closed when the command has ended and its status is known.
func (t *Terminal) Done() <-chan struct{} { return t.done }

func (t *Terminal) isClosed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.closed
}

// Close ends the session: unread and further output is discarded and, if
// the command still runs, the terminal is hung up: SIGHUP to the command's
// process group and the terminal's foreground group, then, after
// HangupGrace, SIGKILL to both groups and (in a VM) to everything the
// command started. Close returns once the command ended (the agent
// reported its exit) or, should the agent not answer, after a few seconds
// more. It is idempotent; Wait then reports how the command ended.
func (t *Terminal) Close() error {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		t.closed, t.buf = true, nil
		t.mu.Unlock()
		close(t.closing)
		select {
		case <-t.done:
			return
		default:
		}
		_ = t.p.Signal(unix.SIGHUP)
		grace := time.NewTimer(HangupGrace)
		defer grace.Stop()
		select {
		case <-t.done:
			return
		case <-grace.C:
		}
		t.kill()
		select {
		case <-t.done:
		case <-time.After(5 * time.Second):
			// The agent does not answer: give the channel up (its exit
			// event then says so).
			t.p.c.abandon(t.p.s)
			<-t.done
		}
	})
	return nil
}
