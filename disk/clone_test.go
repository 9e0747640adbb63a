package disk

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// A clone holds the same bytes at the same offsets, has the same size,
// and takes about the space of the source's data, not of its size.
func TestCloneDiskKeepsHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	chunks := map[int64][]byte{
		0:              bytes.Repeat([]byte("a"), 4096),
		40 << 20:       bytes.Repeat([]byte("b"), 3<<20),
		size - 8192:    bytes.Repeat([]byte("c"), 8192),
		(7 << 20) + 17: []byte("unaligned"),
	}
	for off, b := range chunks {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	dst := filepath.Join(dir, "dst")
	if err := CloneDisk(src, dst); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(src)
	if !bytes.Equal(got, want) {
		t.Fatal("the clone's bytes differ from the source's")
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if st.Size != size {
		t.Errorf("clone's size %d, want %d", st.Size, size)
	}
	if used := st.Blocks * 512; used > 8<<20 {
		t.Errorf("the clone takes %d bytes of a %d-byte file with ~3 MiB of data: holes were filled", used, size)
	}
	// dst exists: refused, and left as it is.
	os.WriteFile(dst, []byte("mine"), 0o600)
	if err := CloneDisk(src, dst); err == nil {
		t.Error("cloned over an existing file")
	}
	if b, _ := os.ReadFile(dst); string(b) != "mine" {
		t.Errorf("a refused clone changed the existing file: %q", b)
	}
	// A source that is missing leaves nothing.
	if err := CloneDisk(filepath.Join(dir, "nope"), filepath.Join(dir, "dst2")); err == nil {
		t.Error("cloned a missing file")
	}
	if _, err := os.Stat(filepath.Join(dir, "dst2")); !os.IsNotExist(err) {
		t.Errorf("a failed clone left its destination: %v", err)
	}
}

// Without reflinks nor copy_file_range (EXDEV: across file systems since
// Linux 5.19; EOPNOTSUPP on some), the process copies each extent itself;
// holes stay holes. The kernel's copies are failed here, whatever the
// file system and kernel.
func TestCloneDiskWithoutKernelCopies(t *testing.T) {
	for _, errno := range []error{unix.EXDEV, unix.EOPNOTSUPP, unix.ENOSYS, unix.EINVAL} {
		calls := 0
		fileClone = func(int, int) error { return unix.EOPNOTSUPP }
		copyFileRange = func(int, *int64, int, *int64, int, int) (int, error) { calls++; return 0, errno }
		dir := t.TempDir()
		src := filepath.Join(dir, "src")
		f, _ := os.Create(src)
		f.Truncate(24 << 20)
		f.WriteAt(bytes.Repeat([]byte("y"), 3<<20+7), 9<<20)
		f.WriteAt([]byte("tail"), 24<<20-4)
		f.Close()
		dst := filepath.Join(dir, "dst")
		err := CloneDisk(src, dst)
		fileClone, copyFileRange = unix.IoctlFileClone, unix.CopyFileRange
		if err != nil {
			t.Fatalf("%v: %v", errno, err)
		}
		got, _ := os.ReadFile(dst)
		want, _ := os.ReadFile(src)
		if !bytes.Equal(got, want) || calls != 1 {
			t.Fatalf("%v: bytes equal %v, copy_file_range tried %d times (want once)", errno, bytes.Equal(got, want), calls)
		}
		var st syscall.Stat_t
		syscall.Stat(dst, &st)
		if used := st.Blocks * 512; used > 6<<20 {
			t.Errorf("%v: the clone takes %d bytes for ~3 MiB of data", errno, used)
		}
	}
	// Another error is the copy's failure: reported, nothing left.
	copyFileRange = func(int, *int64, int, *int64, int, int) (int, error) { return 0, unix.EIO }
	defer func() { copyFileRange = unix.CopyFileRange }()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.WriteFile(src, []byte("data"), 0o600)
	if err := CloneDisk(src, filepath.Join(dir, "dst")); err == nil {
		t.Fatal("EIO from copy_file_range: no error")
	}
	if _, err := os.Stat(filepath.Join(dir, "dst")); !os.IsNotExist(err) {
		t.Fatalf("a failed clone left its file: %v", err)
	}
}

// Across file systems (copy_file_range refuses: EXDEV, on Linux 5.19 and
// later) a clone works too.
func TestCloneDiskAcrossFileSystems(t *testing.T) {
	shm, err := os.MkdirTemp("/dev/shm", "clone-")
	if err != nil {
		t.Skipf("no /dev/shm: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	src := filepath.Join(t.TempDir(), "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(32 << 20)
	f.WriteAt(bytes.Repeat([]byte("x"), 3<<20+5), 5<<20)
	f.Close()
	var a, b syscall.Statfs_t
	syscall.Statfs(filepath.Dir(src), &a)
	syscall.Statfs(shm, &b)
	if a.Type == b.Type && a.Fsid == b.Fsid {
		t.Skip("the test's temp dir is on /dev/shm's file system")
	}
	dst := filepath.Join(shm, "dst")
	if err := CloneDisk(src, dst); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(dst)
	want, _ := os.ReadFile(src)
	if !bytes.Equal(got, want) {
		t.Fatal("the clone's bytes differ")
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if used := st.Blocks * 512; used > 6<<20 {
		t.Errorf("the clone takes %d bytes for ~3 MiB of data", used)
	}
}

// A box disk cloned from a made one is a file system e2fsck finds clean.
func TestCloneDiskOfBoxDisk(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "box.ext4")
	if err := CreateBoxDisk(context.Background(), src, 1); err != nil {
		t.Skipf("mkfs.ext4: %v", err)
	}
	dst := filepath.Join(dir, "clone.ext4")
	if err := CloneDisk(src, dst); err != nil {
		t.Fatal(err)
	}
	// Its superblock and first group's metadata.
	head := func(p string) []byte {
		f, _ := os.Open(p)
		defer f.Close()
		b := make([]byte, 4<<20)
		f.ReadAt(b, 0)
		return b
	}
	if !bytes.Equal(head(src), head(dst)) {
		t.Fatal("clone differs")
	}
	if fsck, err := lookSbin("e2fsck"); err == nil {
		if out, err := exec.Command(fsck, "-fn", dst).CombinedOutput(); err != nil {
			t.Errorf("e2fsck -fn of the clone: %v\n%s", err, out)
		}
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if st.Size != 1<<30 || st.Blocks*512 > 16<<20 {
		t.Errorf("clone of a 1 GiB box disk: size %d, %d bytes used", st.Size, st.Blocks*512)
	}
}
