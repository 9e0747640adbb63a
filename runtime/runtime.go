// Package runtime starts and stops the micro-VMs that boxes run in.
//
// A Hypervisor is one driver (QEMU, Cloud Hypervisor); a VM is one running
// virtual machine. Drivers know nothing about images or agents: they boot a
// kernel and an initramfs with the disks they are given, and expose the byte
// stream on which the guest agent listens.
package runtime

import (
	"context"
	"io"
	"log/slog"
	"os"
	"time"
)

// Hypervisor starts VMs.
type Hypervisor interface {
	// Name is the driver's name ("qemu", "cloud-hypervisor").
	Name() string
	// Start boots a VM. When Start returns an error, no process, socket or
	// file of the VM is left behind.
	Start(ctx context.Context, cfg VMConfig) (VM, error)
	// Attach finds a VM started in dir by an earlier engine process for box
	// id, so that boxes survive a restart of the engine.
	Attach(ctx context.Context, dir, id string) (VM, error)
}

// VMConfig describes one VM.
type VMConfig struct {
	ID       string // box id, for logs and process names
	Dir      string // private directory for the VM's sockets and logs; must exist
	CPUs     int
	MemoryMB int
	// Kernel is an uncompressed vmlinux (PVH entry) or a bzImage.
	Kernel    string
	Initramfs string
	// Cmdline is appended to the driver's own kernel command line.
	Cmdline string
	Disks   []Disk   // in order: the guest sees them as vda, vdb, ...
	Volumes []Volume // host directories shared with the guest (virtio-9p)
	// Network false: the VM has no network device at all. True: one NIC
	// whose far end is VM.DialNetwork's stream of frames, where the
	// engine's userspace network decides what the guest may reach.
	Network bool
	MAC     string // the NIC's MAC address; default the driver's
	Logger  *slog.Logger

	// Set by the Snapshotter methods of a driver (warm start).
	memFile     string   // guest RAM is this file (mapped shared, or private for a clone)
	memShared   bool     // template: the guest's writes go to memFile
	incoming    *os.File // restore the VM from this saved state (fd 3)
	incomingRAM *os.File // its RAM file (fd 4, memFile /proc/self/fd/4)
}

// Snapshotter is a Hypervisor that can save a booted VM and start others
// from it: the warm start. A template VM of some shape is booted (with
// stand-in disks and shares that its guest never touches) up to where its
// agent waits for the host, saved, and then restored as any number of VMs
// of that shape, each with its own disks, shares and NIC backend.
type Snapshotter interface {
	Hypervisor
	// TemplateFiles are the files (or directories) of a template in its
	// dir. The last one is written last: its inode tells one build of a
	// template from another.
	TemplateFiles() []string
	// TemplateKey names everything of the driver and of cfg's shape that a
	// template depends on (binary and version, acceleration, CPUs,
	// memory, device layout); family names the shape alone, without the
	// binary's version, so that a newer template of a family replaces
	// the older ones. The engine adds the boot files' contents to the key.
	TemplateKey(cfg VMConfig) (key, family string, err error)
	// StartTemplate boots a VM of cfg whose memory lives in a file in dir,
	// cfg.Dir, so that SaveTemplate need not copy it.
	StartTemplate(ctx context.Context, cfg VMConfig) (VM, error)
	// SaveTemplate pauses vm (from StartTemplate), saves its device state
	// into its dir and kills it. Its dir is then a template.
	SaveTemplate(ctx context.Context, vm VM) error
	// Restore starts a VM of cfg, of the shape of the template in dir,
	// from that template: its memory is a private copy-on-write mapping of
	// the template's, so that VMs restored from one template share the
	// pages they do not write. Restore returns once the guest runs.
	Restore(ctx context.Context, cfg VMConfig, dir string) (VM, error)
}

// Disk is a raw disk image attached to the VM.
type Disk struct {
	Path     string
	ReadOnly bool
}

// Volume is a host directory shared with the guest under a mount tag.
type Volume struct {
	Tag      string
	HostPath string
	ReadOnly bool
}

// VM is a running virtual machine.
type VM interface {
	// PID is the VMM process id.
	PID() int
	// DialAgent connects to the guest agent's byte stream. The stream is
	// open before the guest has booted; the first bytes the guest reads are
	// the ones the host wrote first.
	DialAgent(ctx context.Context) (io.ReadWriteCloser, error)
	// DialNetwork connects to the NIC's backend (VMConfig.Network): a
	// stream of Ethernet frames, each preceded by its length (4 bytes, big
	// endian), in both directions. One connection at a time; a new one
	// may be made after the last ended (an engine that restarted).
	DialNetwork(ctx context.Context) (io.ReadWriteCloser, error)
	// Done is closed when the VMM process has exited.
	Done() <-chan struct{}
	// Kill stops the VMM process at once and waits until it is gone.
	Kill() error
	// Console returns the tail of the guest's serial console, for errors.
	Console() string
}

// tail returns up to the last n bytes of a file.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// waitFor polls cond until it returns true, ctx ends or d passes.
func waitFor(ctx context.Context, d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}
