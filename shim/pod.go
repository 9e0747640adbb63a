package shim

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/mount"
	pathrs "github.com/cyphar/filepath-securejoin/pathrs-lite"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Pods: the containers of one CRI pod share one box. The pod's sandbox
// (pause) container boots it, with the shim's pod dir shared into it (9p)
// at podGuestDir; each further container's root filesystem is mounted on
// the host in that dir, as runc would mount it (containerd's overlay, the
// config's bind mounts on top), and its processes run in the box chrooted
// into it, with /proc, /sys and /dev of their own. They share the box's
// network (localhost), its kernel and its process space, as a pod's
// containers share a network namespace.

// podGuestDir is where the pod dir appears in the box.
const podGuestDir = "/.boxrun-pod"

// sandboxIDAnnotations name a container's pod (containerd's CRI, cri-o).
var sandboxIDAnnotations = []string{"io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID"}

// sandboxOf is the id of the pod's sandbox a container belongs to ("" for
// a container of no pod, or the sandbox itself).
func sandboxOf(s *specs.Spec) string {
	if s == nil || isSandbox(s) {
		return ""
	}
	for _, k := range sandboxIDAnnotations {
		if v := s.Annotations[k]; v != "" {
			return v
		}
	}
	return ""
}

// groupOf is the shim a container's task goes to: its pod's (the
// sandbox's id), else its own.
func groupOf(id string, s *specs.Spec) string {
	if s == nil {
		return id
	}
	if isSandbox(s) {
		for _, k := range sandboxIDAnnotations {
			if v := s.Annotations[k]; v != "" {
				return v
			}
		}
		return id
	}
	if sb := sandboxOf(s); sb != "" {
		return sb
	}
	return id
}

// readBundleSpec reads config.json in dir, nil if there is none.
func readBundleSpec(dir string) *specs.Spec {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil
	}
	var s specs.Spec
	if json.Unmarshal(b, &s) != nil {
		return nil
	}
	return &s
}

// The pod dir is shared read-write with the box (9p, as root): a process
// in the box may rename or replace anything in it at any time, while the
// host works there as root. So nothing under it is reached by path: the
// shim opens each step with openat(O_NOFOLLOW) (inside a container's
// rootfs, with pathrs-lite, which resolves symlinks inside it), and mounts
// land on the descriptors (mount(2) onto /proc/self/fd/N, move_mount(2)).

// mountPodRootfs makes podDir/id/rootfs and mounts a pod container's root
// filesystem there, then the config's bind mounts in it. It returns the
// container's dir, open (O_PATH), for unmountPodRootfs. On error nothing
// stays mounted.
func mountPodRootfs(podDir, id, bundle string, rootfs []*types.Mount, s *specs.Spec) (idDir *os.File, err error) {
	pod, err := os.OpenFile(podDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer pod.Close()
	if err := unix.Mkdirat(int(pod.Fd()), id, 0o700); err != nil {
		return nil, fmt.Errorf("container dir: %w", err)
	}
	idDir, err = openDir(pod, id)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			unmountPodRootfs(podDir, id, idDir)
			idDir.Close()
			idDir = nil
		}
	}()
	if err := unix.Mkdirat(int(idDir.Fd()), "rootfs", 0o755); err != nil {
		return nil, err
	}
	mp, err := openDir(idDir, "rootfs")
	if err != nil {
		return nil, err
	}
	target := fdPath(mp)
	if len(rootfs) > 0 {
		ms := make([]mount.Mount, 0, len(rootfs))
		for _, m := range rootfs {
			ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
		}
		err = mount.All(ms, target)
	} else {
		src := "rootfs"
		if s.Root != nil && s.Root.Path != "" {
			src = s.Root.Path
		}
		if !filepath.IsAbs(src) {
			src = filepath.Join(bundle, src)
		}
		err = unix.Mount(src, target, "", unix.MS_BIND|unix.MS_REC, "")
	}
	mp.Close()
	if err != nil {
		return nil, fmt.Errorf("mount rootfs: %w", err)
	}
	// Looked up again, "rootfs" is the mount's root (a mount point cannot
	// be renamed away).
	root, err := openDir(idDir, "rootfs")
	if err != nil {
		return nil, err
	}
	defer root.Close()
	for _, m := range s.Mounts {
		bind := m.Type == "bind" || m.Type == "rbind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
		if !bind || !filepath.IsAbs(m.Source) || skipMount(m.Destination) {
			continue
		}
		st, err := os.Stat(m.Source)
		if err != nil {
			continue
		}
		h, err := mountPoint(root, m.Destination, st.IsDir())
		if err != nil {
			return nil, fmt.Errorf("mount point %s: %w", m.Destination, err)
		}
		err = bindAt(m.Source, h, slices.Contains(m.Options, "ro"))
		h.Close()
		if err != nil {
			return nil, fmt.Errorf("bind %s: %w", m.Destination, err)
		}
	}
	return idDir, nil
}

// openDir opens name in dir as a directory, not following a symlink.
func openDir(dir *os.File, name string) (*os.File, error) {
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

func fdPath(f *os.File) string { return "/proc/self/fd/" + strconv.Itoa(int(f.Fd())) }

// mountPoint makes (if need be) and opens the mount point of dest inside
// root: a directory, or an empty file for a file's bind mount.
func mountPoint(root *os.File, dest string, dir bool) (*os.File, error) {
	if dir {
		return pathrs.MkdirAllHandle(root, dest, 0o755)
	}
	parent, err := pathrs.MkdirAllHandle(root, filepath.Dir(dest), 0o755)
	if err != nil {
		return nil, err
	}
	defer parent.Close()
	fd, err := unix.Openat(int(parent.Fd()), filepath.Base(dest), unix.O_CREAT|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0o644)
	if err != nil && err != unix.ELOOP {
		return nil, err
	}
	if err == nil {
		unix.Close(fd)
	}
	return pathrs.OpenatInRoot(root, dest)
}

// bindAt bind-mounts src (recursively; read-only with ro, in one step)
// onto the mount point h.
func bindAt(src string, h *os.File, ro bool) error {
	tree, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		return err
	}
	defer unix.Close(tree)
	if ro {
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
			return err
		}
	}
	return unix.MoveMount(tree, "", int(h.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH)
}

// skipMount says whether a config mount's destination is the guest's own
// (its /proc, /sys, /dev).
func skipMount(dest string) bool {
	d := filepath.Clean(dest)
	for _, p := range []string{"/proc", "/sys", "/dev"} {
		if d == p || strings.HasPrefix(d, p+"/") {
			return true
		}
	}
	return false
}

// removeAll removes dir unless something is still mounted under it:
// removing through a mount would delete what it shows (a container's
// snapshot, a volume).
func removeAll(dir string) error {
	if mounts, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(l); len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
				return fmt.Errorf("not removing %s: %s is mounted", dir, f[4])
			}
		}
	}
	return os.RemoveAll(dir)
}

// unmountPodRootfs detaches a pod container's rootfs, and with it every
// mount in it, and removes its (then empty) dirs. idDir is the container's
// dir as mountPodRootfs opened it (it stays right if the box renamed it);
// nil looks id up in podDir, not following a symlink.
func unmountPodRootfs(podDir, id string, idDir *os.File) error {
	pod, err := os.OpenFile(podDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return err
	}
	defer pod.Close()
	if idDir == nil {
		if idDir, err = openDir(pod, id); err != nil {
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
				return nil
			}
			return err
		}
		defer idDir.Close()
	}
	// MNT_DETACH takes the mounts below it too: the pod's binds.
	if err := unix.Unmount(fdPath(idDir)+"/rootfs", unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount rootfs of %s: %w", id, err)
	}
	// Empty dirs only: never removing through a mount.
	unix.Unlinkat(int(idDir.Fd()), "rootfs", unix.AT_REMOVEDIR)
	if err := unix.Unlinkat(int(pod.Fd()), id, unix.AT_REMOVEDIR); err != nil && err != unix.ENOENT {
		return fmt.Errorf("remove the dir of %s: %w", id, err)
	}
	return nil
}

// unmountPod detaches what the containers of a pod left mounted in its pod
// dir (a shim that died, a Shutdown with containers left).
func unmountPod(podDir string) {
	ents, err := os.ReadDir(podDir)
	if err != nil {
		return
	}
	for _, en := range ents {
		if en.Type().IsDir() { // lstat: a symlink is not followed
			unmountPodRootfs(podDir, en.Name(), nil)
		}
	}
}
