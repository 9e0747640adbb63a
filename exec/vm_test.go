package exec

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/disk"
	boxnet "github.com/boxrun/boxrun/network"
	boxruntime "github.com/boxrun/boxrun/runtime"
)

// TestVM boots the agent as PID 1 the way the engine does: kernel,
// initramfs and QEMU through package runtime (KVM when usable, TCG
// otherwise; BOXRUN_ACCEL=tcg|kvm forces one), a busybox base disk and a
// box disk from package disk. It runs whenever qemu-system-x86_64,
// mkfs.ext4, a static busybox and a guest kernel with its modules are
// installed (scripts/setup.sh; BOXRUN_KERNEL picks the kernel), and skips
// naming what is missing otherwise.
//
// Two boots of one box: the first exercises exec, volumes, network, copies,
// a host reconnecting and the shutdown; the second checks what persisted,
// a box without network and a volume the VM lacks. A third VM, booted
// alongside the second, must halt with a fatal boot error.
func TestVM(t *testing.T) {
	env := newVMEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Host side of the volumes.
	rwDir, roDir := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(rwDir, "host.txt"), []byte("from host\n"), 0o644)
	os.WriteFile(filepath.Join(roDir, "ro.txt"), []byte("read only\n"), 0o644)
	roSum := fileSum(t, filepath.Join(roDir, "ro.txt"))
	volumes := []boxruntime.Volume{{Tag: "rwvol", HostPath: rwDir}, {Tag: "rovol", HostPath: roDir, ReadOnly: true}}
	// What the engine sends for a box with volumes and user networking.
	hello := HelloRequest{
		Time:    time.Date(2033, 5, 18, 0, 0, 0, 0, time.UTC),
		Mounts:  []Mount{{Tag: "rwvol", Path: "/mnt/rw"}, {Tag: "rovol", Path: "/mnt/ro", ReadOnly: true}},
		Network: &Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}},
	}
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from the host\n")
	}))
	defer web.Close()
	env.hostPorts = []int{web.Listener.Addr().(*net.TCPAddr).Port}

	// First boot.
	vm := env.boot(t, ctx, "boot1", true, volumes, "")
	c := vm.connect(t, ctx)
	info, err := c.Hello(ctx, hello)
	if err != nil {
		t.Fatalf("hello: %v\n%s", err, vm.Console())
	}
	t.Logf("hello after %v: %+v", time.Since(vm.started).Round(time.Millisecond), info)
	if info.Kernel != env.kernel.Version {
		t.Errorf("kernel %q, want %q", info.Kernel, env.kernel.Version)
	}
	expect := func(c *Client, cmd Command, want string) {
		t.Helper()
		r := run(t, c, cmd)
		if r.stdout != want || r.exit.Code != 0 {
			t.Errorf("%q: got %q (stderr %q, %+v), want %q", cmd.Args, r.stdout, r.stderr, r.exit, want)
		}
	}
	fails := func(c *Client, cmd Command, stderr string) {
		t.Helper()
		r := run(t, c, cmd)
		if r.exit.Code == 0 || !strings.Contains(r.stderr, stderr) {
			t.Errorf("%q: got %+v (stdout %q, stderr %q), want a failure saying %q", cmd.Args, r.exit, r.stdout, r.stderr, stderr)
		}
	}

	t.Run("exec", func(t *testing.T) {
		expect(c, sh("cat /etc/base-marker"), "base\n")
		expect(c, sh("kill -TERM 1; kill -QUIT 1; sleep 0.1; echo survived"), "survived\n")
		expect(c, sh("hostname"), "box\n")
		expect(c, sh("date -u +%Y"), "2033\n")
		expect(c, Command{Args: []string{"id", "-u"}, User: "nobody"}, "65534\n")
		expect(c, sh("test -c /dev/null && test -d /dev/pts && test -e /dev/ptmx && test -d /proc/self && test -d /sys/kernel && echo ok"), "ok\n")
		expect(c, sh("grep -c ' /dev/shm tmpfs' /proc/mounts"), "1\n")
		expect(c, sh("echo persisted > /home/file && sync && cat /home/file"), "persisted\n")
		expect(c, sh("ping -c1 -W1 127.0.0.1 >/dev/null && echo lo"), "lo\n")
		r := run(t, c, Command{Args: []string{"sh", "-c", "sleep 1000 & sleep 1000"}, Timeout: 300 * time.Millisecond})
		if !r.exit.TimedOut {
			t.Errorf("timeout: %+v", r.exit)
		}
		if _, err := c.Start(ctx, Command{Args: []string{"nope"}}); err == nil || !strings.Contains(err.Error(), "executable file not found") {
			t.Errorf("nope: %v", err)
		}
	})

	t.Run("volumes", func(t *testing.T) {
		expect(c, sh("grep ' 9p ' /proc/mounts | cut -d' ' -f1,2,4 | cut -d, -f1"), "rwvol /mnt/rw rw\nrovol /mnt/ro ro\n")
		// Read-write: both sides see each other's writes.
		expect(c, sh("cat /mnt/rw/host.txt && echo from guest > /mnt/rw/guest.txt"), "from host\n")
		if b, err := os.ReadFile(filepath.Join(rwDir, "guest.txt")); string(b) != "from guest\n" {
			t.Errorf("guest's write on the host: %q %v", b, err)
		}
		os.WriteFile(filepath.Join(rwDir, "later.txt"), []byte("later\n"), 0o644)
		expect(c, sh("cat /mnt/rw/later.txt"), "later\n") // cache=none
		// Read-only: readable, and no write reaches the host.
		expect(c, sh("cat /mnt/ro/ro.txt"), "read only\n")
		fails(c, sh("echo changed > /mnt/ro/ro.txt"), "Read-only file system")
		fails(c, sh("touch /mnt/ro/new"), "Read-only file system")
		fails(c, sh("rm /mnt/ro/ro.txt"), "Read-only file system")
		if fileSum(t, filepath.Join(roDir, "ro.txt")) != roSum {
			t.Error("the read-only volume's file changed on the host")
		}
		if ents, _ := os.ReadDir(roDir); len(ents) != 1 {
			t.Errorf("read-only volume on the host: %v", ents)
		}
	})

	t.Run("network", func(t *testing.T) {
		expect(c, sh("wget -qO- "+strings.Replace(web.URL, "127.0.0.1", "10.0.2.2", 1)+"/"), "hello from the host\n")
		// The image's symlink was replaced by a regular file.
		expect(c, sh("test -L /etc/resolv.conf || grep nameserver /etc/resolv.conf"), "nameserver 10.0.2.3\n")
		expect(c, sh("ls /sys/class/net"), "eth0\nlo\n")
	})

	t.Run("copy", func(t *testing.T) {
		src := filepath.Join(t.TempDir(), "tree")
		makeTree(t, src)
		if err := copyIn(c, src, "/srv"); err != nil {
			t.Fatal(err)
		}
		expect(c, Command{Args: []string{"/srv/tree/run.sh"}}, "hi\n")
		expect(c, sh("ln -s / /escape && echo"), "\n")
		if err := copyIn(c, src, "/escape/escape/srv2"); err != nil {
			t.Fatal(err)
		}
		expect(c, sh("cat /srv2/tree/sub/data.txt"), "data")
		out := t.TempDir()
		if err := copyOut(c, "/srv/tree", out); err != nil {
			t.Fatal(err)
		}
		checkTree(t, out+"/tree")
		fi, err := c.Stat(ctx, "/srv/tree/run.sh")
		if err != nil || !fi.Exists || fi.Mode != 0o755 {
			t.Errorf("stat: %+v %v", fi, err)
		}
		big := filepath.Join(t.TempDir(), "big")
		os.WriteFile(big, bytes.Repeat([]byte("0123456789abcdef"), 1<<20), 0o644)
		start := time.Now()
		if err := copyIn(c, big, "/tmp"); err != nil {
			t.Fatal(err)
		}
		t.Logf("16 MiB copy in over virtio-serial: %v", time.Since(start).Round(time.Millisecond))
		if err := c.WriteFile(ctx, "/escape/etc/boxrun/written", 0o600, strings.NewReader("written\n")); err != nil {
			t.Fatal(err)
		}
		expect(c, sh("stat -c '%a %u' /etc/boxrun/written && cat /etc/boxrun/written"), "600 0\nwritten\n")
		start = time.Now()
		const n = 20
		for i := 0; i < n; i++ {
			run(t, c, Command{Args: []string{"true"}})
		}
		t.Logf("exec true round trip: %v", (time.Since(start) / n).Round(time.Microsecond))
	})

	// A new host connection (an engine re-attaching) gets a new session:
	// the old session's processes are killed, and the same Hello again
	// leaves the volumes and network as they are.
	orphan, err := c.Start(ctx, Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = vm.connect(t, ctx)
	hello.Time = time.Now()
	if _, err := c.Hello(ctx, hello); err != nil {
		t.Fatalf("hello after reconnect: %v\n%s", err, vm.Console())
	}
	expect(c, sh(fmt.Sprintf("sleep 0.3; test -d /proc/%d && echo alive || echo gone", orphan.Pid())), "gone\n")
	expect(c, sh("grep -c ' 9p ' /proc/mounts; cat /mnt/rw/guest.txt"), "2\nfrom guest\n")
	expect(c, sh("wget -qO- "+strings.Replace(web.URL, "127.0.0.1", "10.0.2.2", 1)+"/"), "hello from the host\n")

	p, err := c.Start(ctx, Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if r := collect(t, p); r.exit.Signal != "SIGTERM" {
		t.Errorf("process at shutdown: %+v", r.exit)
	}
	vm.wait(t, c)
	t.Logf("shutdown took %v", time.Since(start).Round(time.Millisecond))
	if testing.Verbose() {
		t.Logf("console:\n%s", vm.Console())
	}

	// A box that cannot be set up fails the Hello with the reason (the
	// agent waits for the Hello before it looks for any disk, so that a
	// VM snapshotted there can become any box). It has no disks, and
	// waits for its base disk alongside the second boot.
	bad := env.boot(t, ctx, "fatal", false, nil, "boxrun.base=/dev/vdz")
	var fatal sync.WaitGroup
	fatal.Add(1)
	go func() {
		defer fatal.Done()
		conn, err := bad.DialAgent(ctx)
		if err != nil {
			t.Errorf("connect: %v", err)
			return
		}
		c := NewClient(conn, testLogger())
		defer c.Close()
		_, err = c.Hello(ctx, HelloRequest{Time: time.Now()})
		if err == nil || !strings.Contains(err.Error(), "base disk: /dev/vdz did not appear") {
			t.Errorf("hello of a box without its disk: %v\n%s", err, bad.Console())
		}
		// The box serves nothing that needs its root.
		if _, err := c.Stat(ctx, "/"); err == nil {
			t.Error("stat in a box that is not set up worked")
		}
	}()
	defer fatal.Wait()

	// Second boot, without network or volumes: the box's writes persisted,
	// the base disk is unchanged.
	vm = env.boot(t, ctx, "boot2", false, nil, "")
	c = vm.connect(t, ctx)
	if _, err := c.Hello(ctx, HelloRequest{Time: time.Now()}); err != nil {
		t.Fatalf("hello: %v\n%s", err, vm.Console())
	}
	t.Logf("hello after %v (second boot)", time.Since(vm.started).Round(time.Millisecond))
	expect(c, sh("cat /home/file /srv/tree/sub/data.txt"), "persisted\ndata")
	expect(c, sh("ls /sys/class/net"), "lo\n")
	expect(c, sh("ls -d /mnt/rw && ls /mnt/rw"), "/mnt/rw\n") // the mount point, empty
	// A volume the VM has no device for fails Hello with a clear message,
	// and the box stays usable.
	_, err = c.Hello(ctx, HelloRequest{Mounts: []Mount{{Tag: "novol", Path: "/mnt/no"}}})
	if err == nil || !strings.Contains(err.Error(), `volume "novol" at /mnt/no: no virtio-9p device with mount tag "novol"`) {
		t.Errorf("hello with a missing volume: %v", err)
	}
	expect(c, sh("echo still here"), "still here\n")
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	vm.wait(t, c)
	if fileSum(t, env.base) != env.baseSum {
		t.Error("the base disk changed")
	}
	if cons := vm.Console(); !strings.Contains(cons, "boxrun-agent:") {
		t.Errorf("no agent logs on the console:\n%s", cons)
	}
}

// vmEnv is what every boot of the test box shares: kernel, initramfs and
// disks.
type vmEnv struct {
	kernel    *boxruntime.Kernel
	initramfs string
	base      string
	baseSum   [32]byte
	data      string
	hostPorts []int // host ports a VM with network may reach
}

// newVMEnv prepares the boot assets through the runtime and the disks
// through package disk, or skips the test naming what is missing.
func newVMEnv(t *testing.T) *vmEnv {
	t.Helper()
	var missing []string
	for _, tool := range []string{"qemu-system-x86_64", "mkfs.ext4", "busybox"} {
		if _, err := osexec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if bb, err := osexec.LookPath("busybox"); err == nil && !isStatic(bb) {
		missing = append(missing, "a statically linked busybox (busybox-static)")
	}
	if _, err := boxruntime.FindKernel(""); err != nil {
		missing = append(missing, "a guest kernel ("+err.Error()+")")
	}
	if len(missing) > 0 {
		t.Skipf("booting a VM needs %s: run scripts/setup.sh", strings.Join(missing, ", "))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	cache := t.TempDir()
	k, err := boxruntime.PrepareKernel("", "", cache)
	if err != nil {
		t.Fatal(err)
	}
	agent, err := AgentPath(ctx, cache)
	if err != nil {
		t.Fatal(err)
	}
	initramfs, err := boxruntime.BuildInitramfs(k, agent, cache)
	if err != nil {
		t.Fatal(err)
	}
	tree := busyboxTree(t)
	bases := &disk.Bases{Dir: t.TempDir()}
	base, err := bases.Ensure(ctx, "busybox", func() (string, func(), error) { return tree, func() {}, nil })
	if err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(t.TempDir(), "disk.ext4")
	if err := disk.CreateBoxDisk(ctx, data, 1); err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s, accel kvm=%v, assets and disks ready in %v", k.Version, boxruntime.KVMAvailable(), time.Since(start).Round(time.Millisecond))
	return &vmEnv{kernel: k, initramfs: initramfs, base: base, baseSum: fileSum(t, base), data: data}
}

type testVM struct {
	boxruntime.VM
	started time.Time
}

// boot starts a VM of the box, stopped at the end of the test whatever
// happens. cmdline "" boots the box from its disks; anything else boots a
// VM without disks with that kernel command line.
func (e *vmEnv) boot(t *testing.T, ctx context.Context, id string, network bool, volumes []boxruntime.Volume, cmdline string) *testVM {
	t.Helper()
	var disks []boxruntime.Disk
	if cmdline == "" {
		cmdline = "boxrun.base=/dev/vda boxrun.data=/dev/vdb"
		disks = []boxruntime.Disk{{Path: e.base, ReadOnly: true}, {Path: e.data}}
	}
	vm, err := (&boxruntime.QEMU{}).Start(ctx, boxruntime.VMConfig{
		ID: "vmtest-" + id, Dir: t.TempDir(), CPUs: 1, MemoryMB: 256,
		Kernel: e.kernel.Vmlinux, Initramfs: e.initramfs, Cmdline: cmdline,
		Disks:   disks,
		Volumes: volumes,
		Network: network,
		Logger:  testLogger(),
	})
	if err != nil {
		t.Fatalf("start VM %s: %v", id, err)
	}
	t.Cleanup(func() {
		if err := vm.Kill(); err != nil {
			t.Errorf("stopping VM %s: %v", id, err)
		}
	})
	if network {
		// The NIC's far end, as the engine gives it: the host's ports the
		// test opened, nothing else of the host.
		f, err := boxnet.NewFilter(boxnet.Policy{AllowHostPorts: e.hostPorts})
		if err != nil {
			t.Fatal(err)
		}
		nw, err := boxnet.New(boxnet.Config{Filter: f})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nw.Close() })
		conn, err := vm.DialNetwork(ctx)
		if err != nil {
			t.Fatalf("connect VM %s's network: %v", id, err)
		}
		nw.Attach(conn)
	}
	return &testVM{VM: vm, started: time.Now()}
}

func (v *testVM) connect(t *testing.T, ctx context.Context) *Client {
	t.Helper()
	conn, err := v.DialAgent(ctx)
	if err != nil {
		t.Fatalf("connect to the agent: %v\n%s", err, v.Console())
	}
	c := NewClient(conn, testLogger())
	t.Cleanup(func() { c.Close() })
	return c
}

// wait waits for the VM to halt after a shutdown, and c to see it.
func (v *testVM) wait(t *testing.T, c *Client) {
	t.Helper()
	select {
	case <-v.Done():
	case <-time.After(60 * time.Second):
		t.Fatalf("VM did not halt\n%s", v.Console())
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Error("client did not see the connection end")
	}
}

func isStatic(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// busyboxTree makes the root file system of the test image.
func busyboxTree(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "rootfs")
	for _, d := range []string{"bin", "etc", "home", "tmp", "root", "proc", "sys", "dev", "run", "mnt"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.Chmod(root+"/tmp", 0o1777)
	bb, _ := osexec.LookPath("busybox")
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(root+"/bin/busybox", b, 0o755)
	list, err := osexec.Command(bb, "--list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, app := range strings.Fields(string(list)) {
		os.Symlink("busybox", filepath.Join(root, "bin", app))
	}
	os.WriteFile(root+"/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644)
	os.WriteFile(root+"/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
	os.WriteFile(root+"/etc/base-marker", []byte("base\n"), 0o644)
	// As in many images: resolv.conf is a symlink the agent replaces.
	os.Symlink("../run/resolv.conf", root+"/etc/resolv.conf")
	return root
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return [32]byte(h.Sum(nil))
}
