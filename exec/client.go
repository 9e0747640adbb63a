package exec

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path"
	"syscall"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"golang.org/x/sys/unix"
)

// Client is the host end of the connection to a box's agent. All methods
// are safe for concurrent use; operations run concurrently over the one
// connection.
//
// The agent is untrusted: everything it sends is bounded (frame sizes,
// per-channel credit, control frames per channel) and a violation closes
// the connection.
type Client struct {
	m   *mux
	log *slog.Logger

	// backstop is TimeoutBackstop (tests shorten it).
	backstop time.Duration
	// ignoredTimeouts leaves Command.Timeout out of the request: an
	// agent that ignores it, for tests of the backstop.
	ignoredTimeouts bool
}

// TimeoutBackstop is how long past a Command's Timeout the host waits for
// the agent to end the exec before it ends it itself: an exec with a
// timeout ends even if the box's agent does not do its part.
const TimeoutBackstop = 10 * time.Second

// NewClient wraps conn and starts the goroutine that reads it. The Client
// owns conn and closes it on [Client.Close] or when the connection fails.
func NewClient(conn io.ReadWriteCloser, logger *slog.Logger) *Client {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	m := newMux(bufio.NewReaderSize(conn, 64<<10), &frameWriter{w: conn}, logger, true)
	m.closer = conn
	// A random session id lets the agent tell us from an earlier host, and
	// random channel ids make a stray frame of that host's session land on
	// no channel of ours.
	m.session = rand.Uint64()
	m.nextID = rand.Uint32()
	go m.readLoop()
	return &Client{m: m, log: logger}
}

// Done is closed when the connection is gone.
func (c *Client) Done() <-chan struct{} { return c.m.done }

// Err returns why the connection is gone, or nil while it is up.
func (c *Client) Err() error {
	select {
	case <-c.m.done:
		return c.m.closedErr()
	default:
		return nil
	}
}

// Close closes the connection. Pending calls fail, and running processes
// get an exit event with Code -1 and Error set.
func (c *Client) Close() error {
	c.m.close(errLocalClose)
	return nil
}

func ctxError(err error, op string) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return errdefs.Wrap(errdefs.Timeout, err, "%s", op)
	}
	return errdefs.Wrap(errdefs.Canceled, err, "%s", op)
}

// decodeResult parses a Result and turns a reported failure into an error.
// The agent is not trusted to pick any code it likes.
func decodeResult(p []byte) (*result, error) {
	var res result
	if err := decodeAgentJSON(p, &res); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "bad result from agent")
	}
	res.Error = truncateString(res.Error, maxResultString)
	res.Code = truncateString(res.Code, 64)
	res.Version = truncateString(res.Version, 256)
	res.Kernel = truncateString(res.Kernel, 256)
	if e := res.Exit; e != nil {
		e.Signal = truncateString(e.Signal, 32)
		e.Error = truncateString(e.Error, maxResultString)
	}
	if res.Error == "" {
		return &res, nil
	}
	code := errdefs.Code(res.Code)
	switch code {
	case errdefs.ValidationError, errdefs.Timeout, errdefs.Canceled:
	default:
		code = errdefs.RuntimeError
	}
	return &res, errdefs.New(code, "%s", res.Error)
}

// decodeAgentJSON decodes a control payload from the agent into v, after
// checking its nesting depth: Go's decoder would accept up to 10000
// levels.
func decodeAgentJSON(p []byte, v any) error {
	if !jsonDepthOK(p, maxJSONDepth) {
		return fmt.Errorf("JSON nested more than %d levels deep", maxJSONDepth)
	}
	return json.Unmarshal(p, v)
}

// decodeStarted parses a Started frame: the pid of the process.
func decodeStarted(p []byte) (int, error) {
	var res result
	if err := decodeAgentJSON(p, &res); err != nil {
		return 0, err
	}
	if res.Pid <= 0 || res.Pid > 1<<22 { // PID_MAX_LIMIT
		return 0, fmt.Errorf("bad pid %d", res.Pid)
	}
	return res.Pid, nil
}

// request opens a channel and sends req on it.
func (c *Client) request(req *request) (*stream, error) {
	s, err := c.m.open()
	if err != nil {
		return nil, err
	}
	if err := c.m.writeJSON(s.id, frameRequest, req); err != nil {
		c.m.forget(s)
		return nil, err
	}
	return s, nil
}

// abandon tells the agent to stop the operation on s and forgets s.
func (c *Client) abandon(s *stream) {
	_ = c.m.write(s.id, frameCancel, nil)
	c.m.forget(s)
}

// await waits for the Result on s, ignoring anything else.
func (c *Client) await(ctx context.Context, s *stream, op string) (*result, error) {
	for {
		f, err := s.recv(ctx)
		if err != nil {
			if ctx.Err() != nil {
				c.abandon(s)
				return nil, ctxError(ctx.Err(), op)
			}
			return nil, err
		}
		if f.typ == frameResult {
			return decodeResult(f.payload)
		}
	}
}

func (c *Client) call(ctx context.Context, req *request) (*result, error) {
	if err := ctx.Err(); err != nil {
		return nil, ctxError(err, req.Op)
	}
	s, err := c.request(req)
	if err != nil {
		return nil, err
	}
	return c.await(ctx, s, req.Op)
}

// Hello performs the handshake, sets the guest clock to req.Time (plus the
// time Hello has been waiting) and applies the box configuration of req:
// it mounts req.Mounts and configures req.Network. Call it first on every
// new connection; its ctx bounds how long to wait for the agent to come up.
//
// Until the agent answers, Hello repeats Sync+Hello with a growing interval
// (50ms to 1s): a virtio-serial port drops what the host sends before the
// guest opened it. The configuration is then sent once, on the established
// connection, and applied idempotently: a host that re-attaches to a
// running box sends the same request again, and volumes already mounted
// and addresses already set are left as they are.
//
// A malformed req fails with a ValidationError before anything is sent.
// When the handshake succeeds but the configuration fails (say a mount tag
// the VM has no device for), Hello returns the HelloInfo together with the
// error, whose message names the volume or the network setting; the
// connection stays usable.
func (c *Client) Hello(ctx context.Context, req HelloRequest) (*HelloInfo, error) {
	if err := validateConfig(req.Mounts, req.Network); err != nil {
		return nil, err
	}
	if err := validateSetup(req.Hostname, req.Entropy, req.Disks); err != nil {
		return nil, err
	}
	info, err := c.handshake(ctx, &request{Op: "hello", Hostname: req.Hostname, Entropy: req.Entropy, Disks: req.Disks}, req.Time)
	if err != nil {
		return nil, err
	}
	if len(req.Mounts) == 0 && req.Network == nil {
		return info, nil
	}
	if _, err := c.call(ctx, &request{Op: "configure", Mounts: req.Mounts, Network: req.Network}); err != nil {
		return info, err
	}
	return info, nil
}

// agentReported is an error the agent answered with, as opposed to an
// agent that did not answer (a lost connection, a timeout).
type agentReported struct{ error }

func (e agentReported) Unwrap() error { return e.error }

// AgentAnswered reports whether err (from Hello) is one the agent itself
// answered with: the guest runs, and what failed is the box's setup.
func AgentAnswered(err error) bool {
	var a agentReported
	return errors.As(err, &a)
}

// Probe waits until the agent answers, without a Hello: the agent sets
// nothing up. It is how the host knows that a VM booted to the point
// where its agent waits for a Hello (a warm-start template).
func (c *Client) Probe(ctx context.Context) error {
	_, err := c.handshake(ctx, &request{Op: "ping"}, time.Time{})
	return err
}

// handshake repeats Sync+req (hello or ping) until the agent answers one
// of them.
func (c *Client) handshake(ctx context.Context, hello *request, now time.Time) (*HelloInfo, error) {
	start := time.Now()
	clock := func() int64 {
		if now.IsZero() {
			return 0 // the agent leaves its clock alone
		}
		return now.Add(time.Since(start)).UnixNano()
	}
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	type answer struct {
		res *result
		err error
	}
	answers := make(chan answer)
	var attempts []*stream
	defer func() {
		for _, s := range attempts {
			c.m.forget(s)
		}
	}()
	interval := 50 * time.Millisecond
	retry := time.NewTimer(0)
	defer retry.Stop()
	for {
		select {
		case <-retry.C:
			if err := c.m.writeSync(); err != nil {
				return nil, err
			}
			req := *hello
			if req.Op == "hello" {
				req.Time = clock()
			}
			s, err := c.request(&req)
			if err != nil {
				return nil, err
			}
			attempts = append(attempts, s)
			go func() {
				var a answer
				for {
					f, err := s.recv(actx)
					if err != nil {
						a.err = err
						break
					}
					if f.typ == frameResult {
						a.res, a.err = decodeResult(f.payload)
						break
					}
				}
				select {
				case answers <- a:
				case <-actx.Done():
				}
			}()
			retry.Reset(interval)
			interval = min(2*interval, time.Second)
		case a := <-answers:
			if a.err != nil {
				if ctx.Err() != nil {
					return nil, ctxError(ctx.Err(), "hello")
				}
				if a.res != nil { // the agent answered, with an error
					return nil, agentReported{a.err}
				}
				return nil, a.err
			}
			if hello.Op != "hello" {
				return nil, nil
			}
			if a.res.Protocol != ProtocolVersion {
				return nil, errdefs.New(errdefs.RuntimeError, "agent speaks protocol %d, host speaks %d (rebuild the agent)", a.res.Protocol, ProtocolVersion)
			}
			return &HelloInfo{Protocol: a.res.Protocol, Version: a.res.Version, Kernel: a.res.Kernel}, nil
		case <-ctx.Done():
			return nil, ctxError(ctx.Err(), "hello")
		}
	}
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.call(ctx, &request{Op: "ping"})
	return err
}

// Stat describes path in the box, following symlinks inside the box root.
// A missing path is Exists=false, not an error.
func (c *Client) Stat(ctx context.Context, p string) (FileInfo, error) {
	if !path.IsAbs(p) {
		return FileInfo{}, errdefs.New(errdefs.ValidationError, "stat %q: path is not absolute", p)
	}
	res, err := c.call(ctx, &request{Op: "stat", Path: p})
	if err != nil {
		return FileInfo{}, err
	}
	if res.Stat == nil {
		return FileInfo{}, nil
	}
	return *res.Stat, nil
}

// ReleaseRoot unmounts what the agent mounted in root for commands run
// in it ([Command.Root]): the container is gone.
func (c *Client) ReleaseRoot(ctx context.Context, root string) error {
	_, err := c.call(ctx, &request{Op: "releaseroot", Path: root})
	return err
}

// Usage reads what the box's processes use of its VM.
func (c *Client) Usage(ctx context.Context) (Usage, error) {
	res, err := c.call(ctx, &request{Op: "usage"})
	if err != nil {
		return Usage{}, err
	}
	if res.Usage == nil {
		return Usage{}, errdefs.New(errdefs.RuntimeError, "usage: the agent sent none")
	}
	return *res.Usage, nil
}

// Shutdown asks the agent to stop every process, sync, unmount the box
// filesystems and halt the VM. It returns once the agent acknowledged,
// after the filesystems are synced; the VM then goes away on its own.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.call(ctx, &request{Op: "shutdown"})
	return err
}

// CopyIn extracts the tar stream into destDir in the box, creating destDir
// and its parents. Paths are resolved inside the box root: neither the
// archive nor symlinks in the box can make the agent write outside it.
// It returns once the agent extracted everything; if it fails early, the
// rest of tarStream is left unread.
func (c *Client) CopyIn(ctx context.Context, destDir string, tarStream io.Reader) error {
	if !path.IsAbs(destDir) {
		return errdefs.New(errdefs.ValidationError, "copy to %q: path is not absolute", destDir)
	}
	return c.upload(ctx, &request{Op: "copyin", Dir: destDir}, "copy in", tarStream,
		func(err error) error {
			return errdefs.Wrap(errdefs.RuntimeError, err, "copy to %s: reading archive", destDir)
		})
}

// WriteFile streams r into the regular file p (an absolute path) in the
// box, creating p's missing parent directories (0755). Paths are resolved
// inside the box root, as for [Client.CopyIn]: neither p nor symlinks in
// the box can make the agent write outside it; a symlink at p itself is
// replaced, not followed.
//
// r may be of any length; it is streamed, never held in memory. The agent
// writes it to a temporary file next to p and renames that over p only
// once all of r has arrived and been written, so p changes atomically or
// not at all: if r fails, ctx ends, the disk fills up or p is a directory,
// the temporary file is removed and p is left as it was. When r fails,
// WriteFile returns after the agent has cleaned up. When ctx ends, the
// agent stops and cleans up on its own; WriteFile returns without waiting
// for it, but only once a Read of r in progress returns.
//
// The file gets mode's permission bits (0644 when mode is 0; setuid,
// setgid and sticky bits are dropped) and belongs to the agent's user
// (root in a box).
func (c *Client) WriteFile(ctx context.Context, p string, mode os.FileMode, r io.Reader) error {
	if !path.IsAbs(p) {
		return errdefs.New(errdefs.ValidationError, "write %q: path is not absolute", p)
	}
	if path.Clean(p) == "/" {
		return errdefs.New(errdefs.ValidationError, "write %q: path is the root directory", p)
	}
	if mode == 0 {
		mode = 0o644
	}
	return c.upload(ctx, &request{Op: "writefile", Path: p, Mode: mode.Perm()}, "write file", r,
		func(err error) error {
			return errdefs.Wrap(errdefs.RuntimeError, err, "write %s: reading data", p)
		})
}

// upload sends req, streams r as its Data up to an EOF frame and returns
// the agent's Result. op names the operation in context errors; readErr
// makes the error for a failure of r.
//
// When r fails, the agent is told to abandon the operation and its Result
// is awaited, so whatever it cleans up is gone when upload returns. When
// ctx ends, the agent is told at once, but a Read of r in progress is not
// interrupted: upload returns once it does. When the agent finishes early
// (it failed), the rest of r is left unread and its error is returned.
func (c *Client) upload(ctx context.Context, req *request, op string, r io.Reader, readErr func(error) error) error {
	if err := ctx.Err(); err != nil {
		return ctxError(err, op)
	}
	s, err := c.request(req)
	if err != nil {
		return err
	}
	// The agent stops at once when ctx ends, even while a Read of r blocks.
	stop := context.AfterFunc(ctx, func() { _ = c.m.write(s.id, frameCancel, nil) })
	defer stop()
	buf := make([]byte, maxDataFrame)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if err := s.send(ctx, frameData, buf[:n]); err != nil {
				break // cancelled, or the agent finished early: its Result says why
			}
		}
		if rerr == io.EOF {
			_ = c.m.write(s.id, frameEOF, nil)
			break
		}
		if rerr != nil {
			if err := ctx.Err(); err != nil {
				c.abandon(s)
				return ctxError(err, op)
			}
			_ = c.m.write(s.id, frameCancel, nil)
			_, _ = c.await(ctx, s, op) // the agent's "cancelled"
			return readErr(rerr)
		}
	}
	_, err = c.await(ctx, s, op)
	return err
}

// CopyOut writes a tar of path (a file or directory tree) in the box to w.
// Entry names are relative to path's parent, so the first entry is
// base(path); symlinks are archived, not followed. The archive comes from
// the untrusted guest: extract it with [Untar], which keeps it inside the
// destination.
func (c *Client) CopyOut(ctx context.Context, p string, w io.Writer) error {
	if !path.IsAbs(p) {
		return errdefs.New(errdefs.ValidationError, "copy from %q: path is not absolute", p)
	}
	if err := ctx.Err(); err != nil {
		return ctxError(err, "copy out")
	}
	s, err := c.request(&request{Op: "copyout", Path: p})
	if err != nil {
		return err
	}
	for {
		f, err := s.recv(ctx)
		if err != nil {
			if ctx.Err() != nil {
				c.abandon(s)
				return ctxError(ctx.Err(), "copy out")
			}
			return err
		}
		switch f.typ {
		case frameData:
			if _, err := w.Write(f.payload); err != nil {
				c.abandon(s)
				return errdefs.Wrap(errdefs.RuntimeError, err, "copy from %s: writing archive", p)
			}
		case frameResult:
			_, err := decodeResult(f.payload)
			return err
		}
	}
}

// Start starts cmd in the box. It returns once the agent has started the
// process, or an error (RuntimeError for a command that cannot start: not
// found, bad Dir, unknown User). Cancelling ctx afterwards SIGKILLs the
// process group; the exit event still arrives.
func (c *Client) Start(ctx context.Context, cmd Command) (*Process, error) {
	if len(cmd.Args) == 0 {
		return nil, errdefs.New(errdefs.ValidationError, "start: empty command")
	}
	if cmd.Dir != "" && !path.IsAbs(cmd.Dir) {
		return nil, errdefs.New(errdefs.ValidationError, "start %q: working directory %q is not absolute", cmd.Args[0], cmd.Dir)
	}
	if cmd.Root != "" && !path.IsAbs(cmd.Root) {
		return nil, errdefs.New(errdefs.ValidationError, "start %q: root %q is not absolute", cmd.Args[0], cmd.Root)
	}
	if err := ctx.Err(); err != nil {
		return nil, ctxError(err, "start")
	}
	req := &request{
		Op:    "exec",
		Args:  cmd.Args,
		Env:   cmd.Env,
		Dir:   cmd.Dir,
		User:  cmd.User,
		Stdin: cmd.Stdin != nil,
		TTY:   cmd.TTY,
		Root:  cmd.Root,
		// Without input the agent may hold Started back (LateStart).
		LateStart: cmd.LateStart && cmd.Stdin == nil && cmd.TTY == nil,
	}
	if cmd.Timeout > 0 && !c.ignoredTimeouts {
		req.TimeoutMS = max(1, int64((cmd.Timeout+time.Millisecond-1)/time.Millisecond))
	}
	s, err := c.request(req)
	if err != nil {
		return nil, err
	}
	pid := 0
	for pid == 0 {
		f, err := s.recv(ctx)
		if err != nil {
			if ctx.Err() != nil {
				c.abandon(s) // the agent kills the process if it got that far
				return nil, ctxError(ctx.Err(), "start")
			}
			return nil, err
		}
		switch f.typ {
		case frameStarted:
			if pid, err = decodeStarted(f.payload); err != nil {
				c.abandon(s)
				return nil, errdefs.Wrap(errdefs.RuntimeError, err, "start %q: bad answer from agent", cmd.Args[0])
			}
		case frameResult:
			if _, err := decodeResult(f.payload); err != nil {
				return nil, err
			}
			return nil, errdefs.New(errdefs.RuntimeError, "start %q: agent ended the exec without starting it", cmd.Args[0])
		}
	}
	p := &Process{
		c:      c,
		s:      s,
		pid:    pid,
		tty:    cmd.TTY != nil,
		events: make(chan Event),
	}
	if cmd.Timeout > 0 {
		p.timeout, p.backstop = cmd.Timeout, c.backstop
		if p.backstop == 0 {
			p.backstop = TimeoutBackstop
		}
	}
	go p.pump()
	if cmd.Stdin != nil {
		go p.feed(cmd.Stdin)
	}
	if ctx.Done() != nil {
		go func() {
			select {
			case <-ctx.Done():
				_ = c.m.write(s.id, frameCancel, nil)
			case <-s.gone:
			}
		}()
	}
	return p, nil
}

// Process is a command running in the box.
type Process struct {
	c        *Client
	s        *stream
	pid      int
	tty      bool
	events   chan Event
	timeout  time.Duration // Command.Timeout
	backstop time.Duration // past it, the host ends the exec (TimeoutBackstop)
}

// Pid is the process id in the box.
func (p *Process) Pid() int { return p.pid }

// Events delivers stdout and stderr chunks in the order the agent read
// them (one sequence across both streams), then exactly one exit event,
// then is closed. Output is flow controlled: a process whose events are
// not read blocks once about 256 KiB are pending, like a full pipe.
func (p *Process) Events() <-chan Event { return p.events }

// Signal sends sig to the process group in the box.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.s.gone:
		if err := p.c.Err(); err != nil {
			return err
		}
		return errdefs.New(errdefs.ExecAlreadyFinished, "process %d already exited", p.pid)
	default:
	}
	name := unix.SignalName(sig)
	if name == "" {
		return errdefs.New(errdefs.ValidationError, "unknown signal %d", int(sig))
	}
	return p.c.m.write(p.s.id, frameSignal, []byte(name))
}

// Write types b on the terminal of a process started with [Command.TTY].
// It is flow controlled like output: it blocks while the agent holds about
// 256 KiB of earlier input that the terminal did not take yet (a command
// that does not read its input fills the terminal's input queue). Once the
// process ended, Write fails with ExecAlreadyFinished. Concurrent Writes
// may interleave.
func (p *Process) Write(b []byte) (int, error) {
	if !p.tty {
		return 0, errdefs.New(errdefs.ValidationError, "write: process %d has no terminal (use Command.Stdin)", p.pid)
	}
	if err := p.s.send(p.s.ctx, frameData, b); err != nil {
		return 0, p.finished(err)
	}
	return len(b), nil
}

// Resize sets the size of the process's terminal ([Command.TTY]); the
// kernel sends SIGWINCH to the terminal's foreground process group.
func (p *Process) Resize(rows, cols uint16) error {
	if !p.tty {
		return errdefs.New(errdefs.ValidationError, "resize: process %d has no terminal", p.pid)
	}
	select {
	case <-p.s.gone:
		return p.finished(nil)
	default:
	}
	var b [4]byte
	binary.BigEndian.PutUint16(b[0:2], rows)
	binary.BigEndian.PutUint16(b[2:4], cols)
	return p.c.m.write(p.s.id, frameResize, b[:])
}

// finished is the error of an operation on a process whose channel is
// gone: the connection's error, else ExecAlreadyFinished.
func (p *Process) finished(err error) error {
	if cerr := p.c.Err(); cerr != nil {
		return cerr
	}
	if err == nil || errors.Is(err, errChannelDone) {
		return errdefs.New(errdefs.ExecAlreadyFinished, "process %d already exited", p.pid)
	}
	return err
}

// Wait drains the events, copying stdout and stderr to the writers (either
// may be nil), and returns the exit status. Write errors are ignored so the
// process is never left blocked.
func (p *Process) Wait(stdout, stderr io.Writer) *ExitStatus {
	var st *ExitStatus
	for ev := range p.events {
		switch {
		case ev.Exit != nil:
			st = ev.Exit
		case ev.Stream == "stdout" && stdout != nil:
			_, _ = stdout.Write(ev.Data)
		case ev.Stream == "stderr" && stderr != nil:
			_, _ = stderr.Write(ev.Data)
		}
	}
	if st == nil {
		// Events were consumed elsewhere; the status is still known.
		st = &ExitStatus{Code: -1, Error: "exit event consumed elsewhere"}
	}
	return st
}

func (p *Process) pump() {
	defer close(p.events)
	// The backstop (a Command with a Timeout) counts the time spent
	// waiting for the agent, not the time the owner takes to read the
	// events: a slow reader slows the command down, by design.
	wait := time.Duration(-1)
	if p.timeout > 0 {
		wait = p.timeout + p.backstop
	}
	for {
		ctx, cancel := context.Background(), context.CancelFunc(func() {})
		if wait >= 0 {
			ctx, cancel = context.WithTimeout(ctx, wait)
		}
		t0 := time.Now()
		f, err := p.s.recv(ctx)
		waited := ctx.Err() != nil
		cancel()
		if err != nil && !waited {
			p.finish(&ExitStatus{Code: -1, Error: connErrorMessage(err)})
			return
		}
		if wait >= 0 {
			if wait -= time.Since(t0); wait <= 0 || waited {
				p.backstopped(f, err)
				return
			}
		}
		if p.deliver(f) {
			return
		}
	}
}

// deliver hands one frame of the agent's to the owner; true once it was
// the Result (the exit event sent).
func (p *Process) deliver(f frame) bool {
	switch f.typ {
	case frameStdout:
		p.events <- Event{Stream: "stdout", Data: f.payload}
	case frameStderr:
		p.events <- Event{Stream: "stderr", Data: f.payload}
	case frameResult:
		res, err := decodeResult(f.payload)
		st := &ExitStatus{Code: -1}
		switch {
		case err != nil:
			st.Error = connErrorMessage(err)
		case res.Exit == nil:
			st.Error = "agent sent no exit status"
		default:
			st = res.Exit
		}
		p.finish(st)
		return true
	}
	return false
}

// backstopped ends an exec that the agent did not end within the
// backstop past its timeout: what the agent sent until now is delivered
// (f, err: the last receive; its Result may be among it), then, if no
// Result was, the agent is told to kill it (Cancel) and the exec ends
// here, timed out, whatever the agent does.
func (p *Process) backstopped(f frame, err error) {
	// What comes from now on is dropped and earns no credit: an agent
	// still streaming cannot make the queue endless.
	p.s.close(errors.New("ended by the host past its timeout"))
	now, cancel := context.WithCancel(context.Background())
	cancel() // recv returns what is queued, then an error
	for {
		if err == nil && p.deliver(f) {
			return
		}
		if f, err = p.s.recv(now); err != nil {
			break
		}
	}
	p.c.abandon(p.s)
	p.c.log.Warn("the agent did not end an exec past its timeout; ended by the host", "pid", p.pid, "timeout", p.timeout)
	p.finish(&ExitStatus{Code: -1, TimedOut: true,
		Error: fmt.Sprintf("timed out after %v; the box did not end the command", p.timeout)})
}

func (p *Process) finish(st *ExitStatus) { p.events <- Event{Exit: st} }

// feed streams stdin to the agent; its EOF (or read error) closes the
// process's stdin. Like os/exec, a Read blocked on r outlives the process.
func (p *Process) feed(r io.Reader) {
	buf := make([]byte, maxDataFrame)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if p.s.send(p.s.ctx, frameData, buf[:n]) != nil {
				return // exited or connection gone
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				p.c.log.Warn("reading stdin", "pid", p.pid, "err", err)
			}
			_ = p.c.m.write(p.s.id, frameEOF, nil)
			return
		}
	}
}

func (p *Process) String() string { return fmt.Sprintf("process %d", p.pid) }
