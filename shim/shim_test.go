package shim

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/api/types"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func overlay(lowers []string, upper, work string) []*types.Mount {
	opts := []string{"index=off", "lowerdir=" + strings.Join(lowers, ":")}
	if upper != "" {
		opts = append(opts, "upperdir="+upper, "workdir="+work)
	}
	return []*types.Mount{{Type: "overlay", Source: "overlay", Options: opts}}
}

// TestRootfsTreeKeys: the image's layers give one key whatever the
// container (its base disk is shared); content of the container's own
// makes a key of its own; a replaced layer dir makes another key.
func TestRootfsTreeKeys(t *testing.T) {
	dir := t.TempDir()
	l1, l2 := filepath.Join(dir, "1/fs"), filepath.Join(dir, "2/fs")
	up, work := filepath.Join(dir, "up"), filepath.Join(dir, "work")
	for _, d := range []string{l1, l2, up, work} {
		os.MkdirAll(d, 0o755)
	}
	os.WriteFile(filepath.Join(l1, "a"), []byte("1"), 0o644)

	one := func(id string, m []*types.Mount) *tree {
		t.Helper()
		tr, err := rootfsTree(id, dir, m, "", filepath.Join(dir, "scratch-"+id))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tr.cleanup)
		return tr
	}
	a, b := one("c1", overlay([]string{l1}, up, work)), one("c2", overlay([]string{l1}, up, work))
	if a.key != b.key || a.dir != l1 {
		t.Errorf("one layer, empty upper: keys %s %s, dir %s", a.key, b.key, a.dir)
	}
	if !validKeyForEngine(a.key) {
		t.Errorf("key %q is not a valid Rootfs key", a.key)
	}
	os.WriteFile(filepath.Join(up, "own"), []byte("x"), 0o644)
	if os.Geteuid() == 0 {
		c := one("c3", overlay([]string{l1}, up, work))
		if c.key == a.key {
			t.Error("a non-empty upper dir shares the image's key")
		}
		if _, err := os.Stat(filepath.Join(c.dir, "own")); err != nil {
			t.Errorf("the container's own file is not in its tree: %v", err)
		}
		two := one("c4", overlay([]string{l2, l1}, "", ""))
		if _, err := os.Stat(filepath.Join(two.dir, "a")); err != nil {
			t.Errorf("two layers merged: %v", err)
		}
	}
	// A layer dir replaced by another with the same path: another key.
	os.RemoveAll(l1)
	os.MkdirAll(l1, 0o755)
	if d := one("c5", overlay([]string{l1}, "", "")); d.key == a.key {
		t.Error("a replaced layer dir kept its key")
	}
	if _, err := rootfsTree("c6", dir, []*types.Mount{{Type: "tmpfs"}}, "", dir); err == nil {
		t.Error("tmpfs rootfs: no error")
	}
	if _, err := rootfsTree("c7", dir, overlay([]string{filepath.Join(dir, "gone")}, "", ""), "", dir); err == nil {
		t.Error("missing layer: no error")
	}
	// No mounts: the bundle's rootfs dir, specific to the container.
	os.MkdirAll(filepath.Join(dir, "rootfs"), 0o755)
	r := one("c8", nil)
	if r.dir != filepath.Join(dir, "rootfs") || r.key == one("c9", nil).key {
		t.Errorf("bundle rootfs: dir %s; keys must differ per container", r.dir)
	}
}

func validKeyForEngine(k string) bool {
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return len(k) <= 128
}

func TestBoxShape(t *testing.T) {
	quota, period, mem := int64(150000), uint64(100000), int64(300<<20)
	dir := t.TempDir()
	file := filepath.Join(dir, "hosts")
	os.WriteFile(file, []byte("127.0.0.1 x\n"), 0o644)
	s := &specs.Spec{
		Process: &specs.Process{Args: []string{"sh"}},
		Linux: &specs.Linux{
			Resources:  &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &quota, Period: &period}, Memory: &specs.LinuxMemory{Limit: &mem}},
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace}},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/data", Type: "bind", Source: dir, Options: []string{"rbind", "ro"}},
			{Destination: "/etc/hosts", Type: "bind", Source: file, Options: []string{"rbind"}},
			{Destination: "/gone", Type: "bind", Source: filepath.Join(dir, "gone"), Options: []string{"rbind"}},
		},
	}
	bs, files := boxShape(s, Defaults{})
	if bs.CPU != 2 || bs.MemoryMB != 300 || bs.DiskSizeGB != 8 || bs.Network {
		t.Errorf("shape: cpu %d mem %d disk %d network %v", bs.CPU, bs.MemoryMB, bs.DiskSizeGB, bs.Network)
	}
	if len(bs.Volumes) != 1 || bs.Volumes[0].GuestPath != "/data" || !bs.Volumes[0].ReadOnly {
		t.Errorf("volumes: %+v", bs.Volumes)
	}
	if len(files) != 1 || files[0].guest != "/etc/hosts" {
		t.Errorf("files: %+v", files)
	}
	// No limits, the host's network (no namespace): the defaults, a NIC.
	bs, _ = boxShape(&specs.Spec{Process: &specs.Process{Args: []string{"sh"}}}, Defaults{CPU: 3, MemoryMB: 700})
	if bs.CPU != 3 || bs.MemoryMB != 700 || !bs.Network {
		t.Errorf("defaults: %+v", bs)
	}
	p := procOf(&specs.Process{Args: []string{"id"}, Env: []string{"A=1", "B=x=y"}, Cwd: "/w", User: specs.User{UID: 1000, GID: 100}})
	if p.user != "1000:100" || p.env["B"] != "x=y" || p.cwd != "/w" {
		t.Errorf("process: %+v", p)
	}
}

func TestPodGrouping(t *testing.T) {
	sandbox := &specs.Spec{Annotations: map[string]string{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}}
	ctr := &specs.Spec{Annotations: map[string]string{"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"}}
	plain := &specs.Spec{}
	for _, c := range []struct {
		id      string
		s       *specs.Spec
		group   string
		sandbox string
	}{
		{"pod1", sandbox, "pod1", ""},
		{"c1", ctr, "pod1", "pod1"},
		{"t1", plain, "t1", ""},
		{"t2", nil, "t2", ""},
	} {
		if g := groupOf(c.id, c.s); g != c.group {
			t.Errorf("groupOf(%s) = %q, want %q", c.id, g, c.group)
		}
		if sb := sandboxOf(c.s); sb != c.sandbox {
			t.Errorf("sandboxOf(%s) = %q, want %q", c.id, sb, c.sandbox)
		}
	}
	if !skipMount("/dev/shm") || !skipMount("/proc") || skipMount("/devices") || skipMount("/etc/hosts") {
		t.Error("skipMount")
	}
}

// TestRemoveAllRefusesMounts: a dir with something mounted under it is
// never removed (that would delete through the mount).
func TestRemoveAllRefusesMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	dir := t.TempDir()
	sub := filepath.Join(dir, "m")
	os.MkdirAll(sub, 0o755)
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "precious"), []byte("x"), 0o644)
	if err := syscall.Mount(src, sub, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := removeAll(dir); err == nil {
		t.Error("removeAll through a mount: no error")
	}
	syscall.Unmount(sub, syscall.MNT_DETACH)
	if _, err := os.Stat(filepath.Join(src, "precious")); err != nil {
		t.Fatalf("the mounted tree lost a file: %v", err)
	}
	if err := removeAll(dir); err != nil {
		t.Fatal(err)
	}
}

// TestMountPodRootfsStaysInside: a hostile image's symlinks send no mount
// of the pod's config outside the container's rootfs on the host, and the
// unmount takes every mount with it, leaving the sources alone.
func TestMountPodRootfsStaysInside(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	base := t.TempDir()
	tree := filepath.Join(base, "tree")
	outside := filepath.Join(base, "outside")
	os.MkdirAll(filepath.Join(tree, "bin"), 0o755)
	os.MkdirAll(filepath.Join(tree, "outside"), 0o755) // where etc lands, resolved inside the tree
	os.MkdirAll(outside, 0o755)
	os.Symlink("../../../outside", filepath.Join(tree, "etc")) // etc -> outside the tree
	os.Symlink("/", filepath.Join(tree, "data"))
	hosts := filepath.Join(base, "hosts")
	os.WriteFile(hosts, []byte("127.0.0.1 pod\n"), 0o644)
	vol := filepath.Join(base, "vol")
	os.MkdirAll(vol, 0o755)
	os.WriteFile(filepath.Join(vol, "v"), []byte("volume"), 0o644)
	pod := filepath.Join(base, "pod")
	os.MkdirAll(pod, 0o700)
	s := &specs.Spec{Root: &specs.Root{Path: tree}, Mounts: []specs.Mount{
		{Destination: "/etc/hosts", Type: "bind", Source: hosts, Options: []string{"rbind", "ro"}},
		{Destination: "/data/vol", Type: "bind", Source: vol, Options: []string{"rbind"}},
		{Destination: "/dev/shm", Type: "bind", Source: vol, Options: []string{"rbind"}},
	}}
	idDir, err := mountPodRootfs(pod, "c1", base, nil, s)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(pod, "c1", "rootfs")
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Errorf("a mount point was made outside the rootfs: %v", ents)
	}
	if _, err := os.Stat("/vol"); err == nil {
		t.Error("a mount point was made at the host's /vol")
	}
	// Inside: etc resolves to /outside of the tree, data to its root.
	if b, err := os.ReadFile(filepath.Join(root, "outside", "hosts")); err != nil || string(b) != "127.0.0.1 pod\n" {
		t.Errorf("hosts inside the tree: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(root, "outside", "hosts"), nil, 0o644); err == nil {
		t.Error("the read-only bind of hosts is writable")
	}
	if b, _ := os.ReadFile(filepath.Join(root, "vol", "v")); string(b) != "volume" {
		t.Errorf("volume in the rootfs: %q", b)
	}
	if err := unmountPodRootfs(pod, "c1", idDir); err != nil {
		t.Fatal(err)
	}
	idDir.Close()
	if _, err := os.Stat(filepath.Join(pod, "c1")); !os.IsNotExist(err) {
		t.Errorf("container dir left: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(vol, "v")); string(b) != "volume" {
		t.Error("the volume lost its file")
	}
	if mounts, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mounts), base) {
		t.Errorf("mounts left under %s", base)
	}
	// Gone already: nothing to do, no error.
	if err := unmountPodRootfs(pod, "c1", nil); err != nil {
		t.Errorf("second unmount: %v", err)
	}
}
