package runtime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun/errdefs"
)

// QEMU drives qemu-system-x86_64: KVM when /dev/kvm is usable, TCG software
// emulation otherwise, so that boxes run on any Linux host.
type QEMU struct {
	// Binary is the QEMU executable; "" finds qemu-system-x86_64 in PATH.
	Binary string
	// KVM forces hardware acceleration on or off; nil detects /dev/kvm.
	KVM *bool
}

// Agent port name shared with the guest agent (boxrun.port= on its cmdline).
const agentPortName = "boxrun.agent"

func (q *QEMU) Name() string { return "qemu" }

// KVMAvailable reports whether hardware virtualization is usable: /dev/kvm
// answers with the stable API and the CPU advertises VMX or SVM. The CPU
// check matters: some sandboxes expose a /dev/kvm that opens and creates VMs
// but cannot run one (QEMU then hangs or aborts), and those CPUs show no
// virtualization flag. BOXRUN_ACCEL=tcg|kvm overrides the detection.
func KVMAvailable() bool {
	switch os.Getenv("BOXRUN_ACCEL") {
	case "tcg":
		return false
	case "kvm":
		return true
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	const kvmGetAPIVersion = 0xAE00
	v, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), kvmGetAPIVersion, 0)
	if errno != 0 || v != 12 {
		return false
	}
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(cpuinfo), "\n") {
		if strings.HasPrefix(line, "flags") {
			for _, fl := range strings.Fields(line) {
				if fl == "vmx" || fl == "svm" {
					return true
				}
			}
			return false
		}
	}
	return false
}

// Available reports whether the QEMU binary can be found.
func (q *QEMU) Available() bool {
	_, err := q.binary()
	return err == nil
}

func (q *QEMU) binary() (string, error) {
	if q.Binary != "" {
		return exec.LookPath(q.Binary)
	}
	return exec.LookPath("qemu-system-x86_64")
}

// Args returns QEMU's command line for cfg, relative to cfg.Dir (QEMU runs
// with cfg.Dir as its working directory so socket paths stay short: a unix
// socket path may not exceed 107 bytes, and data dirs can be deep).
func (q *QEMU) Args(cfg VMConfig) []string {
	kvm := KVMAvailable()
	if q.KVM != nil {
		kvm = *q.KVM
	}
	// q35 without ACPI boots a PVH vmlinux fastest under TCG; the guest
	// ends the VM by rebooting, which -no-reboot turns into an exit.
	machine := "q35,acpi=off"
	var mem []string
	if cfg.memFile != "" {
		// The guest's RAM as a file: shared for a template (its RAM file
		// is then the snapshot's memory, and migration skips it:
		// x-ignore-shared), private for a clone (copy on write: clones
		// share the template's pages in the page cache).
		share := "off"
		if cfg.memShared {
			share = "on"
		}
		machine += ",memory-backend=ram0"
		mem = []string{"-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=%s", cfg.MemoryMB, qemuEscape(cfg.memFile), share)}
	}
	args := []string{
		"-name", "boxrun-" + cfg.ID,
		"-machine", machine,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-smp", strconv.Itoa(cfg.CPUs),
		"-m", strconv.Itoa(cfg.MemoryMB),
		"-kernel", cfg.Kernel,
		"-initrd", cfg.Initramfs,
		"-append", q.cmdline(cfg, kvm),
		// The console: see console.go. Before the agent's chardev, so that
		// QEMU waits for the relay before it creates agent.sock.
		"-chardev", "socket,id=console,path=" + consoleSock + ",server=on,wait=on",
		"-serial", "chardev:console",
		"-pidfile", "qemu.pid",
		"-device", "virtio-rng-pci",
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=agent,path=agent.sock,server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=" + agentPortName,
		// QMP, for the warm start (stop, migrate) and nothing else.
		"-qmp", "unix:" + qmpSocket + ",server=on,wait=off",
	}
	args = append(args, mem...)
	if cfg.incoming != nil {
		// Deferred: x-ignore-shared must be set first, through QMP.
		args = append(args, "-incoming", "defer")
	}
	if kvm {
		args = append(args, "-accel", "kvm", "-cpu", "host")
	} else {
		// tb-size: TCG's translation cache, which QEMU 7.2 reserves at
		// 1 GiB; an idle box translates a few MiB. Smaller keeps a busy
		// box's resident memory down too, at the cost of retranslation.
		args = append(args, "-accel", fmt.Sprintf("tcg,thread=multi,tb-size=%d", tcgCacheMB), "-cpu", "max")
	}
	for i, d := range cfg.Disks {
		// A file node under a raw node (-blockdev: what -drive makes,
		// with names of our own). cache.direct: no host page cache (the
		// guest has its own).
		ro := ""
		if d.ReadOnly {
			ro = ",read-only=on"
		}
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=file,filename=%s,node-name=file%d,cache.direct=on,aio=threads%s", qemuEscape(d.Path), i, ro),
			"-blockdev", fmt.Sprintf("driver=raw,file=file%d,node-name=disk%d%s", i, i, ro),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=disk%d", i))
	}
	// passthrough keeps the host's owners and modes visible in the guest
	// and gives files the guest creates its owners; that takes root. Not
	// root, "none": the guest still sees the host's owners, and what it
	// creates is the caller's (a chown in the guest is accepted and
	// ignored).
	model := "passthrough"
	if os.Geteuid() != 0 {
		model = "none"
	}
	for _, v := range cfg.Volumes {
		// readonly=on makes QEMU itself refuse writes.
		fsdev := "local,id=" + v.Tag + ",path=" + qemuEscape(v.HostPath) + ",security_model=" + model
		if v.ReadOnly {
			fsdev += ",readonly=on"
		}
		args = append(args, "-fsdev", fsdev, "-device", "virtio-9p-pci,fsdev="+v.Tag+",mount_tag="+v.Tag)
	}
	if cfg.Network {
		// The NIC's backend is a stream socket that the engine's userspace
		// network (package network) connects to: no QEMU user-mode
		// network, which would open the host's loopback to the guest.
		// QEMU keeps listening, so a restarted engine connects again.
		dev := "virtio-net-pci,netdev=net0,romfile="
		if cfg.MAC != "" {
			dev += ",mac=" + cfg.MAC
		}
		args = append(args, "-netdev", "stream,id=net0,server=on,addr.type=unix,addr.path="+netSocket, "-device", dev)
	} else {
		args = append(args, "-nic", "none")
	}
	return args
}

// tcgCacheMB is the TCG translation cache of each VM, in MiB.
const tcgCacheMB = 256

// qemuEscape doubles commas, QEMU's option-value escape.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func (q *QEMU) cmdline(cfg VMConfig, kvm bool) string {
	parts := []string{
		"console=ttyS0", "quiet", "loglevel=3", "panic=-1", "reboot=t",
		"8250.nr_uarts=1", "random.trust_cpu=on", "cryptomgr.notests", "tsc=reliable",
		"boxrun.port=" + agentPortName, "boxrun.halt=reboot",
		// The agent binds the disks at boot, a template's too, so that a
		// restored box probes none: the key counts the read-only disks'
		// sizes, Restore signals each writable disk's capacity, and the
		// agent waits for the sizes the Hello gives (qemu_snapshot.go).
		"boxrun.bootdisks=1",
	}
	if !kvm {
		// Under TCG the guest's CPU-vulnerability mitigations guard
		// nothing: its code runs as host code that TCG generates, whose
		// speculation its retpolines and fences do not reach. They only
		// cost: an `exec true` 0.97 of the time without them (the bare
		// fork/exec 0.975; 400 interleaved pairs each, 2026-12-03).
		parts = append(parts, "mitigations=off")
	}
	if cfg.Cmdline != "" {
		parts = append(parts, cfg.Cmdline)
	}
	return strings.Join(parts, " ")
}

// Start boots the VM. The QEMU process runs in its own session so that a
// signal to the engine's process group does not take its boxes down with it.
func (q *QEMU) Start(ctx context.Context, cfg VMConfig) (VM, error) {
	bin, err := q.binary()
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "qemu not found (install qemu-system-x86)")
	}
	if cfg.CPUs <= 0 || cfg.MemoryMB <= 0 {
		return nil, errdefs.New(errdefs.ValidationError, "cpus and memory must be positive")
	}
	for _, f := range []string{cfg.Kernel, cfg.Initramfs} {
		if _, err := os.Stat(f); err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "boot file")
		}
	}
	awaitRelay(cfg.Dir, 5*time.Second) // of an earlier VM in this dir
	for _, f := range []string{"agent.sock", netSocket, qmpSocket, "qemu.pid", consoleSock, consoleLog, consoleOld} {
		os.Remove(filepath.Join(cfg.Dir, f))
	}
	logf, err := os.OpenFile(filepath.Join(cfg.Dir, "qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "qemu log")
	}
	cmd := exec.Command(bin, q.Args(cfg)...)
	cmd.Dir = cfg.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if cfg.memShared {
		// A template VM (StartTemplate) is of use only to the engine
		// building it: it dies with it (an engine killed mid-build, maybe
		// of a background image template, leaves no VM behind). The
		// kernel sends the signal when the thread that started QEMU ends:
		// that thread is held below until QEMU exits.
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	if cfg.incoming != nil {
		cmd.ExtraFiles = []*os.File{cfg.incoming} // fd 3: migrate-incoming fd:3
		if cfg.incomingRAM != nil {
			cmd.ExtraFiles = append(cmd.ExtraFiles, cfg.incomingRAM) // fd 4: the RAM file
		}
	}
	vm := &qemuVM{dir: cfg.Dir, done: make(chan struct{})}
	started := make(chan error, 1)
	run := func() {
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		// A guest makes QEMU open host files (one per open 9p file): cap
		// them at a figure of our own, not whatever limit the caller runs
		// with. (Before Wait: never a reused pid's.)
		unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: qemuMaxFiles, Max: qemuMaxFiles}, nil)
		started <- nil
		vm.waitErr = cmd.Wait()
		close(vm.done)
	}
	if cfg.memShared {
		go func() {
			// Go ends a thread only when a goroutine locked to it ends
			// (the caller's code may do that): QEMU is started from a
			// thread of its own, kept until QEMU exits, so that its
			// death signal (above) means the engine's end and no other.
			goruntime.LockOSThread()
			run() // returns locked: the thread ends once QEMU has
		}()
	} else {
		go run()
	}
	if err := <-started; err != nil {
		logf.Close()
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "start qemu")
	}
	logf.Close()
	vm.pid = cmd.Process.Pid
	if cfg.Logger != nil {
		cfg.Logger.Debug("qemu started", "box", cfg.ID, "pid", cmd.Process.Pid, "args", cmd.Args)
	}
	// QEMU creates the console socket first and waits for the relay (see
	// console.go), then the agent socket while it sets up its devices; once
	// that is there the VM is running. If QEMU dies first, report why.
	deadline := time.Now().Add(10 * time.Second)
	cctx, cancel := context.WithDeadline(ctx, deadline)
	conn, err := connectConsole(cctx, cfg.Dir, vm.exited)
	cancel()
	if err == nil {
		vm.relay = startRelay(cfg.Dir, conn)
	}
	sock := filepath.Join(cfg.Dir, "agent.sock")
	ok := err == nil && waitFor(ctx, time.Until(deadline), func() bool {
		select {
		case <-vm.done:
			return true
		default:
		}
		_, err := os.Stat(sock)
		return err == nil
	})
	select {
	case <-vm.done:
		return nil, errdefs.New(errdefs.RuntimeError, "qemu exited at start (%v): %s", vm.waitErr,
			strings.TrimSpace(tail(filepath.Join(cfg.Dir, "qemu.log"), 2048)))
	default:
	}
	if !ok {
		vm.Kill()
		if ctx.Err() != nil {
			return nil, errdefs.Wrap(errdefs.Canceled, ctx.Err(), "start qemu")
		}
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "connect to qemu's console socket")
		}
		return nil, errdefs.New(errdefs.RuntimeError, "qemu did not create its agent socket within 10s")
	}
	return vm, nil
}

type qemuVM struct {
	pid     int
	dir     string
	done    chan struct{}
	waitErr error
	once    sync.Once
	relay   *consoleRelay // nil when the console could not be connected
}

func (v *qemuVM) PID() int              { return v.pid }
func (v *qemuVM) Done() <-chan struct{} { return v.done }

// Console returns the console's tail. Once QEMU has exited, it first lets
// the relay copy what QEMU wrote last.
func (v *qemuVM) Console() string {
	if v.relay == nil {
		return consoleTail(v.dir, consoleTailLen)
	}
	if v.exited() {
		v.relay.wait(2 * time.Second)
	}
	return v.relay.tail(consoleTailLen)
}

func (v *qemuVM) exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

func (v *qemuVM) DialAgent(ctx context.Context) (io.ReadWriteCloser, error) {
	return v.dial(ctx, "agent.sock")
}

// qemuMaxFiles caps the open files of a QEMU process (RLIMIT_NOFILE).
const qemuMaxFiles = 4096

// netSocket is the NIC backend's socket in the VM's dir.
const netSocket = "net.sock"

func (v *qemuVM) DialNetwork(ctx context.Context) (io.ReadWriteCloser, error) {
	return v.dial(ctx, netSocket)
}

// dial connects to one of QEMU's sockets in the VM's dir, retrying while
// QEMU is still setting it up.
func (v *qemuVM) dial(ctx context.Context, name string) (io.ReadWriteCloser, error) {
	path, release := dirRelative(v.dir, name)
	defer release()
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return conn, nil
		}
		if v.exited() {
			return nil, errdefs.New(errdefs.RuntimeError, "vm exited")
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
			return nil, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (v *qemuVM) Kill() error {
	v.once.Do(func() {
		if !v.exited() {
			syscall.Kill(v.pid, syscall.SIGKILL)
		}
	})
	select {
	case <-v.done:
	case <-time.After(30 * time.Second):
		return errdefs.New(errdefs.RuntimeError, "qemu pid %d did not exit after SIGKILL", v.PID())
	}
	if v.relay != nil {
		// QEMU is gone, so the relay reads its last bytes and stops: after
		// Kill, nothing writes into the VM's directory.
		v.relay.wait(5 * time.Second)
	}
	for _, f := range []string{"agent.sock", netSocket, qmpSocket, "qemu.pid", consoleSock} {
		os.Remove(filepath.Join(v.dir, f))
	}
	return nil
}

// dirRelative returns a short path to name inside dir through
// /proc/self/fd, so connect(2) works however long dir is.
func dirRelative(dir, name string) (string, func()) {
	p := filepath.Join(dir, name)
	if len(p) < 100 {
		return p, func() {}
	}
	f, err := os.Open(dir)
	if err != nil {
		return p, func() {}
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", f.Fd(), name), func() { f.Close() }
}

// Attach finds the VM that an earlier process started in dir for box id
// (QEMU runs in its own session, so it outlives the engine that started
// it). It fails when no such QEMU process is alive.
func (q *QEMU) Attach(ctx context.Context, dir, id string) (VM, error) {
	b, err := os.ReadFile(filepath.Join(dir, "qemu.pid"))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "no VM for box %s", id)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "bad pid file for box %s", id)
	}
	// The pid may have been reused since: check it is this box's QEMU.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), "\x00boxrun-"+id+"\x00") {
		return nil, errdefs.New(errdefs.RuntimeError, "VM of box %s (pid %d) is not running", id, pid)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		// It is this box's VM, but it cannot be watched: do not leave it
		// running behind a box that will be reported stopped.
		syscall.Kill(pid, syscall.SIGKILL)
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "watch VM of box %s", id)
	}
	vm := &qemuVM{pid: pid, dir: dir, done: make(chan struct{})}
	// Relay the console again (see console.go): share the relay this
	// process may still run for the VM, else connect a new one. A VM
	// without a console socket (started by an older engine, or QEMU gone
	// meanwhile) is attached all the same; only its console is not relayed.
	if vm.relay = runningRelay(dir); vm.relay == nil {
		path, release := dirRelative(dir, consoleSock)
		conn, err := net.Dial("unix", path)
		release()
		if err == nil {
			vm.relay = startRelay(dir, conn)
		}
	}
	go func() {
		// A pidfd becomes readable when the process exits.
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err != unix.EINTR {
				break
			}
		}
		unix.Close(pidfd)
		close(vm.done)
	}()
	return vm, nil
}
