package exec

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

// A sub-root is a directory of the box root that execs may run chrooted
// into (request Root): the root filesystem of one container of a pod whose
// containers share the box. On first use it gets /proc, /sys and /dev of
// its own; releaseroot kills what still runs in it and takes them away.
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
	if err := r.setUp(); err != nil {
		r.unmount()
		root.Close()
		return nil, fmt.Errorf("root %s: %w", clean, err)
	}
	if sv.roots == nil {
		sv.roots = map[string]*subRoot{}
	}
	sv.roots[clean] = r
	return r, nil
}

// setUp mounts a fresh /proc, a read-only /sys and a minimal /dev (a
// tmpfs with the usual nodes, its own devpts and /dev/shm: not the box's
// disks or consoles) in the sub-root. Each mount lands on a descriptor
// opened inside the sub-root.
func (r *subRoot) setUp() error {
	const nosuid, nodev, noexec = unix.MS_NOSUID, unix.MS_NODEV, unix.MS_NOEXEC
	for _, m := range []struct {
		target, src, fstype string
		flags               uintptr
		data                string
	}{
		{"/proc", "proc", "proc", nosuid | nodev | noexec, ""},
		{"/sys", "sysfs", "sysfs", nosuid | nodev | noexec | unix.MS_RDONLY, ""},
		{"/dev", "tmpfs", "tmpfs", nosuid | noexec, "mode=0755,size=64k"},
		{"/dev/pts", "devpts", "devpts", nosuid | noexec, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"/dev/shm", "shm", "tmpfs", nosuid | nodev, "mode=1777"},
	} {
		if err := r.root.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("%s: %w", m.target, err)
		}
		tfd, err := r.root.OpenFile(m.target, unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return fmt.Errorf("%s: %w", m.target, err)
		}
		target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(tfd))
		err = unix.Mount(m.src, "/proc/self/fd/"+strconv.Itoa(tfd), m.fstype, m.flags, m.data)
		unix.Close(tfd)
		if err != nil {
			return fmt.Errorf("mount %s: %w", m.target, err)
		}
		r.mounts = append(r.mounts, target)
		if m.target != "/dev" {
			continue
		}
		// The new /dev: its nodes and links, before devpts and shm go in.
		dfd, err := r.root.OpenFile("/dev", unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return err
		}
		dev, err := unix.Openat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(dfd), unix.O_RDONLY|unix.O_DIRECTORY, 0)
		unix.Close(dfd)
		if err != nil {
			return err
		}
		for _, n := range []struct {
			name         string
			major, minor uint32
		}{{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0}} {
			if err := unix.Mknodat(dev, n.name, unix.S_IFCHR|0o666, int(unix.Mkdev(n.major, n.minor))); err != nil {
				unix.Close(dev)
				return fmt.Errorf("/dev/%s: %w", n.name, err)
			}
			unix.Fchmodat(dev, n.name, 0o666, 0) // past the umask
		}
		for name, to := range map[string]string{"ptmx": "pts/ptmx", "fd": "/proc/self/fd",
			"stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
			unix.Symlinkat(to, dev, name)
		}
		unix.Close(dev)
	}
	return nil
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
		killIn(r.chroot)
		r.unmount()
		users.dropRoot(r.root.Path())
		r.root.Close()
	}
	return nil
}

// killIn SIGKILLs every process whose root is dir or below it: a
// container's processes, daemons that left its init's process group
// included.
func killIn(dir string) {
	for range 10 {
		found := false
		ents, _ := os.ReadDir("/proc")
		for _, en := range ents {
			pid, err := strconv.Atoi(en.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			root, err := os.Readlink("/proc/" + en.Name() + "/root")
			if err == nil && (root == dir || strings.HasPrefix(root, dir+"/")) {
				unix.Kill(pid, unix.SIGKILL)
				found = true
			}
		}
		if !found {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
