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
	// The file has its size class (the templates' keys count it); the
	// file system inside is smaller, and whole.
	if st, err := os.Stat(b.Path("img1")); err != nil || st.Size() != 256<<20 {
		t.Fatalf("base disk: %v, want a file of 256 MiB", err)
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

func TestUsageKeysRemove(t *testing.T) {
	dir := t.TempDir()
	// A sparse file: 64 MiB apparent, 1 MiB allocated.
	f, err := os.Create(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(64 << 20)
	f.WriteAt(make([]byte, 1<<20), 0)
	f.Close()
	os.WriteFile(filepath.Join(dir, "small"), []byte("hello"), 0o644)
	os.Link(filepath.Join(dir, "small"), filepath.Join(dir, "hardlink")) // counted once
	u, err := Usage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if u.Apparent < 64<<20 || u.Apparent > 64<<20+64<<10 {
		t.Errorf("apparent = %d", u.Apparent)
	}
	if u.Allocated < 1<<20 || u.Allocated > 2<<20 {
		t.Errorf("allocated = %d", u.Allocated)
	}
	if u, err := Usage(filepath.Join(dir, "none")); err != nil || u != (Space{}) {
		t.Errorf("Usage of a missing path = %+v, %v", u, err)
	}

	b := &Bases{Dir: filepath.Join(dir, "bases")}
	if keys, err := b.Keys(); err != nil || len(keys) != 0 {
		t.Errorf("Keys of a missing dir = %v, %v", keys, err)
	}
	os.MkdirAll(b.Dir, 0o700)
	for _, n := range []string{"a.ext4", "a.ext4.lock", "b.ext4.tmp", "c.ext4"} {
		os.WriteFile(filepath.Join(b.Dir, n), []byte("x"), 0o600)
	}
	if keys, _ := b.Keys(); strings.Join(keys, ",") != "a,c" {
		t.Errorf("Keys = %v", keys)
	}
	if b.Size("a") <= 0 || b.Size("b") != 0 {
		t.Errorf("Size a = %d, b = %d", b.Size("a"), b.Size("b"))
	}
	if err := b.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if err := b.Remove("a"); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	for _, n := range []string{"a.ext4", "a.ext4.lock"} {
		if _, err := os.Stat(filepath.Join(b.Dir, n)); !os.IsNotExist(err) {
			t.Errorf("%s left: %v", n, err)
		}
	}
}

// Owners (an engine that is not root: the tree on the host is the
// caller's) become the owners in the disk, files not listed become root's,
// and a symlink's owner is its own, not its target's.
func TestBaseTakesOwnersFromTheImage(t *testing.T) {
	needTool(t, "mkfs.ext4")
	needTool(t, "debugfs")
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "home", "app dir"), 0o755)
	os.WriteFile(filepath.Join(src, "home", "app dir", "f"), []byte("x"), 0o640)
	os.Symlink("f", filepath.Join(src, "home", "app dir", "link"))
	os.WriteFile(filepath.Join(src, "unlisted"), []byte("y"), 0o644)
	// Files their owner cannot read: mke2fs reads them all the same, and
	// they keep their modes in the disk and in the tree.
	os.WriteFile(filepath.Join(src, "shadow"), []byte("secret"), 0o644)
	os.Mkdir(filepath.Join(src, "locked"), 0o755)
	os.WriteFile(filepath.Join(src, "locked", "in"), []byte("z"), 0o644)
	os.Chmod(filepath.Join(src, "shadow"), 0)
	os.WriteFile(filepath.Join(src, "leftover"), []byte("l"), 0o400)
	os.Chmod(filepath.Join(src, "locked"), 0o100|os.ModeSticky)
	if os.Geteuid() == 0 {
		// As root, give the tree a non-root owner, as an ordinary user's
		// extraction would have.
		filepath.Walk(src, func(p string, _ os.FileInfo, _ error) error { return os.Lchown(p, 4242, 4242) })
	}
	b := &Bases{Dir: t.TempDir(), Owners: func(ctx context.Context, key string) (map[string]Owner, error) {
		return map[string]Owner{
			"/home":              {UID: 0, GID: 0, Mode: 0o755},
			"/home/app dir":      {UID: 1000, GID: 1000, Mode: 0o755},
			"/home/app dir/f":    {UID: 1000, GID: 70000, Mode: 0o640},
			"/home/app dir/link": {UID: 33, GID: 33},
			"/home/tty0":         {UID: 0, GID: 5, Device: 'c', Major: 4, Minor: 0, Mode: 0o620},
			// The image says 0000; the tree says 0400 (a build that crashed
			// before it put the mode back): the image wins.
			"/leftover": {Mode: 0},
		}, nil
	}}
	p, err := b.Ensure(context.Background(), "img", func() (string, func(), error) { return src, func() {}, nil })
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/home": "0 0", "/home/app dir": "1000 1000", "/home/app dir/f": "1000 70000",
		"/home/app dir/link": "33 33", "/unlisted": "0 0",
	} {
		out, err := exec.Command("debugfs", "-R", `stat "`+path+`"`, p).CombinedOutput()
		if err != nil {
			t.Fatalf("debugfs: %v %s", err, out)
		}
		f := strings.Fields(string(out[strings.Index(string(out), "User:"):]))
		if got := f[1] + " " + f[3]; got != want {
			t.Errorf("%s: owner %s, want %s", path, got, want)
		}
	}
	for path, want := range map[string]string{"/shadow": "0000", "/locked": "01100", "/locked/in": "0644", "/leftover": "0000"} {
		out, _ := exec.Command("debugfs", "-R", `stat "`+path+`"`, p).CombinedOutput()
		if !strings.Contains(strings.Join(strings.Fields(string(out)), " "), "Mode: "+want+" ") {
			t.Errorf("%s: want mode %s in the disk:\n%s", path, want, out)
		}
	}
	// A device node the tree lacks is made in the disk.
	if out, _ := exec.Command("debugfs", "-R", "ls -l /home", p).CombinedOutput(); !strings.Contains(strings.Join(strings.Fields(string(out)), " "), "20620 (3) 0 5 0") {
		t.Errorf("no /home/tty0 character device (4,0) 0620 0:5 in the disk:\n%s", out)
	}
	if out, _ := exec.Command("debugfs", "-R", "cat /shadow", p).CombinedOutput(); !strings.Contains(string(out), "secret") {
		t.Errorf("/shadow's content not in the disk: %s", out)
	}
	for path, want := range map[string]os.FileMode{"shadow": 0, "locked": 0o100 | os.ModeSticky | os.ModeDir} {
		if st, err := os.Stat(filepath.Join(src, path)); err != nil || st.Mode() != want {
			t.Errorf("%s on the host: %v %v, want its mode back (%v)", path, st.Mode(), err, want)
		}
	}
	if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	// A name debugfs cannot take (a quote; a carriage return, at which
	// debugfs would cut the line) fails the build, leaving nothing.
	for _, bad := range []string{`bad"name`, "bad\rname"} {
		os.WriteFile(filepath.Join(src, bad), nil, 0o644)
		if os.Geteuid() == 0 {
			os.Lchown(filepath.Join(src, bad), 4242, 4242)
		}
	}
	if _, err := b.Ensure(context.Background(), "img2", func() (string, func(), error) { return src, func() {}, nil }); err == nil {
		t.Fatal("a name with a quote was accepted")
	}
	if _, err := os.Stat(b.Path("img2")); !os.IsNotExist(err) {
		t.Fatal("a failed build left its disk")
	}
}

func TestDebugfsName(t *testing.T) {
	for name, ok := range map[string]bool{
		"/etc/passwd": true, "/a b/c": true, "/ünï": true,
		`/a"b`: false, `/a\b`: false, "/a\rb": false, "/a\nb": false, "/a\x7fb": false, "/a\x01": false,
	} {
		if debugfsName(name) != ok {
			t.Errorf("debugfsName(%q) = %v, want %v", name, !ok, ok)
		}
	}
}

func TestSizeClass(t *testing.T) {
	for size, want := range map[int64]int64{
		0: 256 << 20, 34 << 20: 256 << 20, 256 << 20: 256 << 20, 256<<20 + 1: 512 << 20, 3 << 30: 4 << 30,
	} {
		if got := SizeClass(size); got != want {
			t.Errorf("SizeClass(%d) = %d, want %d", size, got, want)
		}
	}
}
