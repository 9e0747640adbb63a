//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

func openRoot(t *testing.T, dir string) *fsroot.Root {
	t.Helper()
	root, err := fsroot.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	return root
}

func TestWriteResolvConf(t *testing.T) {
	want := "# Written by boxrun from the box's network configuration.\nnameserver 10.0.2.3\nnameserver fd00::3\n"
	dns := []string{"10.0.2.3", "fd00::3"}
	check := func(t *testing.T, dir string) {
		t.Helper()
		p := filepath.Join(dir, "etc/resolv.conf")
		st, err := os.Lstat(p)
		if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o644 {
			t.Fatalf("resolv.conf: %v %v", st, err)
		}
		if b, _ := os.ReadFile(p); string(b) != want {
			t.Errorf("resolv.conf = %q, want %q", b, want)
		}
		if _, err := os.Stat(filepath.Join(dir, "etc/.resolv.conf.boxrun")); err == nil {
			t.Error("temporary file left behind")
		}
	}

	t.Run("no etc", func(t *testing.T) {
		dir := t.TempDir()
		if err := writeResolvConf(openRoot(t, dir), dns); err != nil {
			t.Fatal(err)
		}
		check(t, dir)
	})

	t.Run("symlink replaced, not followed", func(t *testing.T) {
		dir := t.TempDir()
		outside := filepath.Join(t.TempDir(), "host-resolv.conf")
		os.WriteFile(outside, []byte("host\n"), 0o644)
		os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
		// An absolute symlink that would leave the root if followed.
		os.Symlink(outside, filepath.Join(dir, "etc/resolv.conf"))
		if err := writeResolvConf(openRoot(t, dir), dns); err != nil {
			t.Fatal(err)
		}
		check(t, dir)
		if b, _ := os.ReadFile(outside); string(b) != "host\n" {
			t.Errorf("wrote through the symlink: %q", b)
		}
	})

	t.Run("etc symlink resolved in the root", func(t *testing.T) {
		dir := t.TempDir()
		outside := t.TempDir()
		os.MkdirAll(filepath.Join(outside, "etc"), 0o755)
		os.MkdirAll(filepath.Join(dir, outside, "etc"), 0o755)
		// Absolute: in the root it means <root>/<outside>/etc, not the
		// host's <outside>/etc.
		os.Symlink(filepath.Join(outside, "etc"), filepath.Join(dir, "etc"))
		if err := writeResolvConf(openRoot(t, dir), dns); err != nil {
			t.Fatal(err)
		}
		check(t, filepath.Join(dir, outside))
		if ents, _ := os.ReadDir(filepath.Join(outside, "etc")); len(ents) != 0 {
			t.Errorf("wrote outside the root: %v", ents)
		}
	})

	t.Run("idempotent", func(t *testing.T) {
		dir := t.TempDir()
		root := openRoot(t, dir)
		if err := writeResolvConf(root, dns); err != nil {
			t.Fatal(err)
		}
		var st1, st2 unix.Stat_t
		unix.Stat(filepath.Join(dir, "etc/resolv.conf"), &st1)
		if err := writeResolvConf(root, dns); err != nil {
			t.Fatal(err)
		}
		unix.Stat(filepath.Join(dir, "etc/resolv.conf"), &st2)
		if st1.Ino != st2.Ino {
			t.Error("an identical resolv.conf was rewritten")
		}
		check(t, dir)
		// Different servers replace it.
		if err := writeResolvConf(root, []string{"1.1.1.1"}); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "etc/resolv.conf")); !strings.HasSuffix(string(b), "\nnameserver 1.1.1.1\n") {
			t.Errorf("resolv.conf = %q", b)
		}
	})
}

func TestReadMountinfo(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mountinfo")
	os.WriteFile(p, []byte(
		"22 1 0:21 / /rootfs rw,relatime - overlay overlay rw,lowerdir=/run/boxrun/base\n"+
			"40 22 0:35 / /rootfs/mnt/my\\040data ro,relatime shared:1 master:2 - 9p vol0 ro,sync,dirsync,access=client,msize=524288,trans=virtio\n"+
			"garbage\n"), 0o644)
	got, err := readMountinfo(p)
	if err != nil {
		t.Fatal(err)
	}
	want := []mountInfo{
		{target: "/rootfs", fstype: "overlay", source: "overlay"},
		{target: "/rootfs/mnt/my data", fstype: "9p", source: "vol0", readOnly: true},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
}

// fakeMounts stands in for mount(2) and /proc/self/mountinfo.
type fakeMounts struct {
	t     *testing.T
	info  string // mountinfo path
	calls []string
	fail  error
}

func (f *fakeMounts) mount(src, target, fstype string, flags uintptr, data string) error {
	real, err := os.Readlink(target) // /proc/self/fd/N
	if err != nil {
		f.t.Fatalf("mount target %s: %v", target, err)
	}
	ro := "rw"
	if flags&unix.MS_RDONLY != 0 {
		ro = "ro"
	}
	f.calls = append(f.calls, fmt.Sprintf("%s %s %s %s %s", src, real, fstype, ro, data))
	if f.fail != nil {
		return f.fail
	}
	line := fmt.Sprintf("%d 1 0:99 / %s %s,relatime - %s %s %s\n", 100+len(f.calls), real, ro, fstype, src, ro)
	b, _ := os.ReadFile(f.info)
	return os.WriteFile(f.info, append(b, line...), 0o644)
}

func TestConfigureVolumes(t *testing.T) {
	tmp := t.TempDir()
	drv := filepath.Join(tmp, "9pnet_virtio")
	for i, tag := range []string{"vol0", "vol1"} {
		os.MkdirAll(filepath.Join(drv, fmt.Sprintf("virtio%d", i)), 0o755)
		// The kernel's attribute ends with the tag's NUL.
		os.WriteFile(filepath.Join(drv, fmt.Sprintf("virtio%d/mount_tag", i)), []byte(tag+"\x00"), 0o444)
	}
	info := filepath.Join(tmp, "mountinfo")
	os.WriteFile(info, nil, 0o644)
	defer func(d, m string, v time.Duration) { virtio9pDriver, mountinfoPath, volumeTimeout = d, m, v }(virtio9pDriver, mountinfoPath, volumeTimeout)
	virtio9pDriver, mountinfoPath, volumeTimeout = drv, info, 100*time.Millisecond

	root := filepath.Join(tmp, "root")
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	os.Symlink("/etc", filepath.Join(root, "escape")) // inside the root: <root>/etc
	fm := &fakeMounts{t: t, info: info}
	a := &agent{root: root, log: slog.New(slog.DiscardHandler), mountFunc: fm.mount}
	ctx := context.Background()
	opts := "trans=virtio,version=9p2000.L,msize=524288,cache=none"

	mounts := []exec.Mount{{Tag: "vol0", Path: "/mnt/data", ReadOnly: true}, {Tag: "vol1", Path: "/escape/work"}}
	if err := a.configure(ctx, mounts, nil); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"vol0 " + root + "/mnt/data 9p ro " + opts,
		"vol1 " + root + "/etc/work 9p rw " + opts,
	}
	if fmt.Sprint(fm.calls) != fmt.Sprint(want) {
		t.Errorf("mounts:\n got %q\nwant %q", fm.calls, want)
	}
	if fmt.Sprint(a.mounts) != fmt.Sprint([]string{root + "/mnt/data", root + "/etc/work"}) {
		t.Errorf("recorded mounts %q", a.mounts)
	}

	// A host that re-attaches sends the same configuration: nothing to do.
	if err := a.configure(ctx, mounts, nil); err != nil {
		t.Fatal(err)
	}
	if len(fm.calls) != 2 || len(a.mounts) != 2 {
		t.Errorf("mounted again: %q", fm.calls)
	}

	for _, tc := range []struct {
		m    exec.Mount
		want string
	}{
		{exec.Mount{Tag: "vol0", Path: "/elsewhere", ReadOnly: true}, `volume "vol0" at /elsewhere: the share is already mounted at /mnt/data`},
		{exec.Mount{Tag: "vol0", Path: "/mnt/data"}, `volume "vol0" at /mnt/data: already mounted read-only`},
		{exec.Mount{Tag: "nope", Path: "/x"}, `volume "nope" at /x: no virtio-9p device with mount tag "nope" (the VM has 2: ["vol0" "vol1"])`},
	} {
		err := a.configure(ctx, []exec.Mount{tc.m}, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want %q", tc.m, err, tc.want)
		}
	}
	if len(fm.calls) != 2 {
		t.Errorf("unexpected mounts: %q", fm.calls)
	}

	// A failing mount names the volume; every volume is still tried.
	os.WriteFile(info, nil, 0o644)
	fm.fail = unix.EPERM
	err := a.configure(ctx, []exec.Mount{{Tag: "vol1", Path: "/w"}, {Tag: "vol0", Path: "/r", ReadOnly: true}}, nil)
	if err == nil || !strings.Contains(err.Error(), `volume "vol1" at /w: mount 9p read-write: operation not permitted; volume "vol0" at /r: mount 9p read-only`) {
		t.Errorf("failing mount: %v", err)
	}

	// Once shutting down, nothing more is mounted.
	a.down = true
	if err := a.configure(ctx, mounts, nil); err == nil || !strings.Contains(err.Error(), "shutting down") {
		t.Errorf("configure while down: %v", err)
	}
}

func TestConfigureVolumesNoDriver(t *testing.T) {
	defer func(d string) { virtio9pDriver = d }(virtio9pDriver)
	virtio9pDriver = filepath.Join(t.TempDir(), "none")
	a := &agent{root: t.TempDir(), log: slog.New(slog.DiscardHandler), mountFunc: func(string, string, string, uintptr, string) error {
		t.Error("mount called")
		return nil
	}}
	start := time.Now()
	err := a.configure(context.Background(), []exec.Mount{{Tag: "v", Path: "/v"}}, nil)
	if err == nil || !strings.Contains(err.Error(), `volume "v" at /v: no virtio-9p driver`) {
		t.Errorf("got %v", err)
	}
	if time.Since(start) > time.Second {
		t.Errorf("waited %v for a driver that is not there", time.Since(start))
	}
}

// TestConfigureNetwork configures a tap device in a network namespace of
// its own, through the same netlink calls the agent makes in the guest. It
// needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and /dev/net/tun.
func TestConfigureNetwork(t *testing.T) {
	if os.Getenv("BOXRUN_NETNS_HELPER") == "1" {
		netnsHelper(t)
		return
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	cmd := osexec.Command(os.Args[0], "-test.run=^TestConfigureNetwork$", "-test.v")
	cmd.Env = append(os.Environ(), "BOXRUN_NETNS_HELPER=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	out, err := cmd.CombinedOutput()
	if err != nil && strings.Contains(err.Error(), "operation not permitted") {
		t.Skipf("cannot create a network namespace: %v", err)
	}
	if s := string(out); err == nil && strings.Contains(s, "--- SKIP") {
		t.Skipf("helper skipped:\n%s", s)
	}
	if err != nil || !strings.Contains(string(out), "--- PASS: TestConfigureNetwork") {
		t.Fatalf("in a network namespace: %v\n%s", err, out)
	}
}

func netnsHelper(t *testing.T) {
	// A tap device stands in for the VM's virtio-net interface.
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("tun: %v", err)
	}
	defer unix.Close(fd)
	ifr, _ := unix.NewIfreq("eth0")
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		t.Skipf("TUNSETIFF: %v", err)
	}
	dir := t.TempDir()
	root := openRoot(t, dir)
	ctx := context.Background()
	n := exec.Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}}
	for i := 0; i < 2; i++ { // the second time changes nothing and does not fail
		if err := configureNetwork(ctx, root, n); err != nil {
			t.Fatalf("configure #%d: %v", i+1, err)
		}
	}
	for _, name := range []string{"lo", "eth0"} {
		ifi, err := net.InterfaceByName(name)
		if err != nil || ifi.Flags&net.FlagUp == 0 {
			t.Errorf("%s not up: %+v %v", name, ifi, err)
		}
	}
	ifi, _ := net.InterfaceByName("eth0")
	addrs, _ := ifi.Addrs()
	if fmt.Sprint(addrs) != "[10.0.2.15/24]" && !strings.HasPrefix(fmt.Sprint(addrs), "[10.0.2.15/24 fe80::") {
		t.Errorf("eth0 addresses %v", addrs)
	}
	if r := defaultRoute(t); r != "eth0 via 10.0.2.2" {
		t.Errorf("default route %q", r)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "etc/resolv.conf")); !strings.Contains(string(b), "\nnameserver 10.0.2.3\n") {
		t.Errorf("resolv.conf %q", b)
	}

	// Another gateway replaces the default route; the interface is found by
	// name too; IPv6 works alike.
	n = exec.Network{Interface: "eth0", Address: "10.0.2.15/24", Gateway: "10.0.2.3"}
	if err := configureNetwork(ctx, root, n); err != nil {
		t.Fatal(err)
	}
	if r := defaultRoute(t); r != "eth0 via 10.0.2.3" {
		t.Errorf("default route after replacing %q", r)
	}
	if err := configureNetwork(ctx, root, exec.Network{Address: "fd00::15/64", Gateway: "fd00::2"}); err != nil {
		t.Errorf("ipv6: %v", err)
	}
	addrs, _ = ifi.Addrs()
	if !strings.Contains(fmt.Sprint(addrs), "fd00::15/64") {
		t.Errorf("eth0 addresses after ipv6 %v", addrs)
	}

	defer func(d time.Duration) { linkTimeout = d }(linkTimeout)
	linkTimeout = 50 * time.Millisecond
	err = configureNetwork(ctx, root, exec.Network{Interface: "eth9", Address: "10.0.2.15/24"})
	if err == nil || !strings.Contains(err.Error(), `network: no interface "eth9" (interfaces: ["lo" "eth0"])`) {
		t.Errorf("missing interface: %v", err)
	}
	err = configureNetwork(ctx, root, exec.Network{Address: "10.0.2.15/24", Gateway: "192.168.7.1"})
	if err == nil || !strings.Contains(err.Error(), "network: default route via 192.168.7.1 on eth0: network is unreachable") {
		t.Errorf("unreachable gateway: %v", err)
	}
}

// defaultRoute reads the IPv4 default route from /proc/net/route (which
// shows the reader's network namespace).
func defaultRoute(t *testing.T) string {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) > 7 && fl[1] == "00000000" && fl[7] == "00000000" {
			var gw uint32
			fmt.Sscanf(fl[2], "%X", &gw)
			return fmt.Sprintf("%s via %d.%d.%d.%d", fl[0], byte(gw), byte(gw>>8), byte(gw>>16), byte(gw>>24))
		}
	}
	return ""
}

func TestExecCgroupLimits(t *testing.T) {
	for _, tc := range []struct {
		rel string
		ok  bool
	}{
		{"6.1.0-57-amd64", true},
		{"5.7.0", true},
		{"5.6.19", false},
		{"4.19.0-26-amd64", false},
		{"garbage", false},
	} {
		if got := kernelAtLeast(tc.rel, 5, 7); got != tc.ok {
			t.Errorf("kernelAtLeast(%q, 5, 7) = %v", tc.rel, got)
		}
	}
	// All execs together stay below the kernel's threads-max and pid_max,
	// so the agent can always fork, and below one task per 256 KiB of the
	// guest's memory, so that they cannot run it out of memory with tasks
	// alone; each exec gets half of that.
	for _, tc := range []struct{ threads, pidMax, memKB, total, perExec int }{
		{1518, 32768, 210848, 823, 411},           // a 256 MiB guest (measured): memory bound
		{1518, 32768, 0, 1262, 631},               // memory unknown: the kernel's limits
		{15000, 32768, 1 << 20, 4096, 2048},       // 1 GiB
		{60000, 4096, 16 << 20, 3840, 1920},       // pid_max lower
		{128000, 4194304, 16 << 20, 65536, 32768}, // 16 GiB
		{200, 32768, 1 << 20, 64, 32},             // at least 64
	} {
		total := execsLimit(tc.threads, tc.pidMax, tc.memKB)
		if total != tc.total {
			t.Errorf("execsLimit(%d, %d, %d) = %d, want %d", tc.threads, tc.pidMax, tc.memKB, total, tc.total)
		}
		if got := pidsLimit(total); got != tc.perExec {
			t.Errorf("pidsLimit(%d) = %d, want %d", total, got, tc.perExec)
		}
	}
}
