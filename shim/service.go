// Package shim is containerd's runtime v2 shim for boxrun
// (io.containerd.boxrun.v2, binary containerd-shim-boxrun-v2): each
// container containerd asks for runs in a box of its own, on its own VM,
// driven by an Engine that the shim process embeds.
//
// The mapping, one line each:
//
//	container     a box booted on the container's rootfs (BoxSpec.Rootfs):
//	              one base disk per image, shared by its containers
//	init process  an exec in the box (an engine Session with a terminal);
//	              its end ends the box, as a container's init ends its
//	              PID namespace
//	exec process  another exec in the same box
//	Kill          a signal to the process's process group in the box
//	Stats         the guest's CPU and memory figures, as cgroup v2 metrics
//
// Pause, Resume, Checkpoint and Update answer "not implemented".
//
// Every shim process has an Engine on a DataDir of its own
// (<root>/tasks/<namespace>/<id>) and shares <root> (Config.SharedDir)
// with the others: base disks, kernel, agent and warm-start templates.
package shim

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	boxrun "github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/errdefs"
	"github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/api/types/task"
	cerrdefs "github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/protobuf"
	ptypes "github.com/containerd/containerd/protobuf/types"
	"github.com/containerd/containerd/runtime"
	"github.com/containerd/containerd/runtime/v2/shim"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
)

// RuntimeName is the runtime's name in containerd.
const RuntimeName = "io.containerd.boxrun.v2"

// Options configure the shim; Load reads them from the environment that
// containerd passes on.
type Options struct {
	// Root holds every shim's engine data dir (tasks/<ns>/<id>) and what
	// they share. $BOXRUN_SHIM_ROOT; default /var/lib/boxrun-shim.
	Root string
	// Defaults is the shape of a box whose config.json has no limits:
	// $BOXRUN_SHIM_CPUS, $BOXRUN_SHIM_MEMORY_MB, $BOXRUN_SHIM_DISK_GB.
	Defaults Defaults
	// Engine is the rest of the engine's config (hypervisor, kernel, ...);
	// its DataDir and SharedDir are set by the shim.
	Engine boxrun.Config
}

// Load reads Options from the environment.
func Load() Options {
	o := Options{Root: os.Getenv("BOXRUN_SHIM_ROOT")}
	if o.Root == "" {
		o.Root = "/var/lib/boxrun-shim"
	}
	num := func(k string) int {
		n, _ := strconv.Atoi(os.Getenv(k))
		return n
	}
	o.Defaults = Defaults{CPU: num("BOXRUN_SHIM_CPUS"), MemoryMB: num("BOXRUN_SHIM_MEMORY_MB"), DiskSizeGB: num("BOXRUN_SHIM_DISK_GB")}
	o.Engine.Hypervisor = os.Getenv("BOXRUN_HYPERVISOR")
	return o
}

// Service is the shim's task service.
type Service struct {
	ctx       context.Context // carries the namespace
	id        string
	ns        string
	opts      Options
	publisher shim.Publisher
	shutdown  func()
	log       *slog.Logger

	mu         sync.Mutex
	eng        *boxrun.Engine
	containers map[string]*container
	creating   map[string]*creating // Creates booting their box, unlocked
}

// creating is a Create in progress: Delete and Shutdown cancel it (a
// client that gave up) and wait for it to undo what it made.
type creating struct {
	cancel context.CancelFunc
	done   chan struct{}
}

type container struct {
	eng        *boxrun.Engine
	id, bundle string
	box        string   // the engine's box: its own, or its pod's
	sandbox    bool     // a CRI pod's sandbox (pause) container: it runs nothing
	root       string   // a pod's container: its root in the pod's box ("" otherwise)
	podDir     string   // a pod's container: the pod dir, on the host
	idDir      *os.File // a pod's container: its dir in podDir, open
	vmmPid     int
	rootfs     []*types.Mount
	init       *process
	execs      map[string]*process
}

// New is the shim library's Init: the task service of shim id.
func New(opts Options) shim.Init {
	return func(ctx context.Context, id string, publisher shim.Publisher, shutdown func()) (shim.Shim, error) {
		ns, _ := namespaces.Namespace(ctx)
		s := &Service{ctx: ctx, id: id, ns: ns, opts: opts, publisher: publisher, shutdown: shutdown,
			log:        slog.New(slog.NewTextHandler(logWriter{}, nil)).With("shim", id),
			containers: map[string]*container{}, creating: map[string]*creating{}}
		return s, nil
	}
}

// logWriter writes to the shim library's log (containerd's log FIFO for
// the task, once the library opened it).
type logWriter struct{}

func (logWriter) Write(p []byte) (int, error) { return logrus.StandardLogger().Out.Write(p) }

func (s *Service) dataDir() string { return filepath.Join(s.opts.Root, "tasks", s.ns, s.id) }

// engine opens the shim's engine on first use.
func (s *Service) engine(ctx context.Context) (*boxrun.Engine, error) {
	if s.eng != nil {
		return s.eng, nil
	}
	cfg := s.opts.Engine
	cfg.DataDir, cfg.SharedDir, cfg.Logger = s.dataDir(), s.opts.Root, s.log
	eng, err := boxrun.New(ctx, cfg)
	if err != nil {
		return nil, err
	}
	s.eng = eng
	return eng, nil
}

// publish sends an event to containerd. The library queues it and retries
// with its own timeouts, under the context given: the shim's.
func (s *Service) publish(topic string, ev any) {
	if err := s.publisher.Publish(s.ctx, topic, ev); err != nil {
		s.log.Warn("publish event", "topic", topic, "err", err)
	}
}

func (s *Service) get(id, execID string) (*container, *process, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.containers[id]
	if c == nil {
		return nil, nil, cerrdefs.ToGRPCf(cerrdefs.ErrNotFound, "container %s", id)
	}
	if execID == "" {
		return c, c.init, nil
	}
	p := c.execs[execID]
	if p == nil {
		return nil, nil, cerrdefs.ToGRPCf(cerrdefs.ErrNotFound, "process %s of container %s", execID, id)
	}
	return c, p, nil
}

// toGRPC maps the engine's errors to containerd's.
func toGRPC(err error) error {
	if err == nil {
		return nil
	}
	switch boxrun.CodeOf(err) {
	case errdefs.BoxNotFound:
		return cerrdefs.ToGRPCf(cerrdefs.ErrNotFound, "%v", err)
	case errdefs.ValidationError:
		return cerrdefs.ToGRPCf(cerrdefs.ErrInvalidArgument, "%v", err)
	case errdefs.ResourceExceeded:
		return cerrdefs.ToGRPCf(cerrdefs.ErrResourceExhausted, "%v", err)
	case errdefs.ExecAlreadyFinished:
		return cerrdefs.ToGRPCf(cerrdefs.ErrNotFound, "process already finished: %v", err)
	}
	return cerrdefs.ToGRPC(err)
}

// Create boots the container's box: on its rootfs, of the shape its
// config.json asks for. Its init process starts with Start.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrNotImplemented, "checkpoints")
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrInvalidArgument, "%v", err)
	}
	s.mu.Lock()
	if s.containers[r.ID] != nil || s.creating[r.ID] != nil {
		s.mu.Unlock()
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrAlreadyExists, "container %s", r.ID)
	}
	if sb := s.containers[sandboxOf(spec)]; sb != nil && sb.sandbox && sb.box != "" {
		defer s.mu.Unlock()
		if st, _, _, _ := sb.init.state(); st != task.Status_RUNNING {
			return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "pod sandbox %s is %s", sb.id, st)
		}
		return s.createInPod(r, spec, sb)
	}
	if sb := sandboxOf(spec); sb != "" && sb == s.id {
		// This shim's pod sandbox is gone: no box to put it in.
		s.mu.Unlock()
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "pod sandbox %s is gone", sb)
	}
	eng, err := s.engine(ctx)
	if err != nil {
		s.mu.Unlock()
		return nil, toGRPC(err)
	}
	// The box boots unlocked: a Delete or Shutdown meanwhile (the client
	// gave up) cancels it.
	ctx, cancel := context.WithCancel(ctx)
	cr := &creating{cancel: cancel, done: make(chan struct{})}
	s.creating[r.ID] = cr
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.creating, r.ID)
		s.mu.Unlock()
		cancel()
		close(cr.done)
	}()
	root := ""
	if spec.Root != nil {
		root = spec.Root.Path
	}
	scratch := filepath.Join(s.dataDir(), "scratch")
	tr, err := rootfsTree(r.ID, r.Bundle, r.Rootfs, root, scratch)
	if err != nil {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrInvalidArgument, "%v", err)
	}
	// The tree is read while the base disk is built: during Create only.
	defer tr.cleanup()
	bs, files := boxShape(spec, s.opts.Defaults)
	bs.Rootfs = &boxrun.Rootfs{Dir: tr.dir, Key: tr.key, Private: tr.private, Sources: tr.sources}
	sandbox := isSandbox(spec)
	if sandbox {
		// The pod's box: its containers' roots come through the pod dir.
		pod := filepath.Join(s.dataDir(), "pod")
		if err := os.MkdirAll(pod, 0o700); err != nil {
			return nil, cerrdefs.ToGRPC(err)
		}
		bs.Volumes = append(bs.Volumes, boxrun.Volume{HostPath: pod, GuestPath: podGuestDir})
	}
	box, err := eng.Create(ctx, bs)
	if err != nil {
		return nil, toGRPC(err)
	}
	defer func() {
		if retErr != nil {
			eng.Remove(context.WithoutCancel(ctx), box.ID, boxrun.Force)
		}
	}()
	for _, f := range files {
		if err := copyFile(ctx, eng, box.ID, f); err != nil {
			return nil, toGRPC(err)
		}
	}
	c := &container{eng: eng, id: r.ID, bundle: r.Bundle, box: box.ID, rootfs: r.Rootfs, execs: map[string]*process{},
		sandbox: sandbox, init: newProcess("", procOf(spec.Process), stdio{r.Stdin, r.Stdout, r.Stderr})}
	if _, pid, ok := strings.Cut(box.RuntimeID, ":"); ok {
		c.vmmPid, _ = strconv.Atoi(pid)
	}
	c.init.terminal = r.Terminal || c.init.terminal
	s.mu.Lock()
	if ctx.Err() != nil {
		s.mu.Unlock()
		return nil, cerrdefs.ToGRPC(context.Canceled)
	}
	s.containers[r.ID] = c
	s.mu.Unlock()
	s.publish(runtime.TaskCreateEventTopic, &eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs,
		IO:  &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid: uint32(c.vmmPid),
	})
	return &taskAPI.CreateTaskResponse{Pid: uint32(c.vmmPid)}, nil
}

// createInPod creates a container of the pod whose sandbox is sb: its
// root filesystem in the pod dir, its processes in the pod's box.
func (s *Service) createInPod(r *taskAPI.CreateTaskRequest, spec *specs.Spec, sb *container) (*taskAPI.CreateTaskResponse, error) {
	podDir := filepath.Join(s.dataDir(), "pod")
	idDir, err := mountPodRootfs(podDir, r.ID, r.Bundle, r.Rootfs, spec)
	if err != nil {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrInvalidArgument, "%v", err)
	}
	c := &container{eng: sb.eng, id: r.ID, bundle: r.Bundle, box: sb.box, vmmPid: sb.vmmPid, rootfs: r.Rootfs,
		root: podGuestDir + "/" + r.ID + "/rootfs", podDir: podDir, idDir: idDir, execs: map[string]*process{},
		init: newProcess("", procOf(spec.Process), stdio{r.Stdin, r.Stdout, r.Stderr})}
	c.init.root = c.root
	c.init.terminal = r.Terminal || c.init.terminal
	s.containers[r.ID] = c
	s.publish(runtime.TaskCreateEventTopic, &eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs,
		IO:  &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid: uint32(c.vmmPid),
	})
	return &taskAPI.CreateTaskResponse{Pid: uint32(c.vmmPid)}, nil
}

// copyFile puts a file the config bind-mounts into the box.
func copyFile(ctx context.Context, eng *boxrun.Engine, box string, f fileMount) error {
	in, err := os.Open(f.host)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	return eng.WriteFile(ctx, box, f.guest, in, st.Mode().Perm())
}

// Start starts the init process or an exec.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if st, _, _, _ := p.state(); st != task.Status_CREATED {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "process %q of %s is %s", r.ExecID, r.ID, st)
	}
	if r.ExecID != "" && !c.init.runningNotExiting() {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "container %s is not running", r.ID)
	}
	// The exit is published after the start, whatever comes first.
	defer p.markStarted()
	if c.sandbox {
		p.mu.Lock()
		p.status, p.pid = task.Status_RUNNING, c.vmmPid
		p.mu.Unlock()
	} else if err := p.start(c.eng, c.box, func(p *process, status uint32) { s.exited(c, p, status) }); err != nil {
		if errors.Is(err, errStopped) {
			return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "process %q of %s: %v", r.ExecID, r.ID, err)
		}
		return nil, toGRPC(err)
	}
	_, pid, _, _ := p.state()
	if r.ExecID == "" {
		pid = c.vmmPid // the init "process" is the VM, for containerd's and the host's eyes
		s.publish(runtime.TaskStartEventTopic, &eventstypes.TaskStart{ContainerID: c.id, Pid: uint32(pid)})
	} else {
		s.publish(runtime.TaskExecStartedEventTopic, &eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: r.ExecID, Pid: uint32(pid)})
	}
	return &taskAPI.StartResponse{Pid: uint32(pid)}, nil
}

// exited finishes a process that ended with status, once. The init
// process's end ends the box, and every exec in it, before its Wait
// returns and after the execs' exits are published (as runc's shim does).
func (s *Service) exited(c *container, p *process, status uint32) {
	if !p.beginExit() {
		return
	}
	if p == c.init && c.box != "" && c.root == "" {
		if err := c.eng.Remove(context.Background(), c.box, boxrun.Force); err != nil && !errdefs.Is(err, errdefs.BoxNotFound) {
			s.log.Warn("remove the box of an ended container", "box", c.box, "err", err)
		}
	}
	if p == c.init {
		s.mu.Lock()
		execs := make([]*process, 0, len(c.execs))
		for _, e := range c.execs {
			execs = append(execs, e)
		}
		s.mu.Unlock()
		if c.root != "" {
			// A pod's container: the box stays for the others; its own
			// processes end with its init, as in a PID namespace.
			for _, e := range execs {
				if st, _, _, _ := e.state(); st == task.Status_RUNNING {
					e.signal(c.eng, syscall.SIGKILL)
				}
			}
		}
		for _, e := range execs {
			e.mu.Lock()
			never := e.status == task.Status_CREATED && !e.starting
			e.mu.Unlock()
			if never {
				e.finish(137)
				continue
			}
			select { // their ends come with the box's
			case <-e.done:
			case <-time.After(10 * time.Second):
				s.log.Warn("exec did not end with its box", "exec", e.id)
			}
		}
	}
	if p == c.init && c.root != "" {
		if err := c.eng.ReleaseRoot(context.Background(), c.box, c.root); err != nil && !errdefs.Is(err, errdefs.BoxNotRunning) && !errdefs.Is(err, errdefs.BoxNotFound) {
			s.log.Warn("release a container's root in its pod's box", "container", c.id, "err", err)
		}
	}
	p.finish(status)
	_, pid, status, at := p.state()
	id := p.id
	if p == c.init {
		id, pid = c.id, c.vmmPid
	}
	s.publish(runtime.TaskExitEventTopic, &eventstypes.TaskExit{ContainerID: c.id, ID: id, Pid: uint32(pid),
		ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)})
}

// Delete removes a stopped process; for the init process, the container.
// A container still being created is canceled: its client gave up.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	s.mu.Lock()
	cr := s.creating[r.ID]
	s.mu.Unlock()
	if cr != nil && r.ExecID == "" {
		cr.cancel()
		<-cr.done
	}
	c, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	st, starting := p.status, p.starting
	if st == task.Status_CREATED && !starting {
		p.exiting = true // never started: it ends here
		p.mu.Unlock()
		p.finish(137)
	} else {
		p.mu.Unlock()
	}
	if st == task.Status_RUNNING || starting {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "process %q of %s is running", r.ExecID, r.ID)
	}
	_, pid, status, at := p.state()
	if r.ExecID != "" {
		s.mu.Lock()
		delete(c.execs, r.ExecID)
		s.mu.Unlock()
		return &taskAPI.DeleteResponse{Pid: uint32(pid), ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}, nil
	}
	if c.root != "" {
		if err := unmountPodRootfs(c.podDir, c.id, c.idDir); err != nil {
			return nil, cerrdefs.ToGRPC(err)
		}
		c.idDir.Close()
	} else if c.box != "" {
		if err := c.eng.Remove(ctx, c.box, boxrun.Force); err != nil && !errdefs.Is(err, errdefs.BoxNotFound) {
			return nil, toGRPC(err)
		}
	}
	s.mu.Lock()
	delete(s.containers, r.ID)
	s.mu.Unlock()
	s.publish(runtime.TaskDeleteEventTopic, &eventstypes.TaskDelete{ContainerID: c.id, ID: c.id, Pid: uint32(c.vmmPid),
		ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)})
	return &taskAPI.DeleteResponse{Pid: uint32(c.vmmPid), ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// Exec adds an exec process (started by Start).
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	c, _, err := s.get(r.ID, "")
	if err != nil {
		return nil, err
	}
	if !c.init.runningNotExiting() {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "container %s is not running", r.ID)
	}
	if c.sandbox {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrNotImplemented, "exec in a pod's sandbox container")
	}
	v, err := typeurl.UnmarshalAny(r.Spec)
	if err != nil {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrInvalidArgument, "exec spec: %v", err)
	}
	ps, ok := v.(*specs.Process)
	if !ok || len(ps.Args) == 0 {
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrInvalidArgument, "exec spec: not a process with args")
	}
	p := newProcess(r.ExecID, procOf(ps), stdio{r.Stdin, r.Stdout, r.Stderr})
	p.terminal = r.Terminal || p.terminal
	p.root = c.root
	s.mu.Lock()
	if c.execs[r.ExecID] != nil {
		s.mu.Unlock()
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrAlreadyExists, "exec %s", r.ExecID)
	}
	c.execs[r.ExecID] = p
	s.mu.Unlock()
	s.publish(runtime.TaskExecAddedEventTopic, &eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: r.ExecID})
	return &ptypes.Empty{}, nil
}

// Kill signals a process (with All, every process of the container).
// The init process not started yet ends at once.
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	c, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	sig := syscall.Signal(r.Signal)
	p.mu.Lock()
	st, starting := p.status, p.starting
	p.mu.Unlock()
	switch {
	case st == task.Status_STOPPED:
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrNotFound, "process %q of %s already finished", r.ExecID, r.ID)
	case sig == 0: // kill -0: is it there?
		return &ptypes.Empty{}, nil
	case st == task.Status_CREATED && !starting:
		// Never started: it ends of the signal (start finds it ended).
		s.exited(c, p, 128+uint32(sig))
		return &ptypes.Empty{}, nil
	case st == task.Status_CREATED:
		return nil, cerrdefs.ToGRPCf(cerrdefs.ErrFailedPrecondition, "process %q of %s is starting", r.ExecID, r.ID)
	}
	if r.All {
		s.mu.Lock()
		procs := []*process{c.init}
		for _, e := range c.execs {
			procs = append(procs, e)
		}
		s.mu.Unlock()
		for _, q := range procs {
			if st, _, _, _ := q.state(); st == task.Status_RUNNING && !c.sandbox {
				q.signal(c.eng, sig)
			} else if c.sandbox {
				s.exited(c, q, 128+uint32(sig))
			}
		}
		return &ptypes.Empty{}, nil
	}
	if c.sandbox {
		s.exited(c, p, 128+uint32(sig)) // whatever the signal: pause dies of it
		return &ptypes.Empty{}, nil
	}
	if err := p.signal(c.eng, sig); err != nil {
		if errdefs.Is(err, errdefs.ExecAlreadyFinished) {
			return nil, cerrdefs.ToGRPCf(cerrdefs.ErrNotFound, "process %q of %s already finished", r.ExecID, r.ID)
		}
		return nil, toGRPC(err)
	}
	return &ptypes.Empty{}, nil
}

// Wait waits for a process to end.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, cerrdefs.ToGRPC(ctx.Err())
	}
	_, _, status, at := p.state()
	return &taskAPI.WaitResponse{ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// State describes a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st, pid, status, at := p.state()
	if p == c.init {
		pid = c.vmmPid
	}
	return &taskAPI.StateResponse{ID: r.ID, ExecID: r.ExecID, Bundle: c.bundle, Pid: uint32(pid), Status: st,
		Stdin: p.stdio.stdin, Stdout: p.stdio.stdout, Stderr: p.stdio.stderr, Terminal: p.terminal,
		ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// Pids lists the container's processes: the VM for the init process (as
// Create and Start report it), the execs by their pid in the box.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, _, err := s.get(r.ID, "")
	if err != nil {
		return nil, err
	}
	var out []*task.ProcessInfo
	if st, _, _, _ := c.init.state(); st == task.Status_RUNNING {
		out = append(out, &task.ProcessInfo{Pid: uint32(c.vmmPid)})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range c.execs {
		if st, pid, _, _ := e.state(); st == task.Status_RUNNING {
			out = append(out, &task.ProcessInfo{Pid: uint32(pid)})
		}
	}
	return &taskAPI.PidsResponse{Processes: out}, nil
}

// CloseIO ends a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	_, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if r.Stdin {
		p.closeStdin()
	}
	return &ptypes.Empty{}, nil
}

// ResizePty resizes a process's terminal.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	_, p, err := s.get(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if r.Width == 0 || r.Height == 0 {
		return &ptypes.Empty{}, nil // a client that does not know its size
	}
	p.mu.Lock()
	sess := p.session
	if sess == nil && p.status == task.Status_CREATED && p.terminal {
		p.spec.rows, p.spec.cols = uint16(r.Height), uint16(r.Width) // the size it starts with
	}
	p.mu.Unlock()
	if sess == nil {
		return &ptypes.Empty{}, nil
	}
	if err := sess.Resize(uint16(r.Height), uint16(r.Width)); err != nil && !errdefs.Is(err, errdefs.ExecAlreadyFinished) {
		return nil, toGRPC(err)
	}
	return &ptypes.Empty{}, nil
}

// Connect reports the shim's and the container's pids.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid())}
	if c, _, err := s.get(r.ID, ""); err == nil {
		resp.TaskPid = uint32(c.vmmPid)
	}
	return resp, nil
}

// Shutdown ends the shim once it has no container left (with Now, at
// once: its boxes are removed).
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	if (len(s.containers) > 0 || len(s.creating) > 0) && !r.Now {
		s.mu.Unlock()
		return &ptypes.Empty{}, nil
	}
	var pending []*creating
	for _, cr := range s.creating {
		pending = append(pending, cr)
	}
	s.mu.Unlock()
	for _, cr := range pending {
		cr.cancel()
		<-cr.done
	}
	s.mu.Lock()
	eng := s.eng
	s.eng = nil
	s.mu.Unlock()
	if eng != nil {
		boxes, _ := eng.List(ctx)
		for _, b := range boxes {
			eng.Remove(ctx, b.ID, boxrun.Force)
		}
		// Base disks of images containerd has removed since.
		if _, err := eng.PruneRootfs(ctx); err != nil {
			s.log.Warn("prune base disks", "err", err)
		}
		eng.Close()
	}
	unmountPod(filepath.Join(s.dataDir(), "pod"))
	if err := removeAll(s.dataDir()); err != nil {
		s.log.Warn("task data dir left", "err", err)
	}
	removeSocket()
	// Closed, the publisher lets the shim library end the process at once
	// (it waits for that, up to 5 s).
	s.publisher.Close()
	s.shutdown()
	return &ptypes.Empty{}, nil
}

// Stats reports the guest's CPU and memory use as cgroup v2 metrics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, _, err := s.get(r.ID, "")
	if err != nil {
		return nil, err
	}
	if c.sandbox {
		a, err := typeurl.MarshalAny(&stats.Metrics{})
		if err != nil {
			return nil, cerrdefs.ToGRPC(err)
		}
		return &taskAPI.StatsResponse{Stats: protobuf.FromAny(a)}, nil
	}
	m, err := guestMetrics(ctx, c.eng, c.box)
	if err != nil {
		return nil, toGRPC(err)
	}
	a, err := typeurl.MarshalAny(m)
	if err != nil {
		return nil, cerrdefs.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: protobuf.FromAny(a)}, nil
}

func notImplemented(what string) error {
	return cerrdefs.ToGRPCf(cerrdefs.ErrNotImplemented, "%s: not implemented by %s", what, RuntimeName)
}

// Pause is not implemented.
func (s *Service) Pause(context.Context, *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	return nil, notImplemented("pause")
}

// Resume is not implemented.
func (s *Service) Resume(context.Context, *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	return nil, notImplemented("resume")
}

// Checkpoint is not implemented.
func (s *Service) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	return nil, notImplemented("checkpoint")
}

// Update is not implemented.
func (s *Service) Update(context.Context, *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	return nil, notImplemented("update")
}

// removeSocket removes the shim's socket (its address is in the bundle
// dir, the shim's working directory): a shim that died leaves it behind.
func removeSocket() {
	if addr, err := shim.ReadAddress("address"); err == nil {
		shim.RemoveSocket(addr)
	}
}
