// Package boxrun runs untrusted code in micro-VMs ("boxes"), driven straight
// from the caller's process.
//
//	eng, _ := boxrun.New(ctx, boxrun.Config{})
//	box, _ := eng.Create(ctx, boxrun.BoxSpec{Image: "alpine"})
//	res, _ := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"uname", "-a"}})
//	_ = eng.Remove(ctx, box.ID, boxrun.Force)
//
// Each box is a VM booted from a kernel and a small agent (PID 1) that runs
// commands for the host. Its root filesystem is an OCI image (pulled once,
// turned once into a read-only disk shared by every box of that image) under
// a writable disk of its own.
//
// The Engine's methods, by what they act on:
//
//	boxes     Create, Get, List, Stop, Start, Remove, GC, Run (create, exec, remove), Usage
//	commands  Exec, Stream, StreamExec, StartExec + ExecEvents, GetExec, ListExecs,
//	          CancelExec, SignalExec
//	terminals Attach: a command on a PTY (Session: Read, Write, Resize, Wait, Close)
//	files     Copy (like docker cp), WriteFile, OpenFile, ReadTar, Stat
//	images    Pull, PullWith (progress: Config.PullProgress, WithPullProgress),
//	          Images, RemoveImage, Prune, PruneRootfs, DiskUsage
//	engine    Info, Close
//
// The first box of a shape (CPUs, memory, devices) boots; later ones are
// restored from a snapshot of that boot in about a second under TCG
// (Config.WarmStart, warm.go), or taken ready from a pool at once
// (Config.Pool, pool.go). An ordinary user runs all of it: no root needed.
//
// A box with Network reaches the public internet only, unless its
// NetworkPolicy says otherwise (package network). Package boxrund serves
// all of it over the BoxRun REST API; package shim is containerd's runtime
// (containerd-shim-boxrun-v2), booting boxes on containers' root
// filesystems (BoxSpec.Rootfs).
package boxrun

import (
	"context"
	"io"
	"log/slog"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/image"
	"github.com/boxrun/boxrun/network"
)

// Config configures an Engine. The zero value works on a host set up with
// scripts/setup.sh.
type Config struct {
	// DataDir holds images, disks, boxes and caches; default
	// $BOXRUN_DATA_DIR, else ~/.boxrun.
	DataDir string
	// Hypervisor is the driver: "auto" (default), "cloud-hypervisor" or
	// "qemu". Auto is Cloud Hypervisor when /dev/kvm can run guests and a
	// cloud-hypervisor binary is found, else QEMU (KVM when usable, else
	// TCG). A named driver is used whatever the host has; what it lacks
	// fails Create with an error naming it.
	Hypervisor string
	// CloudHypervisor is the cloud-hypervisor binary; default
	// $BOXRUN_CLOUD_HYPERVISOR, else cloud-hypervisor in PATH.
	CloudHypervisor string
	// Kernel is the guest kernel (a bzImage or vmlinux); default
	// $BOXRUN_KERNEL, else the newest /boot/vmlinuz-* with modules.
	Kernel string
	// KernelModules is the kernel's module tree; default /lib/modules/<version>.
	KernelModules string
	// AgentPath is the guest agent binary; default $BOXRUN_AGENT, else it is
	// built from this module's source on first use and cached in DataDir.
	AgentPath string
	// RegistriesConf is a containers-registries.conf(5) file; default the
	// standard locations.
	RegistriesConf string
	// StorageDriver is the containers/storage driver; default overlay when
	// the host supports it, else vfs.
	StorageDriver string
	// BootTimeout bounds the wait for a new box's agent; default 2 minutes.
	BootTimeout time.Duration
	// StopTimeout bounds a graceful Stop before the VM is killed; default 10s.
	StopTimeout time.Duration
	// MaxCPU and MaxMemoryMB cap the totals over running boxes (Create and
	// Start fail with RESOURCE_EXCEEDED past them); default the host's CPUs
	// and memory.
	MaxCPU      int
	MaxMemoryMB int
	// MaxExecOutputBytes caps the output stored per exec (for replay);
	// the oldest output is dropped first and counted in ExecInfo. Default
	// 16 MiB. It is also what Exec and Run keep of each stream in memory
	// (ExecSpec.MaxOutputBytes). Live Stream callers get all of it.
	MaxExecOutputBytes int64
	// PullPolicy is the default pull policy of Create and Pull:
	// PullMissing (""), PullAlways or PullNever.
	PullPolicy PullPolicy
	// WarmStart restores boxes from a snapshot of a booted VM of their
	// shape (a template, made by the first box of the shape) instead of
	// booting each: about five times faster under TCG. Default Enabled;
	// Disabled, or $BOXRUN_WARM_START=0, turns it off. Both drivers
	// snapshot; on Cloud Hypervisor boxes with volumes boot cold.
	WarmStart Toggle
	// ImageTemplates (QEMU, with WarmStart): once an image is created a
	// second time in one shape and disk size, a template of that image is
	// made in the background, with the box root mounted; later boxes of
	// it are restored from it with a copy of its (fresh) box disk, and
	// mount nothing: under TCG about half a warm create. Each costs a
	// template boot once and its disk space (under TemplateCacheMB).
	// Default Enabled; Disabled, or $BOXRUN_IMAGE_TEMPLATES=0, turns it
	// off.
	ImageTemplates Toggle
	// Pool keeps this many boxes ready per image and shape (CPUs, memory,
	// disk size, network on or off), made ahead of time after a Create of
	// that image and shape, so that the next such Create only assigns one
	// (its record, network policy and ports): its first command answers
	// as fast as any later one. Boxes with volumes never come from the
	// pool. Pooled boxes use memory and a little CPU while they wait and
	// count against MaxCPU and MaxMemoryMB (the pool fills only while there
	// is room); RemoveImage and Prune drop them; Close kills them. Default
	// 0: no pool. See pool.go.
	Pool int
	// SharedDir, if set, holds the base disks and the cache (kernel,
	// agent, initramfs, warm-start templates) in place of DataDir's bases/
	// and cache/, so that engines on different DataDirs share them: each
	// process of containerd-shim-boxrun-v2 has a DataDir of its own (its
	// records, boxes and locks) and all of them one SharedDir. Builds in
	// it are locked across processes.
	SharedDir string
	// TemplateCacheMB bounds the disk space of the warm-start templates
	// (least recently used go first); default 2048.
	TemplateCacheMB int
	// PullProgress, if set, receives image pull progress.
	PullProgress func(image.Progress)
	// Logger receives the engine's logs; default discards them.
	Logger *slog.Logger
}

// BoxSpec describes a box to create. Zero numeric fields take the defaults
// (2 CPUs, 1024 MiB, 8 GiB disk); negative ones are invalid.
type BoxSpec struct {
	Image      string            // image reference: "alpine", "docker://...", "oci:/path", ...
	Name       string            // optional, unique among boxes
	CPU        int               // virtual CPUs
	MemoryMB   int               // guest memory
	DiskSizeGB int               // size of the box's writable disk (sparse)
	Workdir    string            // default working directory of execs; default the image's, else /
	Env        map[string]string // added to the image's environment for every exec
	Network    bool              // false: the VM has no network device at all; true: see NetworkPolicy
	Volumes    []Volume          // host directories mounted in the box
	// NetworkPolicy (with Network) says what the box may reach; the zero
	// value is the public internet only: no host, no private range.
	NetworkPolicy NetworkPolicy
	Ports         []Port // box ports published on the host (with Network)
	// PullPolicy says whether Create fetches the image: PullMissing,
	// PullAlways, PullNever; "" is Config.PullPolicy.
	PullPolicy PullPolicy
	// Rootfs, in place of Image, boots the box on a directory tree of the
	// host: a container's root filesystem, as a containerd shim gets it.
	Rootfs *Rootfs
}

// Rootfs is a host directory tree that a box boots on instead of an image.
// Its base disk is built from Dir once per Key and shared by every box of
// that Key, as an image's is; the box writes to its own disk, never to Dir.
// There is no image config: the box's and the execs' Env, Workdir and User
// say it all (the default user is root, the default workdir /).
type Rootfs struct {
	Dir string // absolute; read while the base disk is built (and again if it was pruned)
	// Key names the tree's content: a tree that changes needs a new Key.
	// Letters, digits and "._-", at most 128.
	Key string
	// Private says the tree is this box's alone (its Key is too): its
	// base disk is removed with the box instead of staying for others.
	Private bool
	// Sources are the host dirs the tree is made of (an image's layer
	// dirs): once one of them is gone, no new box can be of this Key, and
	// PruneRootfs removes its base disk.
	Sources []string
}

// NetworkPolicy is what a box may reach: Allow, Deny (CIDRs, host:port,
// domains) and AllowHostPorts (the host's loopback ports it may reach at
// its gateway, 10.0.2.2). See package network.
type NetworkPolicy = network.Policy

// Port publishes a box's TCP port on the host (HostIP default 127.0.0.1).
type Port = network.Port

// Volume mounts a host directory in a box (virtio-9p). ReadOnly is enforced
// twice: QEMU exports it read-only and the guest mounts it read-only.
type Volume struct {
	HostPath  string // absolute; must exist
	GuestPath string // absolute path inside the box
	ReadOnly  bool
}

// Box is a snapshot of a box's record.
type Box struct {
	ID            string
	Name          string
	Status        string // "creating", "running", "stopped", "error"
	Image         string
	CPU           int
	MemoryMB      int
	DiskSizeGB    int
	Network       bool
	Workdir       string
	Env           map[string]string
	Volumes       []Volume
	NetworkPolicy NetworkPolicy
	Ports         []Port
	RuntimeID     string // the VM: driver and VMM process id
	// ErrorCode and ErrorMessage say why a box is in status "error".
	ErrorCode    string
	ErrorMessage string
	CreatedAt    time.Time
	StartedAt    *time.Time
	StoppedAt    *time.Time
}

// Info describes the engine: its limits, what running boxes use of them, and
// the hypervisor that runs them.
type Info struct {
	MaxCPU       int    // Config.MaxCPU: the cap on CPUs over running boxes
	MaxMemoryMB  int    // Config.MaxMemoryMB
	UsedCPU      int    // CPUs of the running boxes
	UsedMemoryMB int    // memory of the running boxes
	Hypervisor   string // the driver: "cloud-hypervisor" or "qemu"
	Boxes        int    // running boxes
	// HypervisorVersion is the VMM's version ("v53.0", "7.2.22"); "" if
	// it could not be told.
	HypervisorVersion string
	// Acceleration is what runs the guests' CPUs: "kvm" or "tcg"
	// (QEMU's software emulation).
	Acceleration string
	// Boots counts how boxes started: cold, warm (Config.WarmStart) or
	// pooled (Config.Pool).
	Boots BootStats
	// PoolVMs is the boxes waiting in the pool (Config.Pool).
	PoolVMs int
}

// FileInfo describes a path in a box (symlinks followed inside the box).
type FileInfo = agentexec.FileInfo

// Usage is what a running box uses of its VM: CPU time since it started,
// memory in use, processes (Engine.Usage).
type Usage = agentexec.Usage

// ExecSpec describes a command to run in a box.
type ExecSpec struct {
	Cmd     []string          // argv; no shell unless Cmd asks for one
	Env     map[string]string // added on top of the image's and the box's env
	Workdir string            // absolute; default the box's workdir
	User    string            // default the image's user
	Timeout time.Duration     // 0: none; at expiry the whole process group is killed
	Stdin   io.Reader         // nil: empty
	// Entrypoint prepends the image's Entrypoint to Cmd.
	Entrypoint bool
	// Root runs the command chrooted into this directory of the box (a
	// container's root filesystem in a box that holds a pod's containers,
	// as the containerd shim does); Workdir, User and Cmd[0] are resolved
	// in it, and it gets /proc, /sys and /dev of its own on first use
	// (ReleaseRoot). "" is the box root.
	Root string
	// MaxOutputBytes is what Exec and Run keep of each of stdout and
	// stderr: the last bytes, the rest counted in ExecResult's
	// StdoutDropped and StderrDropped (a box can write without end, and
	// the result is held in the caller's memory). 0: the engine's
	// Config.MaxExecOutputBytes (16 MiB); negative: no limit. Stream
	// ignores it: its caller reads as it goes.
	MaxOutputBytes int64
}

// AttachSpec describes an interactive session: a command on a terminal.
type AttachSpec struct {
	Cmd        []string          // default: the image's shell: /bin/bash if the box has it, else /bin/sh
	Env        map[string]string // added on top of the image's and the box's env
	Workdir    string            // default the box's workdir
	User       string            // default the image's user
	Term       string            // TERM; default "xterm-256color"
	Rows, Cols uint16            // initial window size; default 24x80
	Root       string            // as ExecSpec.Root
}

// ExecResult is the outcome of a finished command.
type ExecResult struct {
	ExitCode int    // -1 when killed by a signal
	Signal   string // e.g. "SIGKILL"
	TimedOut bool
	Stdout   string
	Stderr   string
	// StdoutDropped and StderrDropped count the bytes of each stream
	// dropped from its start to keep it within ExecSpec.MaxOutputBytes.
	StdoutDropped, StderrDropped int64
	Duration                     time.Duration
}

// Event is one step of a streamed command: a chunk of output ("log") or the
// end ("exit", always last and exactly once). Seq counts from 0 across both
// output streams, in the order the guest produced them.
type Event struct {
	ExecID   string
	Type     string // "log" or "exit"
	Stream   string // "stdout" or "stderr" for log events
	Data     string
	Seq      int
	ExitCode int    // exit events
	Signal   string // exit events: the signal that killed the command
	TimedOut bool   // exit events
	Error    string // exit events: why the command ended abnormally
}

// RemoveOption modifies Remove.
type RemoveOption int

// Force removes a running box (its VM is killed).
const Force RemoveOption = 1

// Error is the error type of every Engine method: a BoxRun code and a message.
type Error = errdefs.Error

// Code is a BoxRun error code.
type Code = errdefs.Code

// Error codes, as in the BoxRun API.
const (
	BoxNotFound       = errdefs.BoxNotFound
	BoxAlreadyRunning = errdefs.BoxAlreadyRunning
	BoxNotRunning     = errdefs.BoxNotRunning
	NameAlreadyExists = errdefs.NameAlreadyExists
	ResourceExceeded  = errdefs.ResourceExceeded
	RuntimeError      = errdefs.RuntimeError
	ImagePullFailed   = errdefs.ImagePullFailed
	Timeout           = errdefs.Timeout
	Canceled          = errdefs.Canceled
	ValidationError   = errdefs.ValidationError
)

// CodeOf returns err's BoxRun code ("" for nil).
func CodeOf(err error) Code { return errdefs.CodeOf(err) }

// Exec runs a command to completion and returns its output. A command that
// ran reports its exit code with a nil error, whatever the code; a command
// that could not start, timed out (TIMEOUT, with the partial output) or was
// canceled returns an error.
func (e *Engine) Exec(ctx context.Context, id string, spec ExecSpec) (*ExecResult, error) {
	start := time.Now()
	_, events, err := e.streamExec(ctx, id, spec, true)
	if err != nil {
		if c := errdefs.CodeOf(err); ctx.Err() != nil && (c == errdefs.Canceled || c == errdefs.Timeout) {
			// ctx ended before the command was known to have started:
			// as when it ends later (below).
			return &ExecResult{Duration: time.Since(start)}, errdefs.Wrap(errdefs.Canceled, ctx.Err(), "exec %q", spec.Cmd[0])
		}
		return nil, err
	}
	var res ExecResult
	stdout, stderr := e.outputTail(spec), e.outputTail(spec)
	var last Event
	for ev := range events {
		switch {
		case ev.Type == "exit":
			last = ev
		case ev.Stream == "stderr":
			stderr.write(ev.Data)
		default:
			stdout.write(ev.Data)
		}
	}
	res.Stdout, res.StdoutDropped = stdout.result()
	res.Stderr, res.StderrDropped = stderr.result()
	res.ExitCode, res.Signal, res.TimedOut = last.ExitCode, last.Signal, last.TimedOut
	res.Duration = time.Since(start)
	switch {
	// Canceled unless the command finished on its own before ctx ended (the
	// exit event may still arrive after the cancel killed the command).
	case ctx.Err() != nil && (last.Type != "exit" || last.Signal != "" || last.Error != ""):
		return &res, errdefs.Wrap(errdefs.Canceled, ctx.Err(), "exec %q", spec.Cmd[0])
	case last.TimedOut:
		return &res, errdefs.New(errdefs.Timeout, "exec %q timed out after %v", spec.Cmd[0], spec.Timeout)
	case last.Error == "canceled": // CancelExec from elsewhere
		return &res, errdefs.New(errdefs.Canceled, "exec %q canceled", spec.Cmd[0])
	case last.Error != "":
		return &res, errdefs.New(errdefs.RuntimeError, "exec %q: %s", spec.Cmd[0], last.Error)
	}
	return &res, nil
}
