package runtime

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A template key covers the shape of a VM (what QEMU's devices and the
// guest's boot depend on) and nothing that differs from box to box.
func TestQEMUTemplateKey(t *testing.T) {
	q := &QEMU{}
	if !q.Available() {
		t.Skip("qemu-system-x86_64 not installed (scripts/setup.sh)")
	}
	// The key reads the read-only disks' sizes (bases of one size share a
	// template), not the writable ones' (Restore signals their capacity).
	dir := t.TempDir()
	disk := func(name string, size int64) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bx, by := disk("base-x", 256<<20), disk("base-y", 256<<20)
	da, db := disk("disk-a", 1<<30), disk("disk-b", 3<<30)
	base := VMConfig{ID: "a", Dir: "/data/boxes/a", CPUs: 2, MemoryMB: 512, Kernel: "/k", Initramfs: "/i",
		Cmdline: "boxrun.base=/dev/vda", MAC: "52:54:00:00:00:0a",
		Disks:   []Disk{{Path: bx, ReadOnly: true}, {Path: da}},
		Volumes: []Volume{{Tag: "vol0", HostPath: "/home/a"}}, Network: true}
	key := func(c VMConfig) string {
		k, f, err := q.TemplateKey(c)
		if err != nil {
			t.Fatal(err)
		}
		return k + " family " + f
	}
	k0 := key(base)
	same := base
	same.ID, same.Dir, same.MAC, same.Kernel, same.Initramfs = "b", "/elsewhere/b", "52:54:00:00:00:0b", "/k2", "/i2"
	same.Disks = []Disk{{Path: by, ReadOnly: true}, {Path: db}}
	same.Volumes = []Volume{{Tag: "vol0", HostPath: "/home/b"}}
	if key(same) != k0 {
		t.Error("per-box values (id, dirs, paths, MAC) changed the key")
	}
	for name, mod := range map[string]func(*VMConfig){
		"cpus":    func(c *VMConfig) { c.CPUs = 3 },
		"memory":  func(c *VMConfig) { c.MemoryMB = 1024 },
		"network": func(c *VMConfig) { c.Network = false },
		"disk ro": func(c *VMConfig) { c.Disks = []Disk{{Path: bx}, {Path: da}} },
		"disks":   func(c *VMConfig) { c.Disks = c.Disks[:1] },
		// The guest keeps the capacity its template probed.
		"base size": func(c *VMConfig) { c.Disks = []Disk{{Path: disk("base-z", 512<<20), ReadOnly: true}, {Path: da}} },
		"volumes":   func(c *VMConfig) { c.Volumes = nil },
		"volume ro": func(c *VMConfig) { c.Volumes = []Volume{{Tag: "vol0", HostPath: "/h", ReadOnly: true}} },
		"cmdline":   func(c *VMConfig) { c.Cmdline += " boxrun.debug=1" },
		"accel":     func(c *VMConfig) {},
	} {
		c := base
		qq := q
		if name == "accel" {
			kvm := !KVMAvailable()
			qq = &QEMU{KVM: &kvm}
		}
		mod(&c)
		k, f, err := qq.TemplateKey(c)
		if err != nil {
			t.Fatal(err)
		}
		if k == strings.Fields(k0)[0] || (f == strings.Fields(k0)[2] && name != "accel") {
			t.Errorf("%s did not change the key and the family", name)
		}
	}
}

// A template VM's RAM is a shared file mapping; a restored VM's is a
// private (copy-on-write) mapping of the same file, loaded with -incoming.
func TestQEMUSnapshotArgs(t *testing.T) {
	q := &QEMU{}
	cfg := VMConfig{ID: "a", CPUs: 1, MemoryMB: 256, Kernel: "/k", Initramfs: "/i"}
	cfg.memFile, cfg.memShared = "/t/ram", true
	args := strings.Join(q.Args(cfg), " ")
	if !strings.Contains(args, "memory-backend-file,id=ram0,size=256M,mem-path=/t/ram,share=on") ||
		!strings.Contains(args, "memory-backend=ram0") || strings.Contains(args, "-incoming") {
		t.Errorf("template args: %s", args)
	}
	cfg.memShared = false
	cfg.incoming = os.Stdin
	args = strings.Join(q.Args(cfg), " ")
	if !strings.Contains(args, "share=off") || !strings.Contains(args, "-incoming defer") {
		t.Errorf("restore args: %s", args)
	}
	if !strings.Contains(args, "-qmp unix:qmp.sock,server=on,wait=off") {
		t.Errorf("no QMP socket: %s", args)
	}
}
