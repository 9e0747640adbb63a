package shim

import (
	"context"
	"errors"
	"io"
	"sync"
	"syscall"
	"time"

	boxrun "github.com/boxrun/boxrun"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/fifo"
	"golang.org/x/sys/unix"
)

// process is a container's init process (id "") or one of its execs: an
// engine exec (a Stream) or, with a terminal, an engine Session.
type process struct {
	id       string // exec id; "" for the init process
	spec     processSpec
	stdio    stdio
	terminal bool
	root     string // a pod's container's root in the box (ExecSpec.Root)

	mu         sync.Mutex
	status     task.Status
	starting   bool // start is under way: CREATED, not to be finished under it
	exiting    bool // exited has begun: it runs once
	pid        int
	execID     string          // the engine's exec (no terminal)
	session    *boxrun.Session // the terminal session
	stdinW     io.Closer       // our writer on the stdin FIFO: closed by CloseIO
	stdinDone  bool            // CloseIO came (perhaps before stdinW was opened)
	exitStatus uint32
	exitedAt   time.Time
	done       chan struct{} // closed once exited
	doneOnce   sync.Once
	cancel     context.CancelFunc
	// started is closed once Start published the process's start: its
	// exit is published after that, never before.
	started     chan struct{}
	startedOnce sync.Once
}

type stdio struct{ stdin, stdout, stderr string }

func newProcess(id string, spec processSpec, io stdio) *process {
	return &process{id: id, spec: spec, stdio: io, terminal: spec.terminal, status: task.Status_CREATED,
		done: make(chan struct{}), started: make(chan struct{})}
}

// runningNotExiting says whether the process runs and is not ending: an
// exec may join its container.
func (p *process) runningNotExiting() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status == task.Status_RUNNING && !p.exiting
}

// markStarted lets the process's exit be published.
func (p *process) markStarted() { p.startedOnce.Do(func() { close(p.started) }) }

// beginExit says whether the caller is the one to finish the process.
func (p *process) beginExit() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exiting || p.status == task.Status_STOPPED {
		return false
	}
	p.exiting = true
	return true
}

// errStopped is a process stopped (killed, deleted) while it started.
var errStopped = errors.New("process stopped while it was starting")

// start runs the process in box and calls exited with its exit status once
// it ended, after its output went to the FIFOs. exited must finish it.
func (p *process) start(eng *boxrun.Engine, box string, exited func(*process, uint32)) (err error) {
	p.mu.Lock()
	if p.status != task.Status_CREATED || p.starting || p.exiting {
		p.mu.Unlock()
		return errStopped
	}
	p.starting = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.starting = false
		p.mu.Unlock()
	}()
	ctx, cancel := context.WithCancel(context.Background())
	octx, ocancel := context.WithTimeout(ctx, 30*time.Second)
	defer ocancel()
	var stdout, stderr, stdinW io.WriteCloser
	var stdin io.ReadCloser
	closeAll := func() {
		for _, c := range []io.Closer{stdout, stderr, stdin, stdinW} {
			if c != nil {
				c.Close()
			}
		}
	}
	fail := func(err error) error {
		closeAll()
		cancel()
		return err
	}
	if p.stdio.stdout != "" {
		if stdout, err = fifo.OpenFifo(octx, p.stdio.stdout, syscall.O_WRONLY, 0); err != nil {
			return fail(err)
		}
	}
	if p.stdio.stderr != "" && !p.terminal {
		if stderr, err = fifo.OpenFifo(octx, p.stdio.stderr, syscall.O_WRONLY, 0); err != nil {
			return fail(err)
		}
	}
	if p.stdio.stdin != "" {
		// Opened when the other side opens it; read to its end or CloseIO.
		if stdin, err = fifo.OpenFifo(ctx, p.stdio.stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0); err != nil {
			return fail(err)
		}
		// A writer of our own keeps the FIFO open across the client's
		// detach and re-attach; CloseIO closes it, and the command sees
		// the end of its input once what was written is read.
		if stdinW, err = fifo.OpenFifo(ctx, p.stdio.stdin, syscall.O_WRONLY|syscall.O_NONBLOCK, 0); err != nil {
			return fail(err)
		}
		// Known to CloseIO from here on, and closed at once if CloseIO
		// came already: a client that has written all its input may send
		// CloseIO before the command has started, and one that found no
		// writer would leave the command waiting for more input forever.
		// Closing it twice (on failure, or by CloseIO) is harmless.
		p.mu.Lock()
		p.stdinW = stdinW
		done := p.stdinDone
		p.mu.Unlock()
		if done {
			stdinW.Close()
		}
	}
	if p.terminal {
		s, err := eng.Attach(ctx, box, boxrun.AttachSpec{Cmd: p.spec.args, Env: p.spec.env, Workdir: p.spec.cwd,
			User: p.spec.user, Rows: p.spec.rows, Cols: p.spec.cols, Root: p.root})
		if err != nil {
			return fail(err)
		}
		p.mu.Lock()
		if p.exiting {
			p.mu.Unlock()
			s.Close()
			return fail(errStopped)
		}
		p.session, p.pid, p.status, p.cancel = s, s.Pid(), task.Status_RUNNING, cancel
		p.mu.Unlock()
		if stdin != nil {
			go io.Copy(s, stdin)
		}
		go func() {
			// A client gone (EPIPE) must not stop the draining: the
			// session's end is known once its output is read.
			io.Copy(&discardOnError{w: stdout}, s)
			code, err := s.Wait()
			if err != nil {
				code = 137 // the box went away under it
			}
			closeAll()
			<-p.started
			exited(p, uint32(code))
		}()
		return nil
	}
	// Without a terminal, stdin goes through a pipe that CloseIO ends:
	// the command sees its end whether or not the FIFO's writer closes.
	var in io.Reader
	var pw *io.PipeWriter
	if stdin != nil {
		var pr *io.PipeReader
		pr, pw = io.Pipe()
		in = pr
		go func() {
			io.Copy(pw, stdin)
			pw.Close()
		}()
	}
	info, events, err := eng.StreamExec(ctx, box, boxrun.ExecSpec{Cmd: p.spec.args, Env: p.spec.env,
		Workdir: p.spec.cwd, User: p.spec.user, Stdin: in, Root: p.root})
	if err != nil {
		if pw != nil {
			pw.Close()
		}
		return fail(err)
	}
	p.mu.Lock()
	if p.exiting {
		p.mu.Unlock()
		cancel() // kills it; the events end
		for range events {
		}
		if pw != nil {
			pw.Close()
		}
		closeAll()
		return errStopped
	}
	p.execID, p.pid, p.status, p.cancel = info.ID, info.Pid, task.Status_RUNNING, cancel
	p.mu.Unlock()
	go func() {
		status := uint32(255)
		for ev := range events {
			switch {
			case ev.Type == "exit":
				status = exitStatus(ev)
			case ev.Stream == "stderr" && stderr != nil:
				io.WriteString(stderr, ev.Data)
			case ev.Stream == "stdout" && stdout != nil:
				io.WriteString(stdout, ev.Data)
			}
		}
		if pw != nil {
			pw.Close()
		}
		closeAll()
		<-p.started
		exited(p, status)
	}()
	return nil
}

// discardOnError writes to w until a write fails, then discards: output
// keeps being drained when nobody reads it any more.
type discardOnError struct {
	w      io.Writer
	failed bool
}

func (d *discardOnError) Write(b []byte) (int, error) {
	if d.w != nil && !d.failed {
		if _, err := d.w.Write(b); err != nil {
			d.failed = true
		}
	}
	return len(b), nil
}

// exitStatus is a shell's exit status for the end of an exec: 128+N when
// signal N killed it, 137 when it died with its box.
func exitStatus(ev boxrun.Event) uint32 {
	switch {
	case ev.Signal != "":
		if n := unix.SignalNum(ev.Signal); n != 0 {
			return 128 + uint32(n)
		}
		return 137
	case ev.Error != "":
		return 137
	case ev.ExitCode < 0:
		return 255
	}
	return uint32(ev.ExitCode)
}

func (p *process) finish(status uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.status == task.Status_STOPPED {
		return
	}
	p.status, p.exitStatus, p.exitedAt = task.Status_STOPPED, status, time.Now()
	if p.cancel != nil {
		p.cancel()
	}
	p.doneOnce.Do(func() { close(p.done) })
}

// signal sends sig to the running process (its process group in the box).
func (p *process) signal(eng *boxrun.Engine, sig syscall.Signal) error {
	p.mu.Lock()
	s, execID := p.session, p.execID
	p.mu.Unlock()
	if s != nil {
		return s.Signal(sig)
	}
	return eng.SignalExec(context.Background(), execID, sig)
}

// closeStdin ends the process's stdin (CloseIO): our writer on the FIFO
// closes, and the command reads to the end of what the client wrote.
func (p *process) closeStdin() {
	p.mu.Lock()
	w := p.stdinW
	p.stdinDone = true
	p.mu.Unlock()
	if w != nil {
		w.Close()
	}
}

func (p *process) state() (task.Status, int, uint32, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status, p.pid, p.exitStatus, p.exitedAt
}
