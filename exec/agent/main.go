//go:build linux

// Command agent is boxrun's guest agent: /init of a box's initramfs. As
// PID 1 it mounts the box's filesystems, then serves the host's requests
// (exec, stat, copy, shutdown) over a virtio-serial port or vsock until
// the host shuts the box down.
//
// Boot conventions (shared with the runtime that builds the initramfs and
// the kernel command line):
//
//   - /etc/boxrun/modules lists kernel modules to load, paths relative to
//     /lib/modules/, one per line, in dependency order (.ko, or .ko.xz /
//     .ko.zst / .ko.gz for kernels that decompress in-kernel).
//   - boxrun.base=/dev/vda: read-only ext4 image disk (required).
//   - boxrun.data=/dev/vdb: writable ext4 box disk; without it the box's
//     writes go to a tmpfs and are lost at shutdown.
//   - boxrun.port=NAME: virtio-serial port name (default boxrun.agent).
//   - boxrun.vsock=PORT: serve on AF_VSOCK port PORT instead (Cloud
//     Hypervisor; the host reaches it through CH's hybrid vsock socket).
//   - boxrun.volumes=virtiofs: volumes are virtio-fs devices (Cloud
//     Hypervisor) instead of virtio-9p shares (QEMU); same tags.
//   - boxrun.halt=reboot|poweroff: how the VM ends (default reboot, for
//     QEMU with -no-reboot).
//   - boxrun.debug=1: debug logging on the console.
//   - boxrun.bootdisks=1: bind the disks at boot, not at the Hello (QEMU:
//     a restored box's disks then need no probe). Setup waits until each
//     disk has the size the Hello gives for it, then drops their block
//     caches before mounting them.
//   - boxrun.premount=1 (with bootdisks): mount the box root at boot, before
//     waiting for the Hello. The host sets it for an image's template
//     (QEMU): the template has the image's base and a fresh data disk
//     mounted, and each box restored from it gets a copy of that data
//     disk as it was when the template was saved, so that the guest's
//     caches hold what its own disks hold. Setup then mounts nothing.
//
// The box root is an overlay at /rootfs: lower /run/boxrun/base (the base
// disk), upper and work dirs on the data disk at /run/boxrun/data. lo is
// brought up at boot. Volumes (virtio-9p shares, mounted inside the box
// root) and the network interface are configured later, from the host's
// Hello (see config.go), idempotently: every host connection sends them.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/boxrun/boxrun/exec"
	"golang.org/x/sys/unix"
)

// version may be set with -ldflags=-X main.version=...
var version = ""

func agentVersion() string {
	v := version
	if v == "" {
		if info, ok := debug.ReadBuildInfo(); ok {
			v = info.Main.Version
		}
	}
	return strings.TrimSpace(v + " " + runtime.Version())
}

type config struct {
	base, data string
	port       string
	vsock      uint32
	useVsock   bool
	halt       int // LINUX_REBOOT_CMD_*
	debug      bool
	virtiofs   bool // volumes are virtio-fs devices, not virtio-9p shares
	bootDisks  bool // bind the disks at boot (holdBack)
	premount   bool // mount the box root at boot (an image's template)
}

func parseCmdline(s string) (config, error) {
	c := config{port: "boxrun.agent", halt: unix.LINUX_REBOOT_CMD_RESTART}
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "boxrun.base":
			c.base = v
		case "boxrun.data":
			c.data = v
		case "boxrun.port":
			c.port = v
		case "boxrun.vsock":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return c, fmt.Errorf("boxrun.vsock=%q: %v", v, err)
			}
			c.vsock, c.useVsock = uint32(n), true
		case "boxrun.halt":
			switch v {
			case "reboot":
				c.halt = unix.LINUX_REBOOT_CMD_RESTART
			case "poweroff":
				c.halt = unix.LINUX_REBOOT_CMD_POWER_OFF
			default:
				return c, fmt.Errorf("boxrun.halt=%q: want reboot or poweroff", v)
			}
		case "boxrun.debug":
			c.debug = v == "1" || v == "true"
		case "boxrun.bootdisks":
			c.bootDisks = v == "1" || v == "true"
		case "boxrun.premount":
			c.premount = v == "1" || v == "true"
		case "boxrun.volumes":
			switch v {
			case "virtiofs":
				c.virtiofs = true
			case "9p":
				c.virtiofs = false
			default:
				return c, fmt.Errorf("boxrun.volumes=%q: want 9p or virtiofs", v)
			}
		}
	}
	if c.base == "" {
		return c, fmt.Errorf("no boxrun.base= on the kernel command line")
	}
	if c.premount && !c.bootDisks {
		return c, fmt.Errorf("boxrun.premount=1 needs boxrun.bootdisks=1: the disks are mounted at boot")
	}
	return c, nil
}

type agent struct {
	cfg   config
	log   *slog.Logger
	level slog.LevelVar
	root  string // the box root (rootDir; a temporary directory in tests)

	// mountFunc replaces mount(2) in tests.
	mountFunc func(src, target, fstype string, flags uintptr, data string) error

	// mu serialises the host's configuration requests with each other and
	// with the shutdown's unmounting.
	mu     sync.Mutex
	mounts []string // mount points in mount order, unmounted in reverse
	down   bool     // shutting down: no more mounts

	cgroup  string // exec cgroups' parent (cgroup.go); "" for none
	pidsMax int    // each exec's task limit
	fairCPU bool   // the kernel has the cpu controller (exec.ServerOptions.FairCPU)

	held     []virtioDevice // the virtio devices boot held back, to bind at setup
	heldBack bool           // boot could hold devices back (see perBoxDevices)
	ready    bool           // setup done: the box root is mounted
	mounted  bool           // the box root is mounted (at boot: premount)
}

func main() {
	if os.Getpid() != 1 {
		if listen := os.Getenv(hostModeEnv); listen != "" {
			hostMode(listen)
			return
		}
		fmt.Fprintln(os.Stderr, "boxrun agent: this is the /init of a boxrun VM; it only runs as PID 1")
		os.Exit(2)
	}
	a := &agent{cfg: config{halt: unix.LINUX_REBOOT_CMD_RESTART}, root: rootDir}
	a.log = slog.New(slog.NewTextHandler(earlyConsole(), &slog.HandlerOptions{Level: &a.level}))
	defer func() {
		if r := recover(); r != nil {
			a.fatal(fmt.Errorf("panic: %v\n%s", r, debug.Stack()))
		}
	}()
	// Reap from the start: anything orphaned during boot is ours.
	reaper := exec.NewReaper(a.log)
	// Go's default for these signals is to exit, and PID 1 must not exit.
	// Handled (not ignored) so that children start with the defaults.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2, unix.SIGPWR)
	go func() {
		for sig := range sigs {
			a.log.Info("ignoring signal", "signal", sig)
		}
	}()
	if err := a.boot(); err != nil {
		a.fatal(err)
	}
	a.serve(reaper)
}

// boot readies the agent up to where it waits for the host's Hello: it
// loads the modules of the devices that carry nothing of a box (virtio
// PCI, the agent's port, RNG, file systems), binds no NIC or share, and
// mounts no disk (with boxrun.bootdisks it probes them: see holdBack). A
// VM snapshotted while its agent waits there can therefore be restored as
// any box of its shape (warm start): setup, called by the Hello, does the
// rest.
func (a *agent) boot() error {
	start := time.Now()
	if err := mountEarly(); err != nil {
		return err
	}
	a.log = slog.New(slog.NewTextHandler(console(), &slog.HandlerOptions{Level: &a.level}))
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	a.cfg, err = parseCmdline(string(cmdline))
	if err != nil {
		return err
	}
	if a.cfg.debug {
		a.level.Set(slog.LevelDebug)
	}
	a.log.Info("booting", "version", agentVersion(), "kernel", kernelRelease())
	a.held, a.heldBack = loadModules(a.log, a.cfg.bootDisks)
	if err := loopbackUp(); err != nil {
		a.log.Warn("bringing up lo", "err", err)
	}
	a.cgroup, a.pidsMax, a.fairCPU = setupCgroups(a.log)
	if a.cgroup != "" {
		// The first exec's cgroup, made before a template is taken: a
		// restored box's first command takes it instead of making one.
		if err := exec.PrepareCgroup(a.cgroup, a.pidsMax); err != nil {
			a.log.Warn("exec cgroups", "err", err)
		}
	}
	if a.cfg.premount && !a.heldBack {
		// Devices bound at boot cannot be held back (virtio built into
		// the kernel): setup rebinds the disks, which it must not do
		// under mounted file systems. The template fails, and the host
		// makes no image template of this kernel for a while.
		return fmt.Errorf("boxrun.premount: the virtio devices could not be held back (built into the kernel?)")
	}
	if a.cfg.premount {
		// An image's template: the box root is mounted now, so that no
		// box restored from it mounts anything (its disks are copies of
		// these as they are when the template is saved).
		if err := a.mountBox(); err != nil {
			a.unmountAll()
			return fmt.Errorf("mounting the box root at boot: %w", err)
		}
		a.mounted = true
	}
	a.log.Info("waiting for the host", "elapsed", time.Since(start).Round(time.Millisecond), "premounted", a.mounted)
	return nil
}

// setup makes the box: called by every Hello, it acts on the first. The
// entropy comes first, so that nothing below draws on a pool that other
// VMs restored from the same snapshot share. Then the devices that boot
// held back are bound, probing the box's own disks (unless bound at boot,
// whose caches are dropped instead) and NIC, and the box root is mounted.
func (a *agent) setup(ctx context.Context, s exec.Setup) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ready {
		return nil
	}
	if a.down {
		return fmt.Errorf("the box is shutting down")
	}
	start := time.Now()
	premounted := a.mounted // at boot: an image's template
	before := len(a.mounts)
	if len(s.Entropy) > 0 {
		if err := reseed(s.Entropy); err != nil {
			// Not fatal: the kernel reseeds on its own within a minute,
			// and virtio-rng feeds it meanwhile.
			a.log.Warn("reseeding the RNG", "err", err)
		} else {
			a.log.Info("RNG reseeded from the host", "bytes", len(s.Entropy))
		}
	}
	host := s.Hostname
	if host == "" {
		host = "box"
	}
	if err := unix.Sethostname([]byte(host)); err != nil {
		a.log.Warn("setting hostname", "err", err)
	}
	probed := bindPerBox(a.log, a.held, a.heldBack)
	if err := waitDiskSizes(s.Disks, diskSizeTimeout); err != nil {
		return err
	}
	// Premounted (an image's template): the caches are the disks' own.
	if a.cfg.bootDisks && a.heldBack && !a.mounted {
		if err := dropDiskCaches(a.cfg.base, a.cfg.data); err != nil {
			return err
		}
	}
	drivers := time.Since(start)
	if !a.mounted {
		if err := a.mountBox(); err != nil {
			// Leave nothing half-mounted: the host fails the box, and a
			// retry starts clean.
			a.unmountAll()
			return err
		}
		a.mounted = true
	}
	a.ready = true
	a.log.Info("box root ready", "elapsed", time.Since(start).Round(time.Millisecond),
		"drivers", drivers.Round(time.Millisecond), "mounting", (time.Since(start) - drivers).Round(time.Millisecond),
		"mounts", len(a.mounts)-before, "disks_probed", probed, "premounted", premounted)
	return nil
}

func (a *agent) serve(reaper *exec.Reaper) {
	opts := exec.ServerOptions{
		Root:    "/rootfs",
		Logger:  a.log,
		Version: agentVersion(),
		Reaper:  reaper,
		SetClock: func(t time.Time) error {
			tv := unix.NsecToTimeval(t.UnixNano())
			return unix.Settimeofday(&tv)
		},
		Setup:     a.setup,
		Configure: a.configure,
		Shutdown:  a.shutdown,
		Halt:      a.halt,
		Cgroup:    a.cgroup,
		PidsMax:   a.pidsMax,
		FairCPU:   a.fairCPU,
	}
	if a.cfg.useVsock {
		a.serveVsock(opts)
	} else {
		a.servePort(opts)
	}
}

// halt ends the VM. It never returns.
func (a *agent) halt() {
	// Give the port a moment to carry the acknowledgement out.
	time.Sleep(50 * time.Millisecond)
	unix.Sync()
	err := unix.Reboot(a.cfg.halt)
	a.log.Error("halt failed", "err", err)
	for {
		time.Sleep(time.Hour)
	}
}

// fatal reports a boot failure where the host sees it (the serial console
// goes to the box's log file) and halts instead of hanging.
func (a *agent) fatal(err error) {
	msg := "boxrun-agent: FATAL: " + err.Error() + "\n"
	if f, ferr := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0); ferr == nil {
		f.WriteString(msg)
		f.Close()
	} else {
		os.Stderr.WriteString(msg)
	}
	if f, ferr := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); ferr == nil {
		f.WriteString("<2>" + msg)
		f.Close()
	}
	a.halt()
}

func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// shutdown stops every process in the VM, then syncs and unmounts the box
// filesystems. The server acknowledges after it returns, then calls halt.
func (a *agent) shutdown(ctx context.Context) error {
	a.log.Info("shutting down")
	a.mu.Lock()
	a.down = true
	a.mu.Unlock()
	if err := unix.Kill(-1, unix.SIGTERM); err == nil {
		if !waitNoProcesses(ctx, 3*time.Second) {
			a.log.Info("processes left after SIGTERM, sending SIGKILL")
			unix.Kill(-1, unix.SIGKILL)
			waitNoProcesses(ctx, 2*time.Second)
		}
	}
	unix.Sync()
	a.mu.Lock()
	err := a.unmountAll()
	a.mu.Unlock()
	unix.Sync()
	return err
}

// waitNoProcesses waits until no process but us and kernel threads is left
// (zombies count as gone: the reaper collects them).
func waitNoProcesses(ctx context.Context, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if countProcesses() == 0 {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const pfKthread = 0x00200000

func countProcesses() int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		// Fields after the command: state ppid pgrp session tty tpgid flags
		f := strings.Fields(s[i+1:])
		if len(f) < 7 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		if flags, _ := strconv.ParseUint(f[6], 10, 64); flags&pfKthread != 0 {
			continue
		}
		n++
	}
	return n
}
