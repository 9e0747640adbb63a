// Package disk makes the disks a box boots with: one read-only ext4 base
// disk per image, shared by every box of that image, and one sparse writable
// disk per box. The guest joins them with overlayfs (base below, box disk
// above), so nothing a box writes ever reaches the shared base.
package disk

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/boxrun/boxrun/errdefs"
)

// Bases builds and caches base disks in Dir.
type Bases struct {
	Dir string
	// Owners, when set, gives the owner of every path of the tree to build
	// from (by absolute path; paths it does not list are root's): the
	// owners the files on the host do not have because the caller could
	// not chown them (an engine that is not root). They are written into
	// the disk after mke2fs, with debugfs.
	Owners func(ctx context.Context, key string) (map[string]Owner, error)

	mu       sync.Mutex
	building map[string]*sync.Mutex
}

// Path is where the base disk for key (an image ID) lives once built.
func (b *Bases) Path(key string) string { return filepath.Join(b.Dir, key+".ext4") }

// Ensure returns the base disk for key, building it from the directory tree
// that mount provides when it is not cached yet. Concurrent calls for one key
// build once; the file appears atomically, so a crash mid-build leaves no
// half-written base disk that a later box could boot from.
func (b *Bases) Ensure(ctx context.Context, key string, mount func() (rootfs string, unmount func(), err error)) (string, error) {
	path := b.Path(key)
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	b.mu.Lock()
	if b.building == nil {
		b.building = map[string]*sync.Mutex{}
	}
	l := b.building[key]
	if l == nil {
		l = &sync.Mutex{}
		b.building[key] = l
	}
	b.mu.Unlock()
	l.Lock()
	defer l.Unlock()
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	// Another engine process may be building the same base: take a file lock.
	if err := os.MkdirAll(b.Dir, 0o700); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}

	rootfs, unmount, err := mount()
	if err != nil {
		return "", err
	}
	defer unmount()
	// Not root (Owners set): mke2fs reads the tree as its owner, who may
	// lack the read permission on a file (an image's 0000 /etc/shadow) or a
	// directory. Those get it for the build, and their modes back after,
	// in the tree and in the disk.
	var modes map[string]uint32
	if b.Owners != nil {
		// One such build at a time: two images on one top layer read
		// the same tree, and one's restore must not close what the
		// other's mke2fs is reading.
		ownersBuild.Lock()
		defer ownersBuild.Unlock()
		var restore func()
		modes, restore, err = makeReadable(rootfs)
		defer restore()
		if err != nil {
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "read image rootfs")
		}
	}
	size, inodes, err := treeSize(rootfs)
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "measure image rootfs")
	}
	// ext4 needs room for its metadata beyond the file data: inodes, block
	// rounding, directories. 25% + 32 MiB covers small and large images.
	size = size + size/4 + 32<<20
	tmp := path + ".tmp"
	os.Remove(tmp)
	// No journal: the base is never written after this.
	// mke2fs sizes its inode table by bytes; images of many small files
	// (node_modules) need more inodes than that, so say how many.
	if err := mkfs(ctx, tmp, size, "-d", rootfs, "-N", strconv.FormatInt(inodes+inodes/4+1024, 10),
		"-L", "boxbase", "-O", "^has_journal", "-m", "0", "-E", "root_owner=0:0"); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if b.Owners != nil {
		owners, err := b.Owners(ctx, key)
		if err == nil {
			err = setOwners(ctx, tmp, rootfs, owners, modes)
		}
		if err != nil {
			os.Remove(tmp)
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "owners of the base disk")
		}
	}
	// The file (not the file system) grows to its size class: sparse and
	// read-only, it costs nothing, and bases of one class share the warm
	// start's templates, whose keys count the disks' sizes (a restored
	// guest keeps the capacity its template probed).
	if err := os.Truncate(tmp, SizeClass(size)); err != nil {
		os.Remove(tmp)
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "size the base disk")
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return path, nil
}

// minSizeClass is the smallest base disk: most images' file systems fit.
const minSizeClass = 256 << 20

// SizeClass is the size of a base disk whose file system takes size
// bytes: the next power of two, at least minSizeClass.
func SizeClass(size int64) int64 {
	c := int64(minSizeClass)
	for c < size {
		c <<= 1
	}
	return c
}

// makeReadable gives its owner read (and, for directories, search)
// permission on every file of the tree that lacks it, and returns their
// full modes (st_mode) by path, with a func that puts them back.
func makeReadable(root string) (map[string]uint32, func(), error) {
	modes := map[string]uint32{}
	restore := func() {
		// Deepest first: a directory gets its mode back after its files.
		paths := make([]string, 0, len(modes))
		for p := range modes {
			paths = append(paths, p)
		}
		sort.Sort(sort.Reverse(sort.StringSlice(paths)))
		for _, p := range paths {
			os.Chmod(p, fs.FileMode(modes[p]&0o7777)|modeBits(modes[p]))
		}
	}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type()&fs.ModeSymlink != 0 || !(d.IsDir() || d.Type().IsRegular()) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		need := uint32(0o400)
		if d.IsDir() {
			need = 0o500
		}
		if st.Mode&need == need {
			return nil
		}
		modes[p] = st.Mode
		return os.Chmod(p, info.Mode().Perm()|fs.FileMode(need)|(info.Mode()&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)))
	})
	return modes, restore, err
}

// modeBits turns st_mode's setuid, setgid and sticky bits into FileMode's.
func modeBits(m uint32) fs.FileMode {
	var f fs.FileMode
	if m&syscall.S_ISUID != 0 {
		f |= fs.ModeSetuid
	}
	if m&syscall.S_ISGID != 0 {
		f |= fs.ModeSetgid
	}
	if m&syscall.S_ISVTX != 0 {
		f |= fs.ModeSticky
	}
	return f
}

// lookSbin finds an e2fsprogs tool in PATH, else in /usr/sbin and /sbin:
// an ordinary user's PATH often lacks them.
func lookSbin(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p, err2 := exec.LookPath(filepath.Join(dir, name)); err2 == nil {
			return p, nil
		}
	}
	return "", err
}

// ownersBuild serialises the builds that open up a tree (makeReadable).
var ownersBuild sync.Mutex

// Owner is a file's owner; for a device node the tree lacks (an ordinary
// user cannot make one), also what it is: it is made in the disk.
type Owner struct {
	UID, GID     int
	Device       byte // 'c' or 'b'; 0: not a device
	Major, Minor int64
	Mode         int64 // permission bits (with setuid, setgid, sticky); -1: leave as in the tree
}

// setOwners gives every file of the ext4 image img built from rootfs the
// owner that owners says (root's when not listed), where mke2fs gave it
// another (the host file's): one debugfs run, set_inode_field per file.
func setOwners(ctx context.Context, img, rootfs string, owners map[string]Owner, modes map[string]uint32) error {
	var script strings.Builder
	expected := map[string]bool{} // what debugfs echoes of a command that worked
	line := func(cmd string) {
		script.WriteString(cmd + "\n")
		expected["debugfs: "+cmd] = true
	}
	// Device nodes go only into real directories of the tree: compare
	// against the tree's own resolved path (the data dir may sit behind
	// a symlink, /home on Fedora Atomic).
	realRoot, err := filepath.EvalSymlinks(rootfs)
	if err != nil {
		return err
	}
	n := 0
	err = filepath.WalkDir(rootfs, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(rootfs, p)
		if err != nil || rel == "." {
			return err // the root: mke2fs's root_owner
		}
		name := "/" + filepath.ToSlash(rel)
		want, listed := owners[name]
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		// The mode: the image's (its tar header), whatever the tree says
		// now (makeReadable may have opened it, an earlier build that
		// crashed may not have put it back); else the one makeReadable
		// recorded. A symlink's mode means nothing.
		var mode uint32
		fixMode := false
		if d.Type()&fs.ModeSymlink == 0 {
			if listed && want.Mode >= 0 && uint32(want.Mode)&0o7777 != st.Mode&0o7777 {
				mode, fixMode = st.Mode&syscall.S_IFMT|uint32(want.Mode)&0o7777, true
			} else if m, ok := modes[p]; ok && !listed {
				mode, fixMode = m, true
			}
		}
		if int(st.Uid) == want.UID && int(st.Gid) == want.GID && !fixMode {
			return nil
		}
		if !debugfsName(name) {
			return fmt.Errorf("cannot set the owner of %q (a quote, backslash or control character in its name)", name)
		}
		line(fmt.Sprintf("sif \"%s\" uid %d", name, want.UID))
		line(fmt.Sprintf("sif \"%s\" gid %d", name, want.GID))
		if fixMode {
			line(fmt.Sprintf("sif \"%s\" mode 0%o", name, mode))
		}
		n++
		return nil
	})
	if err != nil {
		return err
	}
	// Device nodes the tree lacks, in path order (parents exist).
	var devs []string
	for name, o := range owners {
		if o.Device == 'c' || o.Device == 'b' {
			host := filepath.Join(rootfs, filepath.FromSlash(name))
			if _, err := os.Lstat(host); !os.IsNotExist(err) {
				continue
			}
			// Its directory must be one in the tree, not a symlink: the
			// node goes where the image put it, nowhere else.
			if st, err := os.Lstat(filepath.Dir(host)); err != nil || !st.IsDir() {
				continue
			}
			rel, _ := filepath.Rel(rootfs, filepath.Dir(host))
			if real, err := filepath.EvalSymlinks(filepath.Dir(host)); err != nil || real != filepath.Join(realRoot, rel) {
				continue
			}
			devs = append(devs, name)
		}
	}
	sort.Strings(devs)
	for _, name := range devs {
		o := owners[name]
		if !debugfsName(name) {
			return fmt.Errorf("cannot make the device %q (a quote, backslash or control character in its name)", name)
		}
		dir, base := path.Split(name)
		typ := uint32(syscall.S_IFCHR)
		if o.Device == 'b' {
			typ = syscall.S_IFBLK
		}
		line(fmt.Sprintf("cd \"%s\"", path.Clean(dir)))
		line(fmt.Sprintf("mknod \"%s\" %c %d %d", base, o.Device, o.Major, o.Minor))
		line("cd /")
		line(fmt.Sprintf("sif \"%s\" uid %d", name, o.UID))
		line(fmt.Sprintf("sif \"%s\" gid %d", name, o.GID))
		line(fmt.Sprintf("sif \"%s\" mode 0%o", name, typ|uint32(o.Mode&0o7777)))
		n++
	}
	if n == 0 {
		return nil
	}
	f, err := os.CreateTemp(filepath.Dir(img), ".owners-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(script.String()); err != nil {
		f.Close()
		return err
	}
	f.Close()
	bin, err := lookSbin("debugfs")
	if err != nil {
		return fmt.Errorf("debugfs not found (install e2fsprogs): %w", err)
	}
	out, err := exec.CommandContext(ctx, bin, "-w", "-f", f.Name(), img).CombinedOutput()
	if err != nil {
		return fmt.Errorf("debugfs: %v: %s", err, out)
	}
	// debugfs reports a failed command on its output and exits 0: a line
	// that is not its banner, the echo of one of our commands or mknod's
	// inode number is a failure, and every command must have been echoed.
	seen := 0
	for _, l := range strings.Split(string(out), "\n") {
		switch {
		case l == "", strings.HasPrefix(l, "debugfs 1."), strings.HasPrefix(l, "Allocated inode: "):
		case expected[l]:
			seen++
		default:
			return fmt.Errorf("debugfs: %s", l)
		}
	}
	if want := strings.Count(script.String(), "\n"); seen != want {
		return fmt.Errorf("debugfs ran %d of %d commands", seen, want)
	}
	return nil
}

// debugfsName reports whether debugfs can take name in a quoted argument:
// no quote, backslash or control character (debugfs cuts a line at \r,
// and a line starting with ! would be a shell command).
func debugfsName(name string) bool {
	for _, r := range name {
		if r == '"' || r == '\\' || r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// Remove deletes the base disk for key, if any, with its lock file. The
// caller makes sure no box is being booted from it: a VM that already has
// it open keeps reading the unlinked file.
func (b *Bases) Remove(key string) error {
	err := os.Remove(b.Path(key))
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	os.Remove(b.Path(key) + ".lock")
	return nil
}

// Keys lists the keys of the base disks built in Dir.
func (b *Bases) Keys() ([]string, error) {
	ents, err := os.ReadDir(b.Dir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var keys []string
	for _, e := range ents {
		if k, ok := strings.CutSuffix(e.Name(), ".ext4"); ok && e.Type().IsRegular() {
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// Size is the host space (allocated bytes) that the base disk for key
// takes, 0 if it is not built.
func (b *Bases) Size(key string) int64 {
	u, _ := Usage(b.Path(key))
	return u.Allocated
}

// Space is what a file or a tree takes on the host.
type Space struct {
	Apparent  int64 // sizes as ls shows them (a sparse disk counts whole)
	Allocated int64 // blocks actually allocated (what removing it frees)
}

// Usage adds up the apparent and allocated sizes under path (a file or a
// directory tree; none is zero). It stays on path's file system (a mount
// below it, such as a mounted image, is skipped) and counts a file with
// several hard links once.
func Usage(path string) (Space, error) {
	var u Space
	root, err := os.Lstat(path)
	if os.IsNotExist(err) {
		return u, nil
	}
	if err != nil {
		return u, err
	}
	dev := root.Sys().(*syscall.Stat_t).Dev
	type inode struct{ dev, ino uint64 }
	seen := map[inode]bool{}
	err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) { // removed while walking
				return nil
			}
			return err
		}
		info, err := d.Info()
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		if st.Dev != dev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if st.Nlink > 1 && !d.IsDir() {
			k := inode{uint64(st.Dev), st.Ino}
			if seen[k] {
				return nil
			}
			seen[k] = true
		}
		u.Apparent += info.Size()
		u.Allocated += st.Blocks * 512
		return nil
	})
	return u, err
}

// CreateBoxDisk creates a sparse ext4 disk of sizeGB at path: it takes no
// more host space than the box actually writes.
func CreateBoxDisk(ctx context.Context, path string, sizeGB int) error {
	if sizeGB <= 0 {
		return errdefs.New(errdefs.ValidationError, "disk size must be greater than 0")
	}
	if err := mkfs(ctx, path, int64(sizeGB)<<30, "-L", "boxdata", "-m", "0",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// mkfs makes an ext4 file system in a new sparse file of size bytes.
func mkfs(ctx context.Context, path string, size int64, args ...string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "create disk")
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "size disk")
	}
	bin, err := lookSbin("mkfs.ext4")
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "mkfs.ext4 not found (install e2fsprogs)")
	}
	cmd := exec.CommandContext(ctx, bin, append(append([]string{"-q", "-F", "-t", "ext4"}, args...), path)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "mkfs.ext4 %s: %s", filepath.Base(path), strings.TrimSpace(string(out)))
	}
	return nil
}

// treeSize adds up the apparent size of everything under root, and counts
// its entries.
func treeSize(root string) (total, entries int64, err error) {
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		entries++
		info, err := d.Info()
		if err != nil {
			return err
		}
		// Round each file up to a 4 KiB block, as ext4 stores it.
		total += (info.Size() + 4095) &^ 4095
		if d.IsDir() {
			total += 4096
		}
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("walk %s: %w", root, err)
	}
	return total, entries, nil
}
