package disk

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

func needTool(t *testing.T, name string) {
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed: run scripts/setup.sh (e2fsprogs)", name)
	}
}

func TestBaseBuiltOnceWithContent(t *testing.T) {
	needTool(t, "mkfs.ext4")
	needTool(t, "debugfs")
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "bin"), 0o755)
	os.WriteFile(filepath.Join(src, "bin", "tool"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	os.Symlink("tool", filepath.Join(src, "bin", "alias"))
	os.WriteFile(filepath.Join(src, "secret"), []byte("x"), 0o600)

	b := &Bases{Dir: t.TempDir()}
	var mounts atomic.Int32
	mount := func() (string, func(), error) {
		mounts.Add(1)
		return src, func() {}, nil
	}
	var wg sync.WaitGroup
	paths := make([]string, 4)
	for i := range paths {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p, err := b.Ensure(context.Background(), "img1", mount)
			if err != nil {
				t.Error(err)
			}
			paths[i] = p
		}(i)
	}
	wg.Wait()
	if mounts.Load() != 1 {
		t.Fatalf("base built %d times, want once", mounts.Load())
	}
	for _, p := range paths {
		if p != b.Path("img1") {
			t.Fatalf("path %q", p)
		}
	}
	out, err := exec.Command("debugfs", "-R", "ls -l /bin", b.Path("img1")).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs: %v %s", err, out)
	}
	if !strings.Contains(string(out), "tool") || !strings.Contains(string(out), "alias") || !strings.Contains(string(out), "100755") {
		t.Fatalf("base disk lacks files:\n%s", out)
	}
	if out, err := exec.Command("e2fsck", "-fn", b.Path("img1")).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	if _, err := os.Stat(b.Path("img1") + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("temporary file left behind")
	}
}

func TestBoxDiskIsSparseExt4(t *testing.T) {
	needTool(t, "mkfs.ext4")
	p := filepath.Join(t.TempDir(), "box.ext4")
	if err := CreateBoxDisk(context.Background(), p, 8); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 8<<30 {
		t.Fatalf("size %d", st.Size())
	}
	used := st.Sys().(*syscall.Stat_t).Blocks * 512
	if used > 256<<20 {
		t.Fatalf("box disk uses %d bytes on the host, want sparse", used)
	}
	if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	if err := CreateBoxDisk(context.Background(), filepath.Join(t.TempDir(), "x"), 0); err == nil {
		t.Fatal("size 0 accepted")
	}
}
