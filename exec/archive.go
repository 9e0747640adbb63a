package exec

import (
	"archive/tar"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

// TarPath writes a tar of the host path src (a file, directory tree,
// symlink, ...) to w, with entries rooted at name (base(src) when name is
// ""). Symlinks are archived as links, never followed. Modes, mtimes
// (seconds), symlink targets, numeric uid/gid, hardlinks within the tree and
// device nodes are kept; sockets are skipped.
func TarPath(w io.Writer, src, name string) error {
	src = filepath.Clean(src)
	if name == "" {
		name = filepath.Base(src)
	}
	dir, base := filepath.Split(src)
	if base == "" || src == "/" {
		dir, base = "/", "."
	}
	if dir == "" {
		dir = "."
	}
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dfd)
	return writeTar(w, dfd, base, name)
}

// writeTar archives the entry base of directory dfd under the name name.
// Nothing is written when base cannot be found, so the caller can still
// report the error cleanly.
func writeTar(w io.Writer, dfd int, base, name string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	a := &archiver{tw: tw, links: make(map[fileID]string)}
	if err := a.add(dfd, base, path.Clean(filepath.ToSlash(name)), &st); err != nil {
		return err
	}
	return tw.Close()
}

type fileID struct{ dev, ino uint64 }

type archiver struct {
	tw    *tar.Writer
	links map[fileID]string // first name of each multiply-linked file
}

// add archives entry base of directory dfd, whose lstat is st, as name. It
// works on descriptors with O_NOFOLLOW throughout, so a symlink planted in
// the tree is archived as a symlink and never read through.
func (a *archiver) add(dfd int, base, name string, st *unix.Stat_t) error {
	hdr := &tar.Header{
		Name:    name,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, 0),
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return a.addFile(dfd, base, hdr, st)
	case unix.S_IFDIR:
		return a.addDir(dfd, base, hdr)
	case unix.S_IFLNK:
		target, err := readlinkAt(dfd, base)
		if err != nil {
			return err
		}
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = target
	case unix.S_IFCHR, unix.S_IFBLK:
		hdr.Typeflag = tar.TypeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor = int64(unix.Major(st.Rdev))
		hdr.Devminor = int64(unix.Minor(st.Rdev))
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		return nil // sockets cannot be archived
	}
	return a.tw.WriteHeader(hdr)
}

func (a *archiver) addFile(dfd int, base string, hdr *tar.Header, st *unix.Stat_t) error {
	id := fileID{st.Dev, st.Ino}
	if st.Nlink > 1 {
		if first, ok := a.links[id]; ok {
			hdr.Typeflag = tar.TypeLink
			hdr.Linkname = first
			return a.tw.WriteHeader(hdr)
		}
		a.links[id] = hdr.Name
	}
	// O_NONBLOCK: if the file was swapped for a FIFO since the lstat, the
	// open must not hang; it is checked below.
	fd, err := unix.Openat(dfd, base, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: hdr.Name, Err: err}
	}
	f := os.NewFile(uintptr(fd), hdr.Name)
	defer f.Close()
	var fst unix.Stat_t
	if err := unix.Fstat(fd, &fst); err != nil {
		return err
	}
	if fst.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("%s: changed type while archiving", hdr.Name)
	}
	hdr.Typeflag = tar.TypeReg
	hdr.Size = fst.Size
	hdr.Mode = int64(fst.Mode & 0o7777)
	if err := a.tw.WriteHeader(hdr); err != nil {
		return err
	}
	n, err := io.Copy(a.tw, io.LimitReader(f, fst.Size))
	if err != nil {
		return err
	}
	if n < fst.Size {
		// The file shrank while we read it: pad, so the archive stays valid.
		if _, err := io.CopyN(a.tw, zeroReader{}, fst.Size-n); err != nil {
			return err
		}
	}
	return nil
}

func (a *archiver) addDir(dfd int, base string, hdr *tar.Header) error {
	hdr.Typeflag = tar.TypeDir
	if !strings.HasSuffix(hdr.Name, "/") {
		hdr.Name += "/"
	}
	if err := a.tw.WriteHeader(hdr); err != nil {
		return err
	}
	fd, err := unix.Openat(dfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: hdr.Name, Err: err}
	}
	d := os.NewFile(uintptr(fd), hdr.Name)
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return err
	}
	slices.Sort(names)
	prefix := strings.TrimSuffix(hdr.Name, "/")
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if err == unix.ENOENT {
				continue // removed while we archive
			}
			return err
		}
		child := n
		if prefix != "." {
			child = prefix + "/" + n
		}
		if err := a.add(fd, n, child, &st); err != nil {
			return err
		}
	}
	return nil
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func readlinkAt(dfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

// Untar extracts the tar stream r under root/dir, creating dir (and its
// parents) when missing. Every path is resolved inside root as if root were
// "/": entry names are cleaned as absolute paths below dir, and symlinks
// (from the archive or already on disk) are followed only within root, so
// nothing can be written outside root. Hardlinks may only point at files
// inside root. Permission bits, mtimes and symlinks are kept; ownership
// and setuid/setgid bits are not (the files belong to the caller): an
// untrusted archive must not plant setuid-root programs on the host, nor
// device nodes, which are skipped.
func Untar(r io.Reader, root, dir string) error {
	fr, err := fsroot.Open(root)
	if err != nil {
		return err
	}
	defer fr.Close()
	return untar(r, fr, dir, untarOptions{})
}

type untarOptions struct {
	devices bool // create device nodes (the agent, inside the VM)
	owners  bool // restore ownership and setuid/setgid bits when root (the agent)
	log     *slog.Logger
}

type dirMeta struct {
	path string
	hdr  *tar.Header
}

func untar(r io.Reader, fr *fsroot.Root, dir string, o untarOptions) error {
	dir = fsroot.Clean(dir)
	if err := fr.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// Ownership and setuid/setgid bits are only restored for the agent
	// (inside the VM). On the host the archive comes from the untrusted
	// guest: its files belong to whoever copies them out, never setuid.
	asRoot := os.Geteuid() == 0 && o.owners
	var dirs []dirMeta
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		// Cleaning "/"+name keeps ".." and absolute names below dir.
		rel := fsroot.Clean(hdr.Name)
		if rel == "/" {
			continue // the archive's own root ("./"): leave dir as it is
		}
		target := path.Join(dir, rel)
		if err := fr.MkdirAll(path.Dir(target), 0o755); err != nil {
			return err
		}
		pfd, base, err := fr.Parent(target)
		if err != nil {
			return &os.PathError{Op: "open", Path: path.Dir(target), Err: err}
		}
		err = extractEntry(fr, tr, hdr, pfd, base, dir, asRoot, o)
		unix.Close(pfd)
		if err != nil {
			return fmt.Errorf("extract %s: %w", hdr.Name, err)
		}
		if hdr.Typeflag == tar.TypeDir {
			dirs = append(dirs, dirMeta{path: target, hdr: hdr})
		}
	}
	// Directory modes and mtimes last: extracting children changes the
	// mtime, and a read-only mode would stop the extraction.
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := fixDir(fr, dirs[i].path, dirs[i].hdr, asRoot); err != nil {
			return fmt.Errorf("extract %s: %w", dirs[i].hdr.Name, err)
		}
	}
	return nil
}

func entryMode(hdr *tar.Header, asRoot bool) uint32 {
	mode := uint32(hdr.Mode) & 0o7777
	if !asRoot {
		mode &^= unix.S_ISUID | unix.S_ISGID
	}
	return mode
}

// clearEntry removes whatever is at base (not following symlinks) so a new
// entry can take its place; a directory only when it is empty.
func clearEntry(pfd int, base string) error {
	err := unix.Unlinkat(pfd, base, 0)
	if err == unix.EISDIR {
		err = unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR)
	}
	if err == unix.ENOENT {
		return nil
	}
	return err
}

func extractEntry(fr *fsroot.Root, tr io.Reader, hdr *tar.Header, pfd int, base, dir string, asRoot bool, o untarOptions) error {
	mode := entryMode(hdr, asRoot)
	mtime := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	switch hdr.Typeflag {
	case tar.TypeDir:
		var st unix.Stat_t
		err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return nil
		}
		if err == nil {
			if err := clearEntry(pfd, base); err != nil {
				return err
			}
		}
		return unix.Mkdirat(pfd, base, 0o700)

	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse:
		if err := clearEntry(pfd, base); err != nil {
			return err
		}
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(fd), base)
		defer f.Close()
		if err := copySparse(f, tr); err != nil {
			return err
		}
		if asRoot {
			if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
		}
		// After the chown, which clears setuid bits.
		if err := unix.Fchmod(fd, mode); err != nil {
			return err
		}
		return unix.UtimesNanoAt(pfd, base, mtime, unix.AT_SYMLINK_NOFOLLOW)

	case tar.TypeSymlink:
		if err := clearEntry(pfd, base); err != nil {
			return err
		}
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return err
		}
		if asRoot {
			if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return err
			}
		}
		return unix.UtimesNanoAt(pfd, base, mtime, unix.AT_SYMLINK_NOFOLLOW)

	case tar.TypeLink:
		// Link names are relative to the archive root, i.e. to dir.
		tfd, tbase, err := fr.Parent(path.Join(dir, fsroot.Clean(hdr.Linkname)))
		if err != nil {
			return &os.PathError{Op: "link", Path: hdr.Linkname, Err: err}
		}
		defer unix.Close(tfd)
		if tbase == "" {
			return &os.PathError{Op: "link", Path: hdr.Linkname, Err: unix.EPERM}
		}
		if err := clearEntry(pfd, base); err != nil {
			return err
		}
		// Flags 0: a symlink target is linked itself, never followed.
		return unix.Linkat(tfd, tbase, pfd, base, 0)

	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		kind := uint32(unix.S_IFIFO)
		var dev uint64
		if hdr.Typeflag != tar.TypeFifo {
			if !o.devices || !asRoot {
				logSkip(o.log, hdr)
				return nil
			}
			kind = unix.S_IFCHR
			if hdr.Typeflag == tar.TypeBlock {
				kind = unix.S_IFBLK
			}
			dev = unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		}
		if err := clearEntry(pfd, base); err != nil {
			return err
		}
		// No chmod afterwards: fchmodat follows symlinks, and a node has no
		// descriptor to fchmod. The mode is applied here, minus the umask.
		if err := unix.Mknodat(pfd, base, kind|mode, int(dev)); err != nil {
			return err
		}
		if asRoot {
			if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return err
			}
		}
		return unix.UtimesNanoAt(pfd, base, mtime, unix.AT_SYMLINK_NOFOLLOW)

	case tar.TypeXGlobalHeader:
		return nil
	default:
		logSkip(o.log, hdr)
		return nil
	}
}

func logSkip(log *slog.Logger, hdr *tar.Header) {
	if log != nil {
		log.Debug("untar: skipping entry", "name", hdr.Name, "type", string(hdr.Typeflag))
	}
}

func fixDir(fr *fsroot.Root, p string, hdr *tar.Header, asRoot bool) error {
	pfd, base, err := fr.Parent(p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return nil // replaced by a later entry
		}
		return err
	}
	defer unix.Close(fd)
	if asRoot {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return err
		}
	}
	if err := unix.Fchmod(fd, entryMode(hdr, asRoot)); err != nil {
		return err
	}
	tv := []unix.Timeval{unix.NsecToTimeval(hdr.ModTime.UnixNano()), unix.NsecToTimeval(hdr.ModTime.UnixNano())}
	return unix.Futimes(fd, tv)
}

// copySparse writes r into the new file f, leaving holes where r has
// blocks of zeros: a sparse file (a disk image, `truncate -s 1T`) copied
// out of a box takes the space its data takes, not its size, on the host.
func copySparse(f *os.File, r io.Reader) error {
	const block = 64 << 10
	buf := make([]byte, block)
	var size int64
	hole := false // the file ends in a hole: its size is set at the end
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if isZero(buf[:n]) {
				if _, err := f.Seek(int64(n), io.SeekCurrent); err != nil {
					return err
				}
				hole = true
			} else {
				if _, err := f.Write(buf[:n]); err != nil {
					return err
				}
				hole = false
			}
			size += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return err
		}
	}
	if hole {
		return f.Truncate(size)
	}
	return nil
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
