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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/runtime/ch"
)

// CloudHypervisor drives cloud-hypervisor (v39 or newer; KVM only) through
// its REST API: the driver starts `cloud-hypervisor --api-socket` in the
// VM's directory, in a session of its own (boxes outlive the engine, as
// with QEMU), then creates and boots the VM with PUT /vm.create and
// PUT /vm.boot, and finds it again after an engine restart (Attach) through
// the same socket.
//
// What the guest gets: the kernel and initramfs as the payload, the disks
// as virtio-blk (vda, vdb, ...), virtio-rng, the serial port (ttyS0) on a
// Unix socket that the console relay of console.go reads (so the console
// is capped as QEMU's is), the virtio console off, a virtio-vsock device
// on which the agent serves (boxrun.vsock=), one virtio-fs device per
// volume served by a virtiofsd of its own, and with VMConfig.Network a
// virtio-net device on a TAP (cloudhypervisor_net.go).
type CloudHypervisor struct {
	// Binary is the cloud-hypervisor executable; "" is
	// $BOXRUN_CLOUD_HYPERVISOR, else cloud-hypervisor in PATH.
	Binary string
	// Virtiofsd serves volumes; "" is $BOXRUN_VIRTIOFSD, else virtiofsd
	// in PATH, else /usr/libexec/virtiofsd (the Rust virtiofsd's
	// package), else /usr/lib/qemu/virtiofsd (QEMU's, Debian 12).
	Virtiofsd string
}

// Files of a Cloud Hypervisor VM in its directory. Sockets are given to CH
// relative to its working directory (the VM's directory) so that their
// paths stay short.
const (
	chAPISock   = "api.sock"
	chVsockSock = "vsock.sock"
	chPidFile   = "ch.pid"
	chLogFile   = "ch.log"

	// chAgentPort is the agent's vsock port, chGuestCID the guest's CID
	// (each VM's hybrid vsock is its own: every guest can be 3).
	chAgentPort = 1024
	chGuestCID  = 3

	// chMaxFiles caps the open files of CH and of each virtiofsd (which
	// opens a host file for every file the guest has open).
	chMaxFiles = 4096
)

func (c *CloudHypervisor) Name() string { return "cloud-hypervisor" }

// BinaryPath finds the cloud-hypervisor executable.
func (c *CloudHypervisor) BinaryPath() (string, error) {
	b := c.Binary
	if b == "" {
		b = os.Getenv("BOXRUN_CLOUD_HYPERVISOR")
	}
	if b == "" {
		b = "cloud-hypervisor"
	}
	return exec.LookPath(b)
}

// Available reports whether the cloud-hypervisor binary can be found.
func (c *CloudHypervisor) Available() bool {
	_, err := c.BinaryPath()
	return err == nil
}

// Version runs `cloud-hypervisor --version` and returns the release it
// names ("v53.0").
func (c *CloudHypervisor) Version() (string, error) {
	bin, err := c.BinaryPath()
	if err != nil {
		return "", err
	}
	out, err := versionOutput(bin)
	if err != nil {
		return "", err
	}
	for _, f := range strings.Fields(out) {
		if _, _, ok := ch.ParseVersion(f); ok && strings.HasPrefix(f, "v") {
			return f, nil
		}
	}
	return firstLine(out), nil
}

// versionOutput runs bin --version (bounded: a broken binary must not hang
// the engine's start).
func versionOutput(bin string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", bin, err)
	}
	return string(out), nil
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return strings.TrimSpace(s)
}

// Cmdline returns the kernel command line of a VM. The agent serves on
// vsock, powers the VM off to end it (CH exits when its guest powers off;
// a reboot would boot the guest again), and mounts volumes as virtio-fs.
func (c *CloudHypervisor) Cmdline(cfg VMConfig) string {
	parts := []string{
		"console=ttyS0", "quiet", "loglevel=3", "panic=-1",
		"8250.nr_uarts=1", "random.trust_cpu=on", "cryptomgr.notests", "tsc=reliable",
		"boxrun.vsock=" + strconv.Itoa(chAgentPort), "boxrun.halt=poweroff", "boxrun.volumes=virtiofs",
	}
	if cfg.Cmdline != "" {
		parts = append(parts, cfg.Cmdline)
	}
	return strings.Join(parts, " ")
}

// fsSocket is the virtiofsd socket of the volume with tag.
func fsSocket(tag string) string { return "fs-" + tag + ".sock" }

// fsPidFile records the virtiofsd of the volume with tag.
func fsPidFile(tag string) string { return "virtiofsd-" + tag + ".pid" }

// VMConfig returns the body of PUT /vm.create for cfg; tap is the NIC's
// TAP ("" for none).
func (c *CloudHypervisor) VMConfig(cfg VMConfig, tap string) *ch.VmConfig {
	vc := &ch.VmConfig{
		Cpus:    &ch.CpusConfig{BootVcpus: cfg.CPUs, MaxVcpus: cfg.CPUs},
		Memory:  &ch.MemoryConfig{Size: int64(cfg.MemoryMB) << 20, Shared: len(cfg.Volumes) > 0},
		Payload: ch.PayloadConfig{Kernel: absPath(cfg.Kernel), Initramfs: absPath(cfg.Initramfs), Cmdline: c.Cmdline(cfg)},
		Rng:     &ch.RngConfig{Src: "/dev/urandom"},
		Serial:  &ch.ConsoleConfig{Mode: "Socket", Socket: consoleSock},
		// The virtio console's default is CH's stdout: unbounded.
		Console: &ch.ConsoleConfig{Mode: "Off"},
		Vsock:   &ch.VsockConfig{Cid: chGuestCID, Socket: chVsockSock},
	}
	for i, d := range cfg.Disks {
		vc.Disks = append(vc.Disks, ch.DiskConfig{Path: absPath(d.Path), Readonly: d.ReadOnly, ID: fmt.Sprintf("disk%d", i), ImageType: "Raw"})
	}
	for _, v := range cfg.Volumes {
		vc.Fs = append(vc.Fs, ch.FsConfig{Tag: v.Tag, Socket: fsSocket(v.Tag), NumQueues: 1, QueueSize: 1024, ID: "fs-" + v.Tag})
	}
	if tap != "" {
		off := false
		vc.Net = []ch.NetConfig{{
			Tap: tap, Mac: cfg.MAC, Mtu: chNetMTU, NumQueues: 2, QueueSize: 256, ID: "net0",
			OffloadTSO: &off, OffloadUFO: &off, OffloadCsum: &off,
		}}
	}
	return vc
}

// Start boots the VM: virtiofsd for each volume, the TAP for the NIC,
// cloud-hypervisor itself, then vm.create and vm.boot. It returns once CH
// reports the VM running; DialAgent then waits for the agent.
func (c *CloudHypervisor) Start(ctx context.Context, cfg VMConfig) (VM, error) {
	vm, fail, err := c.launch(ctx, cfg)
	if err != nil {
		return nil, err
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := vm.client.CreateVM(actx, c.VMConfig(cfg, vm.tap)); err != nil {
		return fail(errdefs.Wrap(errdefs.RuntimeError, err, "create the VM"))
	}
	// The serial socket exists once the VM is created (recent CH keeps
	// what the guest writes until a client connects); older releases
	// create it at boot, so a second chance follows the boot.
	vm.connectRelay(ctx, 200*time.Millisecond)
	if err := vm.client.BootVM(actx); err != nil {
		if vm.exited() {
			return fail(vm.exitedErr("at boot"))
		}
		return fail(errdefs.Wrap(errdefs.RuntimeError, err, "boot the VM"))
	}
	return vm.running(ctx, actx, "boot", fail)
}

// running connects the console relay if it is not yet, and checks that
// CH reports the VM running: the end of a start or restore.
func (vm *chVM) running(ctx, actx context.Context, what string, fail func(error) (VM, error)) (VM, error) {
	if vm.relay == nil {
		vm.connectRelay(ctx, 2*time.Second)
	}
	info, err := vm.client.Info(actx)
	if err != nil {
		return fail(errdefs.Wrap(errdefs.RuntimeError, err, "VM info"))
	}
	if info.State != ch.StateRunning {
		return fail(errdefs.New(errdefs.RuntimeError, "cloud-hypervisor reports the VM %q after %s, not running", info.State, what))
	}
	return vm, nil
}

// launch checks cfg and starts what a VM of cfg runs on, without a VM
// yet: virtiofsd for each volume, the TAP for the NIC, and
// cloud-hypervisor itself, whose API answers when launch returns. fail
// undoes all of it and returns err (or a cancellation).
func (c *CloudHypervisor) launch(ctx context.Context, cfg VMConfig) (*chVM, func(error) (VM, error), error) {
	bin, err := c.BinaryPath()
	if err != nil {
		return nil, nil, errdefs.Wrap(errdefs.RuntimeError, err,
			"cloud-hypervisor not found (install it, set BOXRUN_CLOUD_HYPERVISOR, or use hypervisor qemu)")
	}
	if cfg.CPUs <= 0 || cfg.MemoryMB <= 0 {
		return nil, nil, errdefs.New(errdefs.ValidationError, "cpus and memory must be positive")
	}
	if cfg.CPUs > 254 {
		return nil, nil, errdefs.New(errdefs.ValidationError, "cloud-hypervisor: at most 254 vCPUs")
	}
	for _, f := range []string{cfg.Kernel, cfg.Initramfs} {
		if _, err := os.Stat(f); err != nil {
			return nil, nil, errdefs.Wrap(errdefs.RuntimeError, err, "boot file")
		}
	}
	var fsd *virtiofsd
	if len(cfg.Volumes) > 0 {
		if fsd, err = c.findVirtiofsd(); err != nil {
			return nil, nil, err
		}
		for _, v := range cfg.Volumes {
			if v.ReadOnly && !fsd.readonly {
				return nil, nil, errdefs.New(errdefs.RuntimeError,
					"read-only volume %s: %s cannot export a directory read-only (it has no --readonly); install the Rust "+
						"virtiofsd (Debian/Ubuntu package virtiofsd, 1.6 or newer) or set BOXRUN_VIRTIOFSD", v.HostPath, fsd.path)
			}
		}
	}
	awaitRelay(cfg.Dir, 5*time.Second) // of an earlier VM in this dir
	vm := newCHVM(cfg.Dir, cfg.ID)
	vm.memoryMB = cfg.MemoryMB
	vm.cleanFiles()
	os.Remove(filepath.Join(cfg.Dir, consoleLog)) // a fresh console per boot, as with QEMU
	os.Remove(filepath.Join(cfg.Dir, consoleOld))
	fail := func(err error) (VM, error) {
		vm.destroy()
		if ctx.Err() != nil {
			return nil, errdefs.Wrap(errdefs.Canceled, ctx.Err(), "start cloud-hypervisor")
		}
		return nil, err
	}
	failed := func(err error) (*chVM, func(error) (VM, error), error) {
		_, err = fail(err)
		return nil, nil, err
	}
	if cfg.Network {
		if vm.tap, err = setupTap(cfg.ID); err != nil {
			return failed(err)
		}
	}
	for _, v := range cfg.Volumes {
		if err := vm.startVirtiofsd(ctx, fsd, v); err != nil {
			return failed(err)
		}
	}
	logf, err := os.OpenFile(filepath.Join(cfg.Dir, chLogFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return failed(errdefs.Wrap(errdefs.RuntimeError, err, "cloud-hypervisor log"))
	}
	cmd := exec.Command(bin, "--api-socket", "path="+chAPISock)
	cmd.Dir = cfg.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		return failed(errdefs.Wrap(errdefs.RuntimeError, err, "start cloud-hypervisor"))
	}
	unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: chMaxFiles, Max: chMaxFiles}, nil)
	vm.pid = cmd.Process.Pid
	go func() {
		vm.waitErr = cmd.Wait()
		close(vm.done)
	}()
	if err := os.WriteFile(filepath.Join(cfg.Dir, chPidFile), []byte(strconv.Itoa(vm.pid)+"\n"), 0o600); err != nil {
		return failed(errdefs.Wrap(errdefs.RuntimeError, err, "cloud-hypervisor pid file"))
	}
	if cfg.Logger != nil {
		cfg.Logger.Debug("cloud-hypervisor started", "box", cfg.ID, "pid", vm.pid, "args", cmd.Args)
	}
	// The API socket: CH creates it at once.
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	ping, err := vm.waitPing(pctx)
	cancel()
	if err != nil {
		if vm.exited() {
			return failed(vm.exitedErr("at start"))
		}
		return failed(errdefs.Wrap(errdefs.RuntimeError, err, "cloud-hypervisor API did not come up within 10s"))
	}
	if major, _, ok := ch.ParseVersion(ping.Version); ok && major < ch.MinMajor {
		return failed(errdefs.New(errdefs.RuntimeError, "cloud-hypervisor %s is too old: boxrun needs v%d or newer", ping.Version, ch.MinMajor))
	}
	return vm, fail, nil
}

// exitedErr says that CH exited, with the end of its log.
func (v *chVM) exitedErr(what string) error {
	return errdefs.New(errdefs.RuntimeError, "cloud-hypervisor exited %s (%v): %s", what, v.waitErr,
		strings.TrimSpace(tail(filepath.Join(v.dir, chLogFile), 2048)))
}

// chVM is a running cloud-hypervisor process and its VM.
type chVM struct {
	id, dir string
	pid     int
	client  *ch.Client
	done    chan struct{}
	waitErr error
	relay   *consoleRelay // nil when the console could not be connected
	tap     string        // the NIC's TAP, "" for none
	// memoryMB is the VM's memory (0 when attached: not known).
	memoryMB int

	fsMu sync.Mutex
	fs   []*fsProc // the virtiofsd processes

	once sync.Once
}

// fsProc is one virtiofsd: started by this process (cmd set, reaped by
// it) or found by Attach.
type fsProc struct {
	pid  int
	done chan struct{} // closed once it exited (nil: not our child)
}

func newCHVM(dir, id string) *chVM {
	vm := &chVM{id: id, dir: dir, done: make(chan struct{})}
	vm.client = ch.NewClientDial(filepath.Join(dir, chAPISock), func(ctx context.Context) (net.Conn, error) {
		path, release := dirRelative(dir, chAPISock)
		defer release()
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	})
	return vm
}

func (v *chVM) PID() int              { return v.pid }
func (v *chVM) Done() <-chan struct{} { return v.done }

func (v *chVM) exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// waitPing polls GET /vmm.ping until CH answers, it exits or ctx ends.
func (v *chVM) waitPing(ctx context.Context) (*ch.VmmPingResponse, error) {
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		ping, err := v.client.Ping(rctx)
		cancel()
		if err == nil {
			return ping, nil
		}
		var ae *ch.APIError
		if errors.As(err, &ae) {
			return nil, err // it answered: no point asking again
		}
		if v.exited() {
			return nil, errors.New("cloud-hypervisor exited")
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// connectRelay connects the console relay to CH's serial socket, waiting
// up to d for the socket.
func (v *chVM) connectRelay(ctx context.Context, d time.Duration) {
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if conn, err := connectConsole(cctx, v.dir, v.exited); err == nil {
		v.relay = startRelay(v.dir, conn)
	}
}

// Console returns the console's tail. Once CH has exited, it first lets
// the relay copy what CH wrote last.
func (v *chVM) Console() string {
	if v.relay == nil {
		return consoleTail(v.dir, consoleTailLen)
	}
	if v.exited() {
		v.relay.wait(2 * time.Second)
	}
	return v.relay.tail(consoleTailLen)
}

// DialAgent connects to the agent through CH's hybrid vsock: connect to
// the vsock socket, write "CONNECT <port>\n", read "OK <host port>\n";
// the connection is then the guest's vsock stream. CH closes it at once
// while nothing in the guest listens on the port (the guest is still
// booting): DialAgent retries until the agent answers, the VM exits or
// ctx ends (the caller bounds it with the boot timeout).
func (v *chVM) DialAgent(ctx context.Context) (io.ReadWriteCloser, error) {
	for {
		conn, err := dialHybridVsock(ctx, v.dir, chVsockSock, chAgentPort)
		if err == nil {
			return conn, nil
		}
		if v.exited() {
			return nil, errdefs.New(errdefs.RuntimeError, "vm exited")
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the agent did not answer on vsock port %d: %w (last: %v)", chAgentPort, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// dialHybridVsock makes one attempt to connect to port in the guest
// through the hybrid vsock socket name in dir.
func dialHybridVsock(ctx context.Context, dir, name string, port uint32) (net.Conn, error) {
	path, release := dirRelative(dir, name)
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	release()
	if err != nil {
		return nil, err
	}
	// A guest whose vsock driver is not up yet may leave the request
	// unanswered: each attempt is short.
	deadline := time.Now().Add(2 * time.Second)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	conn.SetDeadline(deadline)
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		conn.Close()
		return nil, err
	}
	// Byte by byte: what follows the line is the guest's, not ours to buffer.
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		if _, err := io.ReadFull(conn, b); err != nil {
			conn.Close()
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, fmt.Errorf("vsock port %d: connection closed (nothing listening yet)", port)
			}
			return nil, err
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	if !strings.HasPrefix(string(line), "OK ") {
		conn.Close()
		return nil, fmt.Errorf("vsock port %d: unexpected answer %q", port, line)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

// DialNetwork connects to the NIC's TAP (see cloudhypervisor_net.go).
func (v *chVM) DialNetwork(ctx context.Context) (io.ReadWriteCloser, error) {
	if v.tap == "" {
		return nil, errdefs.New(errdefs.RuntimeError, "the VM has no network device")
	}
	return dialTap(v.tap)
}

// Kill asks CH to shut the VM and itself down (vm.shutdown, vmm.shutdown:
// CH flushes its devices and removes its sockets), kills it if it does not
// go within a few seconds, then removes what the VM had: virtiofsd
// processes, the TAP, sockets.
func (v *chVM) Kill() error {
	v.once.Do(func() {
		if v.exited() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := v.client.ShutdownVM(ctx)
		if err == nil || ch.IsNotFound(err) {
			err = v.client.ShutdownVMM(ctx)
		}
		cancel()
		if err == nil {
			select {
			case <-v.done:
			case <-time.After(2 * time.Second):
			}
		}
		if !v.exited() {
			syscall.Kill(v.pid, syscall.SIGKILL)
		}
	})
	select {
	case <-v.done:
	case <-time.After(30 * time.Second):
		return errdefs.New(errdefs.RuntimeError, "cloud-hypervisor pid %d did not exit after SIGKILL", v.pid)
	}
	if v.relay != nil {
		v.relay.wait(5 * time.Second)
	}
	v.cleanup()
	return nil
}

// destroy is Kill for a VM that failed to start (its process may not be
// running, or not yet).
func (v *chVM) destroy() {
	if v.pid != 0 {
		if !v.exited() {
			syscall.Kill(v.pid, syscall.SIGKILL)
		}
		<-v.done
	}
	if v.relay != nil {
		v.relay.wait(5 * time.Second)
	}
	v.cleanup()
}

// cleanup stops the virtiofsd processes, deletes the TAP and removes the
// VM's sockets and pid files.
func (v *chVM) cleanup() {
	v.fsMu.Lock()
	fs := v.fs
	v.fs = nil
	v.fsMu.Unlock()
	for _, p := range fs {
		p.kill()
	}
	deleteTap(v.id)
	v.cleanFiles()
}

// cleanFiles removes the sockets and pid files of a VM in the directory.
func (v *chVM) cleanFiles() {
	for _, f := range []string{chAPISock, chVsockSock, chPidFile, consoleSock} {
		os.Remove(filepath.Join(v.dir, f))
	}
	for _, pat := range []string{"fs-*.sock", "virtiofsd-*.pid", chVsockSock + "_*"} {
		matches, _ := filepath.Glob(filepath.Join(v.dir, pat))
		for _, m := range matches {
			os.Remove(m)
		}
	}
}

func (p *fsProc) kill() {
	syscall.Kill(p.pid, syscall.SIGKILL)
	if p.done != nil {
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
		}
		return
	}
	// Not our child: wait until it is gone from /proc (or a zombie).
	waitFor(context.Background(), 10*time.Second, func() bool { return !processAlive(p.pid) })
}

// processAlive reports whether pid runs (a zombie does not count).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

// ownProcess reports whether pid is a process running in dir whose
// command line contains marker: the pid may have been reused since it was
// recorded.
func ownProcess(pid int, dir, marker string) bool {
	if pid <= 0 || !processAlive(pid) {
		return false
	}
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil {
		return false
	}
	want, err := filepath.Abs(dir)
	if err != nil {
		return false
	}
	if r, err := filepath.EvalSymlinks(want); err == nil {
		want = r
	}
	if cwd != want {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), marker)
}

func readPid(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// Attach finds the VM that an earlier process started in dir for box id
// (CH runs in its own session, so it outlives the engine that started
// it), through its API socket: GET /vmm.ping, GET /vm.info. It fails when
// no such CH process is alive; a CH that is alive but has no running VM,
// or does not answer, is killed (it must not run on behind a box that
// will be reported stopped). Without a VM, what one left behind (a
// virtiofsd, the TAP) is removed.
func (c *CloudHypervisor) Attach(ctx context.Context, dir, id string) (VM, error) {
	vm := newCHVM(dir, id)
	pid := readPid(filepath.Join(dir, chPidFile))
	if !ownProcess(pid, dir, "--api-socket") {
		vm.removeLeftovers()
		return nil, errdefs.New(errdefs.RuntimeError, "no VM for box %s", id)
	}
	vm.pid = pid
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		syscall.Kill(pid, syscall.SIGKILL)
		vm.adoptVirtiofsd()
		vm.cleanup()
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "watch VM of box %s", id)
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
	vm.adoptVirtiofsd()
	if tap, _ := tapNames(id); linkExists(tap) {
		vm.tap = tap
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	check := func() error {
		if _, err := vm.client.Ping(actx); err != nil {
			return err
		}
		info, err := vm.client.Info(actx)
		if err != nil {
			return err
		}
		if info.State != ch.StateRunning {
			return fmt.Errorf("its VM is %q, not running", info.State)
		}
		return nil
	}
	if err := check(); err != nil {
		vm.destroy()
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "VM of box %s (cloud-hypervisor pid %d)", id, pid)
	}
	// Relay the console again (see console.go): share the relay this
	// process may still run for the VM, else connect a new one.
	if vm.relay = runningRelay(dir); vm.relay == nil {
		path, release := dirRelative(dir, consoleSock)
		conn, err := net.Dial("unix", path)
		release()
		if err == nil {
			vm.relay = startRelay(dir, conn)
		}
	}
	return vm, nil
}

// removeLeftovers removes what a CH VM that is gone left in its
// directory: virtiofsd processes, the TAP, CH's sockets and pid files. The
// console files stay (they may be another driver's).
func (v *chVM) removeLeftovers() {
	v.adoptVirtiofsd()
	for _, p := range v.fs {
		p.kill()
	}
	v.fs = nil
	deleteTap(v.id)
	os.Remove(filepath.Join(v.dir, chAPISock))
	os.Remove(filepath.Join(v.dir, chVsockSock))
	os.Remove(filepath.Join(v.dir, chPidFile))
	for _, pat := range []string{"fs-*.sock", "virtiofsd-*.pid"} {
		matches, _ := filepath.Glob(filepath.Join(v.dir, pat))
		for _, m := range matches {
			os.Remove(m)
		}
	}
}

// adoptVirtiofsd finds the virtiofsd processes recorded in the VM's
// directory that still run.
func (v *chVM) adoptVirtiofsd() {
	matches, _ := filepath.Glob(filepath.Join(v.dir, "virtiofsd-*.pid"))
	v.fsMu.Lock()
	defer v.fsMu.Unlock()
	for _, m := range matches {
		if pid := readPid(m); ownProcess(pid, v.dir, "--socket-path") {
			v.fs = append(v.fs, &fsProc{pid: pid})
		}
	}
}

// virtiofsd is a virtiofsd executable and what it supports.
type virtiofsd struct {
	path string
	// rust: the Rust virtiofsd (--shared-dir); else QEMU's C one (-o source=).
	rust bool
	// readonly: it can export a directory read-only (--readonly).
	readonly bool
}

var virtiofsdCache sync.Map // path -> *virtiofsd

// findVirtiofsd finds the virtiofsd to serve volumes with.
func (c *CloudHypervisor) findVirtiofsd() (*virtiofsd, error) {
	var path string
	candidates := []string{c.Virtiofsd, os.Getenv("BOXRUN_VIRTIOFSD"), "virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"}
	for i, cand := range candidates {
		if cand == "" {
			continue
		}
		p, err := exec.LookPath(cand)
		if err == nil {
			path = p
			break
		}
		if i < 2 { // named explicitly: do not silently use another
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "virtiofsd %q", cand)
		}
	}
	if path == "" {
		return nil, errdefs.New(errdefs.RuntimeError,
			"volumes on cloud-hypervisor need virtiofsd: install the virtiofsd package (or qemu-system-common, which ships "+
				"/usr/lib/qemu/virtiofsd), or set BOXRUN_VIRTIOFSD")
	}
	if v, ok := virtiofsdCache.Load(path); ok {
		return v.(*virtiofsd), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	help, _ := exec.CommandContext(ctx, path, "--help").CombinedOutput()
	v := &virtiofsd{
		path:     path,
		rust:     strings.Contains(string(help), "--shared-dir"),
		readonly: strings.Contains(string(help), "--readonly"),
	}
	virtiofsdCache.Store(path, v)
	return v, nil
}

// args is virtiofsd's command line for a volume.
func (f *virtiofsd) args(v Volume) []string {
	sock := "--socket-path=" + fsSocket(v.Tag)
	nofile := "--rlimit-nofile=" + strconv.Itoa(chMaxFiles)
	if f.rust {
		args := []string{sock, "--shared-dir=" + v.HostPath, "--cache=never", nofile, "--log-level=error"}
		if v.ReadOnly {
			args = append(args, "--readonly")
		}
		return args
	}
	// QEMU's C virtiofsd: -o takes comma-separated options, so a comma in
	// the path is escaped as "\,".
	src := strings.ReplaceAll(v.HostPath, ",", `\,`)
	return []string{sock, "-o", "source=" + src, "-o", "cache=none", nofile}
}

// startVirtiofsd starts the virtiofsd of volume v, in its own session (it
// lives as long as CH, which it serves; it exits when CH disconnects), and
// waits for its socket.
func (v *chVM) startVirtiofsd(ctx context.Context, f *virtiofsd, vol Volume) error {
	logf, err := os.OpenFile(filepath.Join(v.dir, "virtiofsd-"+vol.Tag+".log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "virtiofsd log")
	}
	cmd := exec.Command(f.path, f.args(vol)...)
	cmd.Dir = v.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "start virtiofsd for volume %s", vol.HostPath)
	}
	p := &fsProc{pid: cmd.Process.Pid, done: make(chan struct{})}
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(p.done)
	}()
	v.fsMu.Lock()
	v.fs = append(v.fs, p)
	v.fsMu.Unlock()
	if err := os.WriteFile(filepath.Join(v.dir, fsPidFile(vol.Tag)), []byte(strconv.Itoa(p.pid)+"\n"), 0o600); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "virtiofsd pid file")
	}
	sock := filepath.Join(v.dir, fsSocket(vol.Tag))
	exited := false
	ok := waitFor(ctx, 10*time.Second, func() bool {
		select {
		case <-p.done:
			exited = true
			return true
		default:
		}
		_, err := os.Stat(sock)
		return err == nil
	})
	switch {
	case exited:
		return errdefs.New(errdefs.RuntimeError, "virtiofsd for volume %s exited (%v): %s", vol.HostPath, waitErr,
			strings.TrimSpace(tail(filepath.Join(v.dir, "virtiofsd-"+vol.Tag+".log"), 1024)))
	case !ok:
		return errdefs.New(errdefs.RuntimeError, "virtiofsd for volume %s did not create its socket within 10s", vol.HostPath)
	}
	return nil
}
