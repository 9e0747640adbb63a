package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/boxrun/boxrun/boxrund/client"
	"golang.org/x/term"
)

// terminal is the local end of an attach: the process's terminal (tty),
// or a fake in tests.
type terminal interface {
	// Input is what the user types; Output shows the box's terminal.
	Input() io.Reader
	Output() io.Writer
	// MakeRaw puts the terminal in raw mode (keys, Ctrl-C included, go to
	// the box as they are) and returns what restores it; it may be called
	// several times. A non-terminal is left as it is.
	MakeRaw() (restore func(), err error)
	// IsTerminal reports whether Input is a terminal (if not, its end
	// sends an end-of-file (Ctrl-D) to the box).
	IsTerminal() bool
	// Size is the window's size; ok is false when unknown.
	Size() (rows, cols int, ok bool)
	// Resized delivers a value on each window size change (SIGWINCH)
	// until stop is called.
	Resized() (c <-chan struct{}, stop func())
	// Interrupted delivers the signals that end a session from outside
	// (SIGINT when not raw, SIGTERM, SIGHUP) until stop is called.
	Interrupted() (c <-chan os.Signal, stop func())
}

// tty is the process's own terminal.
type tty struct {
	in, out *os.File
}

func newTTY(in, out *os.File) *tty { return &tty{in: in, out: out} }

func (t *tty) Input() io.Reader  { return t.in }
func (t *tty) Output() io.Writer { return t.out }

func (t *tty) IsTerminal() bool { return term.IsTerminal(int(t.in.Fd())) }

func (t *tty) MakeRaw() (func(), error) {
	fd := int(t.in.Fd())
	if !term.IsTerminal(fd) {
		return func() {}, nil
	}
	st, err := term.MakeRaw(fd)
	if err != nil {
		return func() {}, err
	}
	var once sync.Once
	return func() { once.Do(func() { term.Restore(fd, st) }) }, nil
}

func (t *tty) Size() (int, int, bool) {
	for _, f := range []*os.File{t.out, t.in} {
		if cols, rows, err := term.GetSize(int(f.Fd())); err == nil && rows > 0 && cols > 0 {
			return rows, cols, true
		}
	}
	return 0, 0, false
}

func (t *tty) Resized() (<-chan struct{}, func()) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGWINCH)
	c := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-sig:
				select {
				case c <- struct{}{}:
				default:
				}
			case <-done:
				return
			}
		}
	}()
	var once sync.Once
	return c, func() {
		once.Do(func() {
			signal.Stop(sig)
			close(done)
		})
	}
}

func (t *tty) Interrupted() (<-chan os.Signal, func()) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	return c, func() { signal.Stop(c) }
}

// session is what attach drives: client.Session, or a fake.
type session interface {
	io.ReadWriter
	Resize(rows, cols int) error
	Done() <-chan struct{}
	Wait() (int, error)
	Close() error
}

// runSession connects a terminal and a session until the session ends or
// a signal ends it, and returns the shell's exit code. The terminal is in
// raw mode meanwhile and is restored on every way out (end, error,
// signal, dropped connection, panic) before runSession returns.
func runSession(sess session, t terminal) (code int, err error) {
	restore, err := t.MakeRaw()
	if err != nil {
		sess.Close()
		return 1, fmt.Errorf("raw mode: %w", err)
	}
	defer restore()
	resized, stopResize := t.Resized()
	defer stopResize()
	sigs, stopSigs := t.Interrupted()
	defer stopSigs()

	outDone := make(chan struct{})
	go func() {
		defer close(outDone)
		io.Copy(t.Output(), sess)
	}()
	go func() {
		io.Copy(sess, t.Input())
		if !t.IsTerminal() {
			// Input from a pipe ended: an end-of-file for the shell.
			sess.Write([]byte{4})
		}
	}()
	if rows, cols, ok := t.Size(); ok {
		sess.Resize(rows, cols)
	}
	for {
		select {
		case <-resized:
			if rows, cols, ok := t.Size(); ok {
				sess.Resize(rows, cols)
			}
		case s := <-sigs:
			sess.Close()
			n := 1
			if sn, ok := s.(syscall.Signal); ok {
				n = 128 + int(sn)
			}
			return n, fmt.Errorf("session ended by %v", s)
		case <-sess.Done():
			// The output that came before the end is shown first.
			select {
			case <-outDone:
			case <-time.After(2 * time.Second):
			}
			return sess.Wait()
		}
	}
}

func (a *app) attach(ctx context.Context, c *client.Client, box, shell string) error {
	t := a.term()
	opts := client.AttachOptions{Shell: shell, Term: a.getenv("TERM")}
	if opts.Term == "" {
		opts.Term = "xterm-256color"
	}
	if rows, cols, ok := t.Size(); ok {
		opts.Rows, opts.Cols = rows, cols
	}
	sess, err := c.Attach(ctx, box, opts)
	if err != nil {
		return err
	}
	code, err := runSession(sess, t)
	if err != nil {
		if errors.Is(err, client.ErrConnectionLost) {
			return errors.New("connection to server lost")
		}
		return err
	}
	if code < 0 || code > 255 {
		code = 1
	}
	return exitCode(code)
}

func cmdAttach(a *app, ctx context.Context, args []string) error {
	var shell string
	f := newFlags(a, "attach")
	f.str(&shell, "shell", "", "PATH", "the program to run (default: the image's shell)")
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("attach needs a BOX")
	}
	a.box = pos[0]
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	return a.attach(ctx, c, pos[0], shell)
}

func cmdShell(a *app, ctx context.Context, args []string) error {
	var b boxFlags
	var shell string
	var keep bool
	f := newFlags(a, "shell")
	b.add(f, true)
	f.str(&shell, "shell", "", "PATH", "the program to run (default: the image's shell)")
	f.bool(&keep, "keep", "keep the box when the shell ends")
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return usagef("shell takes one IMAGE")
	}
	c, box, err := a.createFromArgs(ctx, pos, &b)
	if err != nil {
		return err
	}
	a.box = box.ID
	if keep {
		fmt.Fprintf(a.stderr, "Box %s (kept after the shell)\n", box.ID)
	}
	err = a.attach(ctx, c, box.ID, shell)
	if !keep {
		// Not ctx: it may be the interrupt that ended the shell.
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if rerr := c.RemoveBox(rctx, box.ID, true); rerr != nil {
			fmt.Fprintf(a.stderr, "Warning: box %s not removed: %v\n", box.ID, rerr)
		}
	}
	return err
}
