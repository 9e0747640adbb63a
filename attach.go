package boxrun

import (
	"context"
	"strings"
	"syscall"

	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
	"golang.org/x/sys/unix"
)

// defaultTerm is TERM of a session whose spec names none.
const defaultTerm = "xterm-256color"

// Session is a command running on a terminal in a box: an
// io.ReadWriteCloser (Read is the terminal's output, Write types on it)
// with Resize and Wait. Sessions are not recorded as execs; they end with
// their box.
//
// Output is flow controlled: a Session holds at most 64 KiB of output
// nobody read, and the connection to the box a further 256 KiB; past that
// the command blocks writing to its terminal, as it would on a terminal
// nobody reads.
type Session struct {
	t *agentexec.Terminal
}

// Attach starts an interactive session in a running box: spec's command
// (by default the image's shell, /bin/bash if the box has it, else
// /bin/sh) on a new terminal of spec's size, in a session of its own with
// the terminal as its controlling terminal, its stdin, stdout and stderr.
// ctx bounds only the start. The session runs until the command ends, the
// Session is closed, or the box stops.
//
// Errors: BOX_NOT_FOUND, BOX_NOT_RUNNING, VALIDATION_ERROR (a malformed
// spec), RUNTIME_ERROR (the command cannot start: not found, bad workdir,
// unknown user), CANCELED or TIMEOUT when ctx ends first.
func (e *Engine) Attach(ctx context.Context, box string, spec AttachSpec) (*Session, error) {
	if err := spec.validate(); err != nil {
		return nil, err
	}
	rec, lb, err := e.running(box)
	if err != nil {
		return nil, err
	}
	args := spec.Cmd
	if len(args) == 0 {
		args = []string{"/bin/sh"}
		if fi, err := lb.agent.Stat(ctx, "/bin/bash"); err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			e.log.Debug("attach: looking for /bin/bash", "box", rec.ID, "err", err)
		} else if fi.Exists && fi.Mode.IsRegular() && fi.Mode&0o111 != 0 {
			args = []string{"/bin/bash"}
		}
	}
	// TERM describes the caller's terminal, so it beats the image's and
	// the box's; spec.Term beats a TERM in spec.Env.
	env := make(map[string]string, len(spec.Env)+1)
	for k, v := range spec.Env {
		env[k] = v
	}
	switch {
	case spec.Term != "":
		env["TERM"] = spec.Term
	case env["TERM"] == "":
		env["TERM"] = defaultTerm
	}
	cmd := e.command(rec, lb, ExecSpec{Cmd: args, Env: env, Workdir: spec.Workdir, User: spec.User, Root: spec.Root})
	cmd.TTY = &agentexec.TTY{Rows: spec.Rows, Cols: spec.Cols}
	t, err := lb.agent.StartTerminal(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return &Session{t: t}, nil
}

func (s *AttachSpec) validate() error {
	bad := func(format string, args ...any) error {
		return errdefs.New(errdefs.ValidationError, format, args...)
	}
	if len(s.Cmd) > 0 && s.Cmd[0] == "" {
		return bad("cmd must not start with an empty string")
	}
	if s.Workdir != "" && !strings.HasPrefix(s.Workdir, "/") {
		return bad("workdir must be an absolute path (starting with /)")
	}
	if strings.ContainsAny(s.Term, "\x00\n") {
		return bad("term must be a terminal type such as xterm-256color")
	}
	for k := range s.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return bad("env: bad variable name %q", k)
		}
	}
	return nil
}

// Read reads the terminal's output. It returns io.EOF once the command
// ended and its output was read, os.ErrClosed after Close.
func (s *Session) Read(p []byte) (int, error) { return s.t.Read(p) }

// Write types p on the terminal (keys as a terminal sends them: "\r" for
// Enter, "\x03" for Ctrl-C). It blocks while the command does not take
// its input. After the command ended it fails (EXEC_ALREADY_FINISHED),
// after Close with os.ErrClosed.
func (s *Session) Write(p []byte) (int, error) { return s.t.Write(p) }

// Resize sets the terminal's size; the command gets SIGWINCH.
func (s *Session) Resize(rows, cols uint16) error {
	if rows == 0 || cols == 0 {
		return errdefs.New(errdefs.ValidationError, "terminal size %dx%d: rows and cols must be positive", rows, cols)
	}
	return s.t.Resize(rows, cols)
}

// Wait blocks until the command ends and returns its exit code: 128+N
// when signal N killed it, as a shell reports it (129 after Close hung up
// a shell, 137 when it had to be killed). The end is known once all but
// the last 64 KiB of output were read (or the Session closed): to forward
// all the output before the exit, Read to io.EOF, then Wait. A session
// whose box went away under it returns -1 and a RUNTIME_ERROR.
func (s *Session) Wait() (exitCode int, err error) {
	st := s.t.Wait()
	switch {
	case st.Signal != "":
		if n := unix.SignalNum(st.Signal); n != 0 {
			return 128 + int(n), nil
		}
		return -1, errdefs.New(errdefs.RuntimeError, "session killed by %s", st.Signal)
	case st.Error != "":
		return -1, errdefs.New(errdefs.RuntimeError, "session: %s", st.Error)
	}
	return st.Code, nil
}

// Pid is the command's process id in the box.
func (s *Session) Pid() int { return s.t.Pid() }

// Signal sends sig to the command's process group.
func (s *Session) Signal(sig syscall.Signal) error { return s.t.Signal(sig) }

// Close ends the session. If the command still runs, the terminal is hung
// up: SIGHUP to the command's process group and the terminal's foreground
// group, SIGKILL (to everything the command started) after a second. Close
// returns once the command ended; unread output is discarded. It is
// idempotent.
func (s *Session) Close() error { return s.t.Close() }
