package shim

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/mount"
	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"
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

// mountPodRootfs mounts a pod container's root filesystem at target on
// the host, then the config's bind mounts in it. Mount targets are
// resolved inside the rootfs (a hostile image's symlinks cannot send a
// mount elsewhere). On error nothing stays mounted.
func mountPodRootfs(bundle string, rootfs []*types.Mount, s *specs.Spec, target string) (err error) {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			mount.UnmountRecursive(target, syscall.MNT_DETACH)
		}
	}()
	if len(rootfs) > 0 {
		ms := make([]mount.Mount, 0, len(rootfs))
		for _, m := range rootfs {
			ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
		}
		if err := mount.All(ms, target); err != nil {
			return fmt.Errorf("mount rootfs: %w", err)
		}
	} else {
		src := "rootfs"
		if s.Root != nil && s.Root.Path != "" {
			src = s.Root.Path
		}
		if !filepath.IsAbs(src) {
			src = filepath.Join(bundle, src)
		}
		if err := syscall.Mount(src, target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
			return fmt.Errorf("bind rootfs: %w", err)
		}
	}
	for _, m := range s.Mounts {
		bind := m.Type == "bind" || m.Type == "rbind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
		if !bind || !filepath.IsAbs(m.Source) || skipMount(m.Destination) {
			continue
		}
		st, err := os.Stat(m.Source)
		if err != nil {
			continue
		}
		dest, err := securejoin.SecureJoin(target, m.Destination)
		if err != nil {
			return err
		}
		if st.IsDir() {
			err = os.MkdirAll(dest, 0o755)
		} else {
			if err = os.MkdirAll(filepath.Dir(dest), 0o755); err == nil {
				var f *os.File
				if f, err = os.OpenFile(dest, os.O_CREATE|os.O_RDONLY|syscall.O_NOFOLLOW, 0o644); err == nil {
					f.Close()
				}
			}
		}
		if err != nil {
			return fmt.Errorf("mount point %s: %w", m.Destination, err)
		}
		if err := syscall.Mount(m.Source, dest, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s: %w", m.Destination, err)
		}
		if slices.Contains(m.Options, "ro") {
			if err := syscall.Mount("", dest, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY|syscall.MS_REC, ""); err != nil {
				return fmt.Errorf("read-only %s: %w", m.Destination, err)
			}
		}
	}
	return nil
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

// unmountPodRootfs undoes mountPodRootfs and removes the container's dir.
func unmountPodRootfs(dir string) error {
	target := filepath.Join(dir, "rootfs")
	if err := mount.UnmountRecursive(target, syscall.MNT_DETACH); err != nil && !os.IsNotExist(err) {
		return err
	}
	// Never remove through a mount: only what is left is the empty dirs.
	os.Remove(target)
	return os.Remove(dir)
}
