package exec

import (
	"fmt"
	"os"
	"strconv"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

// A sub-root is a directory of the box root that execs may run chrooted
// into (request Root): the root filesystem of one container of a pod whose
// containers share the box. On first use it gets /proc, /sys and /dev of
// its own (the box's /dev, bound); releaseroot takes them away again.
type subRoot struct {
	root   *fsroot.Root
	chroot string   // its path in the agent's view
	mounts []string // what was mounted in it, innermost last
}

// subRoot opens (and sets up, the first time) the sub-root at p, a path
// in the box root. Symlinks in p and in the container's tree resolve
// inside the box root and the container's root: a hostile tree cannot make
// the agent mount over anything outside it.
func (sv *server) subRoot(p string) (*subRoot, error) {
	clean := fsroot.Clean(p)
	if clean == "/" {
		return nil, errdefs.New(errdefs.ValidationError, "root %q: the box root itself", p)
	}
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if r := sv.roots[clean]; r != nil {
		return r, nil
	}
	fd, err := sv.root.OpenFile(clean, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return nil, errdefs.New(errdefs.ValidationError, "root %s: %v", clean, err)
	}
	real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	unix.Close(fd)
	if err != nil {
		return nil, err
	}
	root, err := fsroot.Open(real)
	if err != nil {
		return nil, err
	}
	r := &subRoot{root: root, chroot: real}
	dev := "/dev"
	if sv.chroot != "" {
		dev = sv.chroot + "/dev"
	}
	for _, m := range []struct {
		target, src, fstype string
		flags               uintptr
	}{
		{"/proc", "proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"/sys", "sysfs", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"/dev", dev, "", unix.MS_BIND | unix.MS_REC},
	} {
		if err := root.MkdirAll(m.target, 0o755); err != nil {
			r.unmount()
			root.Close()
			return nil, fmt.Errorf("root %s: %s: %w", clean, m.target, err)
		}
		tfd, err := root.OpenFile(m.target, unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			r.unmount()
			root.Close()
			return nil, fmt.Errorf("root %s: %s: %w", clean, m.target, err)
		}
		target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(tfd))
		err = unix.Mount(m.src, "/proc/self/fd/"+strconv.Itoa(tfd), m.fstype, m.flags, "")
		unix.Close(tfd)
		if err != nil {
			r.unmount()
			root.Close()
			return nil, fmt.Errorf("root %s: mount %s: %w", clean, m.target, err)
		}
		r.mounts = append(r.mounts, target)
	}
	if sv.roots == nil {
		sv.roots = map[string]*subRoot{}
	}
	sv.roots[clean] = r
	return r, nil
}

func (r *subRoot) unmount() {
	for i := len(r.mounts) - 1; i >= 0; i-- {
		unix.Unmount(r.mounts[i], unix.MNT_DETACH)
	}
	r.mounts = nil
}

// releaseRoot undoes subRoot's set-up of p (the container is gone; its
// processes must be too).
func (sv *server) releaseRoot(p string) error {
	clean := fsroot.Clean(p)
	sv.mu.Lock()
	r := sv.roots[clean]
	delete(sv.roots, clean)
	sv.mu.Unlock()
	if r != nil {
		r.unmount()
		r.root.Close()
	}
	return nil
}
