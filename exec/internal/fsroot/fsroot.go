// Package fsroot resolves paths inside a directory tree as if it were the
// root of the filesystem, the way a chroot would, without leaving it: the
// box root for the agent, the destination directory for the host's Untar.
package fsroot

import (
	"errors"
	"io"
	"os"
	"path"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Root resolves paths inside a directory tree as if it were "/": "..",
// absolute paths and symlinks (absolute ones included) are interpreted
// relative to the tree and can never lead out of it, like a chroot.
//
// Resolution uses openat2(RESOLVE_IN_ROOT) where the kernel has it (5.6+)
// and otherwise an equivalent walk over file descriptors, one component at
// a time with O_NOFOLLOW. Either way the result is a file descriptor, so a
// path that changes under us (a box process swapping a directory for a
// symlink) cannot make us act outside the tree: callers act on the returned
// descriptor, or on a single final component relative to it without
// following symlinks.
type Root struct {
	path string
	fd   int // O_PATH|O_DIRECTORY
}

// noOpenat2 is set once openat2 is found missing (or filtered by seccomp),
// and by tests to exercise the fallback.
var noOpenat2 atomic.Bool

// ForceWalk makes every resolution use the userspace walk instead of
// openat2 (for tests of the fallback).
func ForceWalk(on bool) { noOpenat2.Store(on) }

// maxSymlinks matches the kernel's limit on symlinks followed per lookup.
const maxSymlinks = 40

// Open opens the directory dir as a root.
func Open(dir string) (*Root, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &Root{path: dir, fd: fd}, nil
}

// Close releases the root's descriptor.
func (r *Root) Close() error { return unix.Close(r.fd) }

// Stat is fstat(2) of the root's directory.
func (r *Root) Stat(st *unix.Stat_t) error { return unix.Fstat(r.fd, st) }

// Path is the directory the root was opened at.
func (r *Root) Path() string { return r.path }

// OpenFile resolves p inside the root, following every symlink (within
// the root), and opens the result with flags (O_CLOEXEC is implied). It
// returns a raw descriptor and a bare errno, so callers can compare it.
func (r *Root) OpenFile(p string, flags int) (int, error) {
	if !noOpenat2.Load() {
		how := unix.OpenHow{
			Flags:   uint64(flags | unix.O_CLOEXEC),
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
		}
		for i := 0; ; i++ {
			fd, err := unix.Openat2(r.fd, p, &how)
			if err == unix.EAGAIN && i < 32 {
				continue // a concurrent rename raced with "..": the kernel asks us to retry
			}
			if err == unix.ENOSYS || err == unix.EPERM && i == 0 && r.probeOpenat2() {
				noOpenat2.Store(true)
				break
			}
			return fd, err
		}
	}
	return walkInRoot(r.fd, p, flags)
}

// probeOpenat2 tells an EPERM from a seccomp filter that denies openat2 as
// a whole (true) from a real permission error (false).
func (r *Root) probeOpenat2() bool {
	fd, err := unix.Openat2(r.fd, ".", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC})
	if err == nil {
		unix.Close(fd)
		return false
	}
	return err == unix.EPERM || err == unix.ENOSYS
}

func splitPath(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}

// walkInRoot is the userspace equivalent of openat2(RESOLVE_IN_ROOT). It
// keeps a descriptor for every directory on the way down, so ".." pops a
// descriptor instead of asking the kernel for a parent (which could lie
// outside the root after a rename).
func walkInRoot(rootfd int, p string, flags int) (int, error) {
	var stack []int
	defer func() {
		for _, fd := range stack {
			unix.Close(fd)
		}
	}()
	cur := func() int {
		if len(stack) == 0 {
			return rootfd
		}
		return stack[len(stack)-1]
	}
	comps := splitPath(p)
	links := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		if c == ".." {
			if len(stack) > 0 {
				unix.Close(stack[len(stack)-1])
				stack = stack[:len(stack)-1]
			}
			continue
		}
		fd, err := unix.Openat(cur(), c, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			if err == unix.ENOENT && len(comps) == 0 && flags&unix.O_CREAT != 0 {
				return unix.Openat(cur(), c, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o666)
			}
			return -1, err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return -1, err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			links++
			if links > maxSymlinks {
				unix.Close(fd)
				return -1, unix.ELOOP
			}
			target, err := readlinkFd(fd)
			unix.Close(fd)
			if err != nil {
				return -1, err
			}
			if strings.HasPrefix(target, "/") {
				for _, d := range stack {
					unix.Close(d)
				}
				stack = nil
			}
			comps = append(splitPath(target), comps...)
			continue
		case unix.S_IFDIR:
			stack = append(stack, fd)
			continue
		}
		unix.Close(fd)
		if len(comps) > 0 {
			return -1, unix.ENOTDIR
		}
		// The final component is not a directory: open it by name, without
		// following, so a swap for a symlink fails instead of escaping.
		return unix.Openat(cur(), c, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	return unix.Openat(cur(), ".", flags|unix.O_CLOEXEC, 0)
}

func readlinkFd(fd int) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(fd, "", buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

// Clean returns p as a clean absolute path ("/" + p when relative): ".."
// cannot climb above "/".
func Clean(p string) string { return path.Clean("/" + p) }

// Parent resolves the directory of p inside the root and returns it (as an
// O_PATH descriptor) with the final component of p, which is "" when p is
// the root itself. The final component is not resolved: callers act on it
// with *at calls that do not follow symlinks.
func (r *Root) Parent(p string) (int, string, error) {
	p = Clean(p)
	if p == "/" {
		fd, err := unix.Openat(r.fd, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		return fd, "", err
	}
	fd, err := r.OpenFile(path.Dir(p), unix.O_PATH|unix.O_DIRECTORY)
	return fd, path.Base(p), err
}

// MkdirAll creates directory p and its missing parents inside the root.
func (r *Root) MkdirAll(p string, mode uint32) error {
	fd, err := r.OpenFile(p, unix.O_PATH|unix.O_DIRECTORY)
	if err == nil {
		unix.Close(fd)
		return nil
	}
	cur := "/"
	for _, c := range splitPath(Clean(p)) {
		next := path.Join(cur, c)
		fd, err := r.OpenFile(next, unix.O_PATH|unix.O_DIRECTORY)
		if err == unix.ENOENT {
			// Create the component in its resolved parent, then resolve the
			// whole prefix again: each step stays inside the root even if
			// the tree changes between the calls.
			pfd, perr := r.OpenFile(cur, unix.O_PATH|unix.O_DIRECTORY)
			if perr != nil {
				return &os.PathError{Op: "mkdir", Path: cur, Err: perr}
			}
			err = unix.Mkdirat(pfd, c, mode)
			unix.Close(pfd)
			if err != nil && err != unix.EEXIST {
				return &os.PathError{Op: "mkdir", Path: next, Err: err}
			}
			fd, err = r.OpenFile(next, unix.O_PATH|unix.O_DIRECTORY)
		}
		if err != nil {
			return &os.PathError{Op: "mkdir", Path: next, Err: err}
		}
		unix.Close(fd)
		cur = next
	}
	return nil
}

// ReadFile reads a (small) file inside the root.
func (r *Root) ReadFile(p string, limit int64) ([]byte, error) {
	fd, err := r.OpenFile(p, unix.O_RDONLY|unix.O_NOCTTY|unix.O_NONBLOCK)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, &os.PathError{Op: "read", Path: p, Err: errors.New("not a regular file")}
	}
	if st.Size > limit {
		return nil, &os.PathError{Op: "read", Path: p, Err: errors.New("file too large")}
	}
	buf := make([]byte, st.Size)
	n, err := io.ReadFull(f, buf)
	if err == io.ErrUnexpectedEOF {
		err = nil // the file shrank while we read it
	}
	return buf[:n], err
}
