package exec

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

// ServerOptions configures [Serve], the agent end of the protocol.
type ServerOptions struct {
	// Root is the box root: commands run chrooted into it and every path
	// of Stat, CopyIn, CopyOut and WriteFile is resolved inside it. "" or
	// "/" means the real root, without chroot.
	Root string
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// Version is reported by Hello.
	Version string
	// Reaper, when set, collects child exit statuses (the agent as PID 1).
	// nil waits for each child by pid.
	Reaper *Reaper
	// SetClock, when set, is called by Hello with the host's clock.
	SetClock func(time.Time) error
	// Setup, when set, is called by every Hello (after SetClock) before it
	// is answered, and must be idempotent. The agent makes the box ready
	// there: it seeds the RNG, sets the hostname and mounts the box root.
	// Until a Setup succeeded, Root is not opened and every request but
	// hello and ping fails: an agent waits here, touching no disk, so that
	// a snapshot of the VM at this point can become any box. Its error is
	// the host's Hello error.
	Setup func(ctx context.Context, s Setup) error
	// Configure, when set, applies the box configuration a host sends with
	// its Hello (validated already); its error, which should name the
	// volume or setting that failed, is the host's Hello error. It must be
	// idempotent: a host that re-attaches sends the same configuration
	// again. ctx ends when the host gives up on the request. nil fails
	// every non-empty configuration.
	Configure func(ctx context.Context, mounts []Mount, network *Network) error
	// Shutdown, when set, handles a Shutdown request: it stops every
	// process, syncs and unmounts. It returns before the request is
	// acknowledged. nil stops the processes this server started (SIGTERM,
	// then SIGKILL after ShutdownGrace).
	Shutdown func(ctx context.Context) error
	// Halt, when set, is called after Shutdown was acknowledged; it ends the
	// VM and need not return.
	Halt func()
	// ShutdownGrace is how long processes get between SIGTERM and SIGKILL
	// when Shutdown is nil. Default 2s.
	ShutdownGrace time.Duration
	// OutputGrace bounds how long output is still read after a command
	// exited while nothing more arrives: background processes that keep
	// stdout open must not hold the exit event back forever. Default 1s.
	OutputGrace time.Duration
	// Cgroup, when set, is a cgroup v2 directory with the pids controller
	// enabled for its children, on a kernel with CLONE_INTO_CGROUP
	// (5.7+). Each exec then runs in a cgroup of its own below it, entered
	// atomically at fork, so that whatever the command starts, even
	// outside its process group (setsid), stays confined: at most PidsMax
	// tasks, and with FairCPU a fair share of the CPU against the agent
	// and every other exec. A fork bomb left behind by one exec thus
	// cannot keep the next one from starting: the next exec kills it, and
	// whatever else finished execs left running while it holds the tasks
	// new execs need (killLeftovers). A timeout or cancel also
	// kills the whole cgroup (cgroup.kill, 5.14+), not only the process
	// group. A cgroup is removed once empty.
	Cgroup string
	// PidsMax is each exec's pids.max with Cgroup; 0 sets none.
	PidsMax int
	// FairCPU, with Cgroup, lets the server turn the cpu controller on
	// for Cgroup's children (and for Cgroup in its parent, whose
	// controllers it must offer) while execs compete for the CPU: another
	// exec runs, a finished one left processes running, or the exec has
	// run for longExec; and off again when an exec starts alone (see
	// cpuSwitch).
	FairCPU bool
}

type server struct {
	opts   ServerOptions
	log    *slog.Logger
	root   *fsroot.Root // nil until Setup succeeded (see ServerOptions.Setup)
	rootMu sync.Mutex   // serialises the Hellos that open root
	chroot string       // "" when Root is "/"
	spawn  spawner

	wg sync.WaitGroup // request handlers

	mu       sync.Mutex
	pgids    map[int]struct{} // process groups of running execs
	execs    int              // exec handlers that have not sent their Result
	stopping bool

	lingering []string // cgroups of finished execs whose processes still ran
	// killMu serialises killLeftovers: a second exec waits for what the
	// first killed to be gone, then sees the tasks it freed.
	killMu   sync.Mutex
	tasksMax int // the parent cgroup's pids.max, once read (0: not yet; -1: none)

	roots map[string]*subRoot // container roots set up for execs (roots.go)
}

// Serve answers requests from a [Client] on conn until the connection ends
// or ctx is cancelled, then closes conn. It discards input up to the
// host's first Sync frame, so garbage left on the line is harmless.
//
// Each host connection is a session, identified by the id in its Sync
// frames. When a Sync with a new id arrives (a virtio-serial port does not
// always show the agent that the host reconnected), the old session ends
// as if its connection had: its execs are killed and its copies aborted.
// When Serve returns, every exec it started has been killed and reaped. A
// clean end of the connection returns nil.
func Serve(ctx context.Context, conn io.ReadWriteCloser, opts ServerOptions) error {
	defer conn.Close()
	sv, err := newServer(opts)
	if err != nil {
		return err
	}
	defer func() {
		if sv.root != nil {
			sv.root.Close()
		}
	}()
	br := bufio.NewReaderSize(conn, 64<<10)
	w := &frameWriter{w: conn}
	stop := context.AfterFunc(ctx, func() { conn.Close() }) // unblocks the read
	defer stop()

	session, err := awaitSync(br, sv.log)
	for err == nil {
		sv.log.Debug("session", "id", session)
		m := newMux(br, w, sv.log, false)
		m.session = session
		m.onRequest = func(s *stream, p []byte) {
			sv.wg.Add(1)
			go func() {
				defer sv.wg.Done()
				sv.handle(s, p)
			}()
		}
		var next uint64
		next, err = m.read()
		if err == nil {
			err = errTakenOver
		}
		m.close(err)
		sv.wg.Wait()
		if next != 0 {
			sv.log.Info("new host connection, previous session ended")
			session, err = next, nil
		}
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

func newServer(opts ServerOptions) (*server, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rootPath := opts.Root
	if rootPath == "" {
		rootPath = "/"
	}
	sv := &server{
		opts:  opts,
		log:   log,
		pgids: make(map[int]struct{}),
		spawn: pidWaiter{},
	}
	if opts.Setup == nil {
		root, err := fsroot.Open(rootPath)
		if err != nil {
			return nil, err
		}
		sv.root = root
	}
	if rootPath != "/" {
		sv.chroot = rootPath
	}
	if opts.Reaper != nil {
		sv.spawn = opts.Reaper
	}
	if sv.opts.OutputGrace <= 0 {
		sv.opts.OutputGrace = time.Second
	}
	if sv.opts.ShutdownGrace <= 0 {
		sv.opts.ShutdownGrace = 2 * time.Second
	}
	return sv, nil
}

func (sv *server) handle(s *stream, p []byte) {
	var req request
	if err := json.Unmarshal(p, &req); err != nil {
		sv.finish(s, nil, errdefs.New(errdefs.ValidationError, "bad request: %v", err))
		return
	}
	sv.log.Debug("request", "channel", s.id, "op", req.Op)
	sv.mu.Lock()
	stopping := sv.stopping
	if !stopping && req.Op == "exec" {
		sv.execs++
		defer func() {
			sv.mu.Lock()
			sv.execs--
			sv.mu.Unlock()
		}()
	}
	sv.mu.Unlock()
	if stopping && req.Op != "ping" && req.Op != "hello" {
		sv.finish(s, nil, errdefs.New(errdefs.RuntimeError, "%s: agent is shutting down", req.Op))
		return
	}
	var res *result
	var err error
	if req.Op != "hello" && req.Op != "ping" && req.Op != "shutdown" && !sv.ready() {
		sv.finish(s, nil, errdefs.New(errdefs.RuntimeError, "%s: the box is not set up yet (no hello)", req.Op))
		return
	}
	switch req.Op {
	case "hello":
		res, err = sv.hello(s.ctx, &req)
	case "configure":
		err = sv.configure(s, &req)
	case "ping":
	case "exec":
		sv.exec(s, &req) // sends its own results
		return
	case "stat":
		res, err = sv.stat(&req)
	case "releaseroot":
		err = sv.releaseRoot(req.Path)
	case "usage":
		var u *Usage
		u, err = readUsage("/proc")
		res = &result{Usage: u}
	case "copyin":
		err = sv.copyIn(s, &req)
	case "copyout":
		err = sv.copyOut(s, &req)
	case "writefile":
		err = sv.writeFile(s, &req)
	case "shutdown":
		sv.shutdown(s)
		return
	default:
		err = errdefs.New(errdefs.ValidationError, "unknown operation %q", req.Op)
	}
	sv.finish(s, res, err)
}

// finish sends the Result that ends the channel.
func (sv *server) finish(s *stream, res *result, err error) {
	if res == nil {
		res = &result{}
	}
	if err != nil {
		// Cut to what the host keeps: its limit on a Result's size must
		// never cut off an honest agent (a long path or argv in a message).
		res.Error, res.Code = truncateString(errorMessage(err), maxResultString), string(errdefs.CodeOf(err))
		sv.log.Debug("request failed", "channel", s.id, "err", err)
	}
	if werr := s.m.writeJSON(s.id, frameResult, res); werr != nil {
		sv.log.Debug("sending result", "channel", s.id, "err", werr)
	}
	s.m.forget(s)
	s.cancel()
}

// errorMessage is err's text without the "[CODE]" prefix, which travels
// separately.
func errorMessage(err error) string {
	var e *errdefs.Error
	if errors.As(err, &e) && e.Message != "" {
		if e.Err != nil {
			return e.Message + ": " + e.Err.Error()
		}
		return e.Message
	}
	return err.Error()
}

func (sv *server) hello(ctx context.Context, req *request) (*result, error) {
	if err := validateSetup(req.Hostname, req.Entropy, req.Disks); err != nil {
		return nil, err
	}
	if sv.opts.SetClock != nil && req.Time != 0 {
		if err := sv.opts.SetClock(time.Unix(0, req.Time)); err != nil {
			sv.log.Warn("setting the clock", "err", err)
		}
	}
	if sv.opts.Setup != nil {
		sv.rootMu.Lock()
		defer sv.rootMu.Unlock()
		if err := sv.opts.Setup(ctx, Setup{Hostname: req.Hostname, Entropy: req.Entropy, Disks: req.Disks}); err != nil {
			return nil, err
		}
		if sv.root == nil {
			rootPath := sv.opts.Root
			if rootPath == "" {
				rootPath = "/"
			}
			root, err := fsroot.Open(rootPath)
			if err != nil {
				return nil, err
			}
			sv.mu.Lock()
			sv.root = root
			sv.mu.Unlock()
		}
	}
	return &result{Protocol: ProtocolVersion, Version: sv.opts.Version, Kernel: kernelRelease()}, nil
}

// ready reports whether the box root is open (Setup succeeded).
func (sv *server) ready() bool {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	return sv.root != nil
}

func (sv *server) configure(s *stream, req *request) error {
	if err := validateConfig(req.Mounts, req.Network); err != nil {
		return err
	}
	if len(req.Mounts) == 0 && req.Network == nil {
		return nil
	}
	if sv.opts.Configure == nil {
		return errdefs.New(errdefs.RuntimeError, "this agent cannot mount volumes or configure the network")
	}
	return sv.opts.Configure(s.ctx, req.Mounts, req.Network)
}

func (sv *server) stat(req *request) (*result, error) {
	fd, err := sv.root.OpenFile(req.Path, unix.O_PATH)
	if err == unix.ENOENT || err == unix.ENOTDIR {
		return &result{Stat: &FileInfo{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", req.Path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", req.Path, err)
	}
	mode := fileMode(st.Mode)
	return &result{Stat: &FileInfo{Exists: true, IsDir: mode.IsDir(), Mode: mode, Size: st.Size}}, nil
}

func (sv *server) copyIn(s *stream, req *request) error {
	r := &streamReader{s: s, ctx: s.ctx}
	if err := untar(r, sv.root, req.Dir, untarOptions{devices: true, owners: true, log: sv.log}); err != nil {
		return fmt.Errorf("copy to %s: %w", req.Dir, err)
	}
	// Read up to the host's EOF (tar padding may follow the end marker), so
	// the host's archive writer is not left blocked.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return fmt.Errorf("copy to %s: %w", req.Dir, err)
	}
	return nil
}

// writeFile streams the host's Data into a temporary file next to
// req.Path and renames it over req.Path once the host's EOF arrived and
// everything was written. On failure the temporary file is removed and
// req.Path is left alone.
func (sv *server) writeFile(s *stream, req *request) error {
	if !strings.HasPrefix(req.Path, "/") || fsroot.Clean(req.Path) == "/" {
		return errdefs.New(errdefs.ValidationError, "write %q: not an absolute path below /", req.Path)
	}
	p := fsroot.Clean(req.Path)
	mode := uint32(req.Mode.Perm())
	if req.Mode == 0 {
		mode = 0o644
	}
	if err := sv.root.MkdirAll(path.Dir(p), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", req.Path, err)
	}
	pfd, base, err := sv.root.Parent(p)
	if err != nil {
		return &os.PathError{Op: "write", Path: req.Path, Err: err}
	}
	defer unix.Close(pfd)
	// Fail before the data is sent when a directory is in the way; the
	// rename below fails anyway should one appear meanwhile.
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return &os.PathError{Op: "write", Path: req.Path, Err: unix.EISDIR}
	}
	tmp, f, err := createTemp(pfd, base)
	if err != nil {
		return fmt.Errorf("write %s: %w", req.Path, err)
	}
	err = func() error {
		defer f.Close()
		if _, err := io.Copy(f, &streamReader{s: s, ctx: s.ctx}); err != nil {
			return err
		}
		// Before the rename, so p never has a mode other than the asked one.
		if err := unix.Fchmod(int(f.Fd()), mode); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		return f.Close()
	}()
	if err == nil {
		err = unix.Renameat(pfd, tmp, pfd, base)
	}
	if err != nil {
		if uerr := unix.Unlinkat(pfd, tmp, 0); uerr != nil && uerr != unix.ENOENT {
			sv.log.Warn("removing temporary file", "path", path.Join(path.Dir(p), tmp), "err", uerr)
		}
		return fmt.Errorf("write %s: %w", req.Path, err)
	}
	return nil
}

// createTemp creates a new, empty file (0600) next to base in directory
// pfd, without following symlinks, and returns its name.
func createTemp(pfd int, base string) (string, *os.File, error) {
	prefix := base
	if len(prefix) > 100 {
		prefix = prefix[:100] // the name must stay below NAME_MAX
	}
	for i := 0; ; i++ {
		name := fmt.Sprintf(".%s.%016x.boxrun-tmp", prefix, rand.Uint64())
		fd, err := unix.Openat(pfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err == unix.EEXIST && i < 10 {
			continue
		}
		if err != nil {
			return "", nil, &os.PathError{Op: "create", Path: name, Err: err}
		}
		return name, os.NewFile(uintptr(fd), name), nil
	}
}

func (sv *server) copyOut(s *stream, req *request) error {
	p := fsroot.Clean(req.Path)
	pfd, base, err := sv.root.Parent(p)
	if err != nil {
		return fmt.Errorf("copy from %s: %w", req.Path, err)
	}
	defer unix.Close(pfd)
	name := base
	if base == "" {
		base, name = ".", "."
	}
	bw := bufio.NewWriterSize(&streamWriter{s: s, ctx: s.ctx, typ: frameData}, maxDataFrame)
	if err := writeTar(bw, pfd, base, name); err != nil {
		return fmt.Errorf("copy from %s: %w", req.Path, err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("copy from %s: %w", req.Path, err)
	}
	return nil
}

func (sv *server) shutdown(s *stream) {
	sv.mu.Lock()
	sv.stopping = true
	sv.mu.Unlock()
	sv.log.Info("shutdown requested")
	var err error
	if sv.opts.Shutdown != nil {
		err = sv.opts.Shutdown(s.ctx)
	} else {
		sv.stopProcesses()
	}
	// Let the exec handlers report the exits before the acknowledgement,
	// so the host has them before the VM goes away.
	for deadline := time.Now().Add(sv.opts.OutputGrace + time.Second); ; {
		sv.mu.Lock()
		n := sv.execs
		sv.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			sv.log.Warn("execs still running at shutdown", "count", n)
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	sv.finish(s, nil, err)
	if sv.opts.Halt != nil {
		sv.opts.Halt()
	}
}

// stopProcesses sends SIGTERM to the process groups of running execs, and
// SIGKILL to those still running after the grace period.
func (sv *server) stopProcesses() {
	signalAll := func(sig syscall.Signal) int {
		sv.mu.Lock()
		defer sv.mu.Unlock()
		for pg := range sv.pgids {
			_ = unix.Kill(-pg, sig)
		}
		return len(sv.pgids)
	}
	if signalAll(unix.SIGTERM) == 0 {
		return
	}
	deadline := time.Now().Add(sv.opts.ShutdownGrace)
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		sv.mu.Lock()
		n := len(sv.pgids)
		sv.mu.Unlock()
		if n == 0 {
			return
		}
	}
	signalAll(unix.SIGKILL)
}

// exec runs one command: Started, then Stdout/Stderr frames in the order
// they were read, then a Result with the exit status.
func (sv *server) exec(s *stream, req *request) {
	if len(req.Args) == 0 {
		sv.finish(s, nil, errdefs.New(errdefs.ValidationError, "start: empty command"))
		return
	}
	root, chroot := sv.root, sv.chroot
	if req.Root != "" {
		r, err := sv.subRoot(req.Root)
		if err != nil {
			sv.finish(s, nil, err)
			return
		}
		root, chroot = r.root, r.chroot
	}
	spec, err := resolveCommand(root, req)
	if err != nil {
		sv.finish(s, nil, err)
		return
	}
	spec.chroot = chroot
	if err := s.ctx.Err(); err != nil {
		sv.finish(s, nil, errdefs.Wrap(errdefs.Canceled, err, "start %q", req.Args[0]))
		return
	}
	cg, err := sv.newExecCgroup()
	if err != nil {
		sv.log.Warn("exec cgroup", "err", err) // run it without one
	}
	if cg != nil {
		sv.shareCPU()
	}
	pr, err := sv.startProcess(spec, req, cg)
	if err != nil {
		sv.release(cg)
		sv.finish(s, nil, err)
		return
	}
	pid := pr.pid
	sv.log.Debug("started", "channel", s.id, "pid", pid, "args", req.Args, "tty", pr.tty != nil)

	// Signals go to the whole process group (Setpgid or Setsid: pgid ==
	// pid), and to the terminal's foreground group.
	onSignal := func(name string) {
		if sig := unix.SignalNum(name); sig != 0 {
			pr.signal(sig)
		}
	}
	s.onSignal.Store(&onSignal)
	if pr.tty != nil {
		onResize := func(rows, cols uint16) { pr.resize(rows, cols) }
		s.onResize.Store(&onResize)
	}
	outputs := []struct {
		f   *os.File
		typ byte
	}{{pr.stdout, frameStdout}, {pr.stderr, frameStderr}}
	if pr.tty != nil {
		outputs = outputs[:1] // one output stream: the terminal
	}
	// The output's end (see pumpOutput): once the command has exited,
	// OutputGrace of silence (done). Once its timeout has passed (limit),
	// what is already in the pipes and no more: a process that left the
	// group and the cgroup, or a background process of a command that
	// exited, writing now and then, must not hold the exec open past its
	// timeout. Cancel stops the reading at once (canceled).
	var ends outputEnds
	interrupt := func() {
		for _, o := range outputs {
			o.f.SetReadDeadline(time.Now())
		}
	}
	var timedOut atomic.Bool
	// endMu orders the timeout against the command's own exit: one of
	// them sees the other, and the deadlines set are the last word.
	var endMu sync.Mutex
	var timer *time.Timer
	if req.TimeoutMS > 0 {
		timer = time.AfterFunc(time.Duration(req.TimeoutMS)*time.Millisecond, func() {
			endMu.Lock()
			defer endMu.Unlock()
			if !ends.done.Load() {
				// The command itself ran too long. (Once it has exited,
				// what it left running is its own business: only its
				// output stops being read, below.)
				timedOut.Store(true)
				pr.signal(unix.SIGKILL)
				cg.kill()
				return
			}
			ends.limit.Store(true)
			interrupt()
		})
	}
	// Cancel (or the end of the session) kills the group, until the
	// command's output is done: a callback on the context, not a goroutine
	// per exec waiting for either.
	stopCancelKill := context.AfterFunc(s.ctx, func() {
		pr.signal(unix.SIGKILL)
		cg.kill()
		// Nothing more goes to the host: stop reading now, whoever
		// still holds the output open (a process out of the group).
		ends.canceled.Store(true)
		interrupt()
	})

	// A command that runs for longExec is a long one: the host learns
	// that it started (if LateStart held that back), and, if it ran alone
	// without the cpu controller, the controller goes on, so that the
	// agent gets its share of the CPU back. One timer for both: each
	// costs system calls under TCG.
	started := &startedFrame{s: s, pr: pr}
	late := req.LateStart && pr.tty == nil && pr.stdin == nil
	if !late {
		started.send()
	}
	var longTimer *time.Timer
	if c := sv.cpu(); late || cg != nil && c != nil && !c.isOn() {
		longTimer = time.AfterFunc(longExec, func() {
			started.send()
			if cg != nil {
				c.set(true, sv)
			}
		})
	}
	switch {
	case pr.tty != nil:
		go feedTTY(s, pr.tty)
	case pr.stdin != nil:
		go feedStdin(s, pr.stdin)
	}
	var outMu sync.Mutex // one sequence across stdout and stderr
	var wg sync.WaitGroup
	for _, o := range outputs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sv.pumpOutput(s, o.f, o.typ, pr.tty != nil, &outMu, &ends, started)
		}()
	}

	ws := <-pr.wait
	if longTimer != nil {
		longTimer.Stop()
	}
	// Output still buffered in the pipes is read; past that, a background
	// process holding the pipe (or the terminal) open gets OutputGrace of
	// silence, and no more once the timeout has passed.
	endMu.Lock()
	ends.done.Store(true)
	deadline := time.Now().Add(sv.opts.OutputGrace)
	for _, o := range outputs {
		o.f.SetReadDeadline(deadline)
	}
	if timedOut.Load() { // killed by its timeout: what escaped it may still write
		ends.limit.Store(true)
		interrupt()
	}
	endMu.Unlock()
	wg.Wait()
	if timer != nil {
		timer.Stop()
	}
	stopCancelKill()
	// Closing the terminal's master hangs it up: what still runs on it
	// gets SIGHUP.
	for _, f := range []*os.File{pr.stdout, pr.stderr, pr.stdin} {
		if f != nil {
			f.Close()
		}
	}
	sv.mu.Lock()
	delete(sv.pgids, pid)
	sv.mu.Unlock()

	st := &ExitStatus{Code: ws.ExitStatus()}
	if ws.Signaled() {
		st.Code = -1
		st.Signal = unix.SignalName(ws.Signal())
		st.TimedOut = timedOut.Load() && ws.Signal() == unix.SIGKILL
	}
	sv.log.Debug("exited", "channel", s.id, "pid", pid, "code", st.Code, "signal", st.Signal)
	// Given back before the Result: the host's next exec, sent as soon as
	// this one ends, then finds the cgroup free to take again.
	sv.release(cg)
	started.finish(sv, &result{Exit: st})
}

// startedFrame sends an exec's Started frame once: at once, or, with
// Command.LateStart, before its first output, after longExec, or
// with its Result (finish), whichever comes first.
type startedFrame struct {
	s  *stream
	pr *process

	mu   sync.Mutex
	sent atomic.Bool // set once the frame is written: output may follow
}

// send writes the frame unless it was. It returns once the frame is
// written (by this call or another), so that the caller's output goes
// after it: the host drops output that comes before Started.
func (f *startedFrame) send() {
	if f.sent.Load() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sent.Load() {
		return
	}
	if err := f.s.m.writeJSON(f.s.id, frameStarted, &result{Pid: f.pr.pid}); err != nil {
		f.pr.signal(unix.SIGKILL)
	}
	f.sent.Store(true)
}

// finish sends the exec's Result, after its Started frame if that is
// still to go: both in one write.
func (f *startedFrame) finish(sv *server, res *result) {
	f.mu.Lock()
	if f.sent.Load() {
		f.mu.Unlock()
		sv.finish(f.s, res, nil)
		return
	}
	defer f.mu.Unlock()
	defer f.sent.Store(true)
	sp, err := json.Marshal(&result{Pid: f.pr.pid})
	if err == nil {
		var rp []byte
		if rp, err = json.Marshal(res); err == nil {
			err = f.s.m.writeFrames(f.s.id, frameStarted, sp, frameResult, rp)
		}
	}
	if err != nil {
		sv.log.Debug("sending result", "channel", f.s.id, "err", err)
	}
	f.s.m.forget(f.s)
	f.s.cancel()
}

type process struct {
	pid  int
	wait <-chan syscall.WaitStatus
	// Our ends: stdin nil when /dev/null. On a terminal, tty is its
	// master and stdout too; stdin and stderr are nil.
	stdin, stdout, stderr *os.File
	tty                   *os.File
}

func (sv *server) startProcess(spec *execSpec, req *request, cg *execCgroup) (_ *process, err error) {
	var parentEnds, childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
		if err != nil {
			for _, f := range parentEnds {
				f.Close()
			}
		}
	}()
	pr := &process{}
	var files [3]uintptr
	sys := &syscall.SysProcAttr{Chroot: spec.chroot, Credential: spec.cred}
	if ownCredential(spec.cred) {
		// Already ours: the child's setgroups, setgid and setuid would
		// change nothing, and cost 3% of a short exec under TCG.
		sys.Credential = nil
	}
	if req.TTY != nil {
		rows, cols := req.TTY.size()
		master, slave, err := sv.openPTY(rows, cols, int(spec.cred.Uid))
		if err != nil {
			return nil, startError(spec.argv[0], "%v", err)
		}
		childEnds, parentEnds = append(childEnds, slave), append(parentEnds, master)
		pr.tty, pr.stdout = master, master
		fd := slave.Fd()
		files = [3]uintptr{fd, fd, fd}
		// A session of its own, the terminal its controlling terminal
		// (Ctty is the child's descriptor 0). Its process group is pid.
		sys.Setsid, sys.Setctty, sys.Ctty = true, true, 0
	} else {
		var stdin *os.File
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, err
			}
			childEnds, parentEnds = append(childEnds, r), append(parentEnds, w)
			stdin, pr.stdin = r, w
		} else {
			// Opened per exec, bare: a descriptor shared by every exec
			// would share its locks (flock) across them too.
			fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return nil, err
			}
			f := os.NewFile(uintptr(fd), os.DevNull)
			childEnds = append(childEnds, f)
			stdin = f
		}
		files[0] = stdin.Fd() // Fd also makes the child's end blocking
		for i, dst := range []**os.File{&pr.stdout, &pr.stderr} {
			r, w, err := outputPipe()
			if err != nil {
				return nil, err
			}
			childEnds, parentEnds = append(childEnds, w), append(parentEnds, r)
			*dst = r
			files[i+1] = w.Fd()
		}
		sys.Setpgid = true
	}
	attr := &syscall.ProcAttr{
		Dir:   spec.dir,
		Env:   spec.env,
		Files: files[:],
		Sys:   sys,
	}
	if cg != nil {
		attr.Sys.UseCgroupFD, attr.Sys.CgroupFD = true, cg.fd
	}
	// Register the group before the child can be signalled by Shutdown.
	sv.mu.Lock()
	defer sv.mu.Unlock()
	pid, wait, err := sv.spawn.start(spec.path, spec.argv, attr)
	if errors.Is(err, syscall.EAGAIN) && cg != nil && len(sv.lingering) > 0 {
		// Once more after the leftovers gave up tasks, by this exec or by
		// another one meanwhile.
		sv.unlocked(func() { sv.killLeftovers(true) })
		if sv.stopping {
			return nil, startError(spec.argv[0], "the box is shutting down")
		}
		pid, wait, err = sv.spawn.start(spec.path, spec.argv, attr)
	}
	if err != nil {
		return nil, startError(spec.argv[0], "%v", err)
	}
	sv.pgids[pid] = struct{}{}
	pr.pid, pr.wait = pid, wait
	return pr, nil
}

// unlocked runs f with sv.mu, which the caller holds, released: it is
// held again when f returns or panics.
func (sv *server) unlocked(f func()) {
	sv.mu.Unlock()
	defer sv.mu.Lock()
	f()
}

// ownCredential reports whether cred is the agent's own: its uid, gid
// and supplementary groups (root's, without any, for the agent as PID 1).
func ownCredential(cred *syscall.Credential) bool {
	if cred == nil {
		return true
	}
	own := processCredential()
	return own != nil && cred.Uid == own.Uid && cred.Gid == own.Gid && !cred.NoSetGroups &&
		slices.Equal(cred.Groups, own.Groups)
}

// processCredential is the agent's credential, read once (it never
// changes them); nil if its groups cannot be read.
var processCredential = sync.OnceValue(func() *syscall.Credential {
	groups, err := unix.Getgroups()
	if err != nil {
		return nil
	}
	c := &syscall.Credential{Uid: uint32(unix.Getuid()), Gid: uint32(unix.Getgid()), Groups: []uint32{}}
	for _, g := range groups {
		c.Groups = append(c.Groups, uint32(g))
	}
	return c
})

// outputPipe is a pipe for one output stream: the agent's read end
// nonblocking and in the runtime's poller (for read deadlines), the
// command's write end blocking and outside it. os.Pipe would put both ends
// in the poller, and handing the write end to the child would make it
// blocking again and take it out: about five more system calls per pipe,
// each costly under TCG.
func outputPipe() (r, w *os.File, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, nil, err
	}
	// O_NONBLOCK belongs to each end's open file description: clearing it
	// on the write end leaves the read end nonblocking.
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETFL, 0); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, nil, err
	}
	// NewFile polls a descriptor that is nonblocking, and only that.
	return os.NewFile(uintptr(p[0]), "|0"), os.NewFile(uintptr(p[1]), "|1"), nil
}

// pumpBuffers are the output pumps' read buffers: two per exec would
// otherwise be allocated, zeroed and collected each time.
var pumpBuffers = sync.Pool{New: func() any { b := make([]byte, maxDataFrame); return &b }}

// outputEnds says when an exec's output pumps stop reading.
type outputEnds struct {
	done     atomic.Bool // the command exited: read until OutputGrace of silence
	limit    atomic.Bool // its timeout passed: read what the pipe holds now, no more
	canceled atomic.Bool // the host is gone or canceled: stop now
}

// pumpOutput sends what the process writes to f as frames of type typ,
// sent under outMu in the order they were read, until f's end (see
// outputEnds). Setting ends.limit or ends.canceled must be followed by a
// read deadline in the past on f, which wakes a read that waits.
func (sv *server) pumpOutput(s *stream, f *os.File, typ byte, tty bool, outMu *sync.Mutex, ends *outputEnds, started *startedFrame) {
	bp := pumpBuffers.Get().(*[]byte)
	defer pumpBuffers.Put(bp)
	buf := *bp
	var read int64
	var lim *readLimit // once ends.limit is set
	for {
		if ends.canceled.Load() {
			return
		}
		want := buf
		if lim == nil && ends.limit.Load() {
			// Reading what it counts cannot wait: no deadline.
			f.SetReadDeadline(time.Time{})
			lim = newReadLimit(f, read, tty)
		}
		if lim != nil {
			n, wait := lim.left(f, read)
			if n == 0 {
				return
			}
			want = buf[:min(int64(len(buf)), n)]
			if wait > 0 {
				f.SetReadDeadline(time.Now().Add(wait))
			}
		}
		n, err := f.Read(want)
		if n > 0 {
			read += int64(n)
			started.send() // before any output
			outMu.Lock()
			serr := s.send(s.ctx, typ, buf[:n])
			outMu.Unlock()
			if serr != nil {
				return // the host is gone or cancelled; the group is being killed
			}
			if ends.done.Load() && lim == nil {
				// Time spent waiting for credit does not count as silence.
				f.SetReadDeadline(time.Now().Add(sv.opts.OutputGrace))
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !ends.canceled.Load() && (lim != nil || ends.limit.Load()) {
				if lim != nil && lim.backlog {
					return // the terminal went quiet
				}
				// Woken to take the limit, or a wake-up (or the drain's
				// deadline) that came after the limit was taken: what
				// it covers is there to read.
				if lim != nil {
					f.SetReadDeadline(time.Time{})
				}
				continue
			}
			// A terminal's master reads EIO once no process has the
			// slave open: its end of file.
			if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, unix.EIO) {
				sv.log.Debug("reading output", "channel", s.id, "err", err)
			}
			return
		}
	}
}

// readLimit is what an output pump still reads once the exec's timeout
// has passed: what f held at that moment, written before (or about when)
// the timeout passed; what comes after is left unread. (A pump that
// waited for credit meanwhile takes at most a pipe's worth more: its
// writer blocks once the pipe is full.) A terminal's count is its line
// discipline's buffer alone (4 KiB at most), not what waits behind it in
// the terminal, which the kernel moves into that buffer as it empties,
// a moment later: past the count, a terminal's pump reads on (the
// backlog) for up to ttyBacklog more, while it comes within ttyWait.
type readLimit struct {
	limit   int64 // in bytes read since the start
	tty     bool
	backlog bool // a terminal's, past its count
}

const (
	ttyBacklog = 32 << 10
	ttyWait    = 100 * time.Millisecond
)

func newReadLimit(f *os.File, read int64, tty bool) *readLimit {
	return &readLimit{limit: read + pending(f), tty: tty}
}

// left is how much more to read, having read read bytes in all, and how
// long a read may wait for it (0: not at all: it is there).
func (l *readLimit) left(f *os.File, read int64) (int64, time.Duration) {
	if read >= l.limit && l.tty && !l.backlog {
		l.backlog, l.limit = true, read+ttyBacklog
	}
	if l.backlog {
		return max(0, l.limit-read), ttyWait
	}
	return max(0, l.limit-read), 0
}

// pending is how many bytes f (a pipe or a terminal's master) holds
// unread (FIONREAD, which Linux calls TIOCINQ); 0 if it cannot tell.
func pending(f *os.File) int64 {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	var n int
	rc.Control(func(fd uintptr) {
		if v, err := unix.IoctlGetInt(int(fd), unix.TIOCINQ); err == nil && v > 0 {
			n = v
		}
	})
	return int64(n)
}

// feedStdin copies Data frames to the process's stdin until the host's
// EOF. Once the process stops reading (EPIPE, or stdin closed when it
// exits), further input is discarded so the host never blocks on credit.
func feedStdin(s *stream, w *os.File) {
	broken := false
	for {
		f, err := s.recv(context.Background())
		if err != nil {
			w.Close()
			return
		}
		switch f.typ {
		case frameData:
			if !broken {
				if _, err := w.Write(f.payload); err != nil {
					broken = true
				}
			}
		case frameEOF:
			w.Close()
			return
		}
	}
}

// kernelRelease returns `uname -r`.
func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return strings.TrimSpace(unix.ByteSliceToString(u.Release[:]))
}
