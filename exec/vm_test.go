package exec

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestVM boots the agent as PID 1 in QEMU/KVM with a host kernel, the way
// the runtime does, and drives it through a virtio-serial port. It needs
// BOXRUN_VM_TEST=1, /dev/kvm, qemu-system-x86_64, mkfs.ext4, cpio, a
// static busybox, a kernel (BOXRUN_VM_KERNEL, default the newest
// /boot/vmlinuz-*) and its modules in /lib/modules. BOXRUN_VM_ACCEL=tcg
// runs without KVM (slowly) where nested KVM is broken.
func TestVM(t *testing.T) {
	if os.Getenv("BOXRUN_VM_TEST") != "1" {
		t.Skip("set BOXRUN_VM_TEST=1 to boot a VM")
	}
	kernel := os.Getenv("BOXRUN_VM_KERNEL")
	if kernel == "" {
		ks, _ := filepath.Glob("/boot/vmlinuz-*")
		if len(ks) == 0 {
			t.Skip("no kernel in /boot")
		}
		kernel = ks[len(ks)-1]
	}
	kver := strings.TrimPrefix(filepath.Base(kernel), "vmlinuz-")
	for _, tool := range []string{"qemu-system-x86_64", "mkfs.ext4", "cpio", "busybox"} {
		if _, err := osexec.LookPath(tool); err != nil {
			t.Skipf("no %s", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	start := time.Now()
	agent, err := AgentPath(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("agent built in %v", time.Since(start))
	dir := t.TempDir()
	initrd := buildInitramfs(t, dir, agent, "/lib/modules/"+kver,
		"virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4", "overlay")
	base := buildBase(t, dir)
	data := filepath.Join(dir, "data.img")
	mustRun(t, "mkfs.ext4", "-q", "-F", data, "64M")
	baseSum := fileSum(t, base)

	// First boot: run things, write to the box, shut down.
	vm := bootVM(t, dir, kernel, initrd, base, data)
	c := vm.client
	info, err := c.Hello(ctx, time.Date(2033, 5, 18, 0, 0, 0, 0, time.UTC))
	if err != nil {
		t.Fatalf("hello: %v\n%s", err, vm.console())
	}
	t.Logf("hello after %v: %+v", time.Since(vm.started), info)
	if info.Kernel != kver {
		t.Errorf("kernel %q, want %q", info.Kernel, kver)
	}
	expect := func(cmd Command, want string) {
		t.Helper()
		r := run(t, c, cmd)
		if r.stdout != want || r.exit.Code != 0 {
			t.Errorf("%q: got %q (stderr %q, %+v), want %q", cmd.Args, r.stdout, r.stderr, r.exit, want)
		}
	}
	expect(sh("cat /etc/base-marker"), "base\n")
	expect(sh("kill -TERM 1; kill -QUIT 1; sleep 0.1; echo survived"), "survived\n")
	expect(sh("hostname"), "box\n")
	expect(sh("date -u +%Y"), "2033\n")
	expect(Command{Args: []string{"id", "-u"}, User: "nobody"}, "65534\n")
	expect(sh("test -c /dev/null && test -d /dev/pts && test -e /dev/ptmx && test -d /proc/self && test -d /sys/kernel && echo ok"), "ok\n")
	expect(sh("grep -c ' /dev/shm tmpfs' /proc/mounts"), "1\n")
	expect(sh("echo persisted > /home/file && sync && cat /home/file"), "persisted\n")
	expect(sh("ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 || ip link show lo | grep -q UP && echo lo"), "lo\n")

	r := run(t, c, Command{Args: []string{"sh", "-c", "sleep 1000 & sleep 1000"}, Timeout: 300 * time.Millisecond})
	if !r.exit.TimedOut {
		t.Errorf("timeout: %+v", r.exit)
	}
	if _, err := c.Start(ctx, Command{Args: []string{"nope"}}); err == nil || !strings.Contains(err.Error(), "executable file not found") {
		t.Errorf("nope: %v", err)
	}

	// Copy a tree in and out; symlinks in the box stay inside it.
	src := filepath.Join(t.TempDir(), "tree")
	makeTree(t, src)
	if err := copyIn(c, src, "/srv"); err != nil {
		t.Fatal(err)
	}
	expect(Command{Args: []string{"/srv/tree/run.sh"}}, "hi\n")
	expect(sh("ln -s / /escape && echo"), "\n")
	if err := copyIn(c, src, "/escape/escape/srv2"); err != nil {
		t.Fatal(err)
	}
	expect(sh("cat /srv2/tree/sub/data.txt"), "data")
	out := t.TempDir()
	if err := copyOut(c, "/srv/tree", out); err != nil {
		t.Fatal(err)
	}
	checkTree(t, out+"/tree")
	fi, err := c.Stat(ctx, "/srv/tree/run.sh")
	if err != nil || !fi.Exists || fi.Mode != 0o755 {
		t.Errorf("stat: %+v %v", fi, err)
	}
	// Throughput over virtio-serial.
	big := filepath.Join(t.TempDir(), "big")
	os.WriteFile(big, bytes.Repeat([]byte("0123456789abcdef"), 1<<20), 0o644)
	start = time.Now()
	if err := copyIn(c, big, "/tmp"); err != nil {
		t.Fatal(err)
	}
	t.Logf("16 MiB copy in over virtio-serial: %v", time.Since(start))
	start = time.Now()
	const n = 20
	for i := 0; i < n; i++ {
		run(t, c, Command{Args: []string{"true"}})
	}
	t.Logf("exec true round trip: %v", time.Since(start)/n)

	// A new host connection gets a new session; the old session's
	// processes are killed.
	orphan, err := c.Start(ctx, Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = vm.reconnect(t)
	if _, err := c.Hello(ctx, time.Now()); err != nil {
		t.Fatalf("hello after reconnect: %v\n%s", err, vm.console())
	}
	expect(sh(fmt.Sprintf("sleep 0.3; test -d /proc/%d && echo alive || echo gone", orphan.Pid())), "gone\n")

	p, err := c.Start(ctx, Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if r := collect(t, p); r.exit.Signal != "SIGTERM" {
		t.Errorf("process at shutdown: %+v", r.exit)
	}
	vm.wait(t)
	t.Logf("shutdown took %v", time.Since(start))
	if testing.Verbose() {
		t.Logf("console:\n%s", vm.console())
	}

	// Second boot: the box's writes persisted, the base disk is unchanged.
	vm = bootVM(t, dir, kernel, initrd, base, data)
	if _, err := vm.client.Hello(ctx, time.Now()); err != nil {
		t.Fatalf("hello: %v\n%s", err, vm.console())
	}
	c = vm.client
	expect(sh("cat /home/file /srv/tree/sub/data.txt"), "persisted\ndata")
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	vm.wait(t)
	if fileSum(t, base) != baseSum {
		t.Error("the base disk changed")
	}
	if cons := vm.console(); !strings.Contains(cons, "boxrun-agent:") {
		t.Errorf("no agent logs on the console:\n%s", cons)
	}

	// A boot that cannot complete reports why and halts the VM.
	vm = bootVM(t, dir, kernel, initrd, base, data, "boxrun.base=/dev/vdz")
	vm.wait(t)
	if cons := vm.console(); !strings.Contains(cons, "boxrun-agent: FATAL: base disk: /dev/vdz did not appear") {
		t.Errorf("no fatal message on the console:\n%s", cons)
	}
}

type testVM struct {
	cmd     *osexec.Cmd
	sock    string
	client  *Client
	log     string
	started time.Time
	exited  chan error
}

func (v *testVM) console() string {
	b, _ := os.ReadFile(v.log)
	return string(b)
}

func (v *testVM) wait(t *testing.T) {
	t.Helper()
	select {
	case err := <-v.exited:
		if err != nil {
			t.Errorf("qemu: %v", err)
		}
	case <-time.After(60 * time.Second):
		v.cmd.Process.Kill()
		t.Fatalf("VM did not halt\n%s", v.console())
	}
	select {
	case <-v.client.Done():
	case <-time.After(5 * time.Second):
		t.Error("client did not see the connection end")
	}
}

func bootVM(t *testing.T, dir, kernel, initrd, base, data string, cmdline ...string) *testVM {
	t.Helper()
	sock := filepath.Join(dir, "agent.sock")
	os.Remove(sock)
	v := &testVM{log: filepath.Join(dir, fmt.Sprintf("console-%d.log", time.Now().UnixNano())), started: time.Now(), exited: make(chan error, 1)}
	accel := os.Getenv("BOXRUN_VM_ACCEL") // kvm (default) or tcg
	if accel == "" {
		accel = "kvm"
	}
	v.cmd = osexec.Command("qemu-system-x86_64",
		"-accel", accel, "-m", "512", "-smp", "2",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 acpi=off boxrun.base=/dev/vda boxrun.data=/dev/vdb boxrun.port=boxrun.agent boxrun.halt=reboot "+strings.Join(cmdline, " "),
		"-drive", "file="+base+",if=virtio,format=raw,readonly=on",
		"-drive", "file="+data+",if=virtio,format=raw",
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=boxrun.agent",
		"-serial", "file:"+v.log,
	)
	var stderr bytes.Buffer
	v.cmd.Stderr = &stderr
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := v.cmd.Wait()
		if err != nil {
			err = fmt.Errorf("%v: %s", err, stderr.String())
		}
		v.exited <- err
	}()
	t.Cleanup(func() { v.cmd.Process.Kill() })
	v.sock = sock
	v.reconnect(t)
	return v
}

func (v *testVM) reconnect(t *testing.T) *Client {
	t.Helper()
	var conn net.Conn
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		conn, err = net.Dial("unix", v.sock)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu socket: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := NewClient(conn, testLogger())
	t.Cleanup(func() { c.Close() })
	v.client = c
	return c
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := osexec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
}

func fileSum(t *testing.T, p string) [32]byte {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return [32]byte(h.Sum(nil))
}

// buildInitramfs makes a newc cpio with the agent as /init and the named
// modules (with their dependencies, in order) listed in /etc/boxrun/modules.
func buildInitramfs(t *testing.T, dir, agent, modDir string, modules ...string) string {
	t.Helper()
	deps := map[string][]string{} // relative path → deps
	byName := map[string]string{}
	f, err := os.Open(modDir + "/modules.dep")
	if err != nil {
		t.Skipf("no modules: %v", err)
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		deps[k] = strings.Fields(v)
		name := strings.TrimSuffix(filepath.Base(k), ".ko")
		byName[strings.ReplaceAll(name, "-", "_")] = k
	}
	f.Close()
	var order []string
	seen := map[string]bool{}
	var add func(string)
	add = func(m string) {
		if seen[m] {
			return
		}
		seen[m] = true
		for _, d := range deps[m] {
			add(d)
		}
		order = append(order, m)
	}
	for _, m := range modules {
		p, ok := byName[m]
		if !ok {
			continue // built in
		}
		add(p)
	}
	root := filepath.Join(dir, "initramfs")
	for _, m := range order {
		dst := filepath.Join(root, "lib/modules", m)
		os.MkdirAll(filepath.Dir(dst), 0o755)
		b, err := os.ReadFile(filepath.Join(modDir, m))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(dst, b, 0o644)
	}
	os.MkdirAll(root+"/etc/boxrun", 0o755)
	os.WriteFile(root+"/etc/boxrun/modules", []byte(strings.Join(order, "\n")+"\n"), 0o644)
	b, err := os.ReadFile(agent)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(root+"/init", b, 0o755)
	os.MkdirAll(root+"/dev", 0o755)
	mustRun(t, "mknod", "-m", "600", root+"/dev/console", "c", "5", "1")
	out := filepath.Join(dir, "initrd.cpio")
	cmd := osexec.Command("sh", "-c", "find . | cpio -o -H newc -R 0:0 --quiet > "+out)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v %s", err, b)
	}
	return out
}

// buildBase makes a busybox root file system image.
func buildBase(t *testing.T, dir string) string {
	t.Helper()
	root := filepath.Join(dir, "base")
	for _, d := range []string{"bin", "etc", "home", "tmp", "root", "proc", "sys", "dev", "run"} {
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
	img := filepath.Join(dir, "base.img")
	mustRun(t, "mkfs.ext4", "-q", "-F", "-d", root, img, "64M")
	return img
}
