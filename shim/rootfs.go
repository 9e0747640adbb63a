package shim

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/mount"
)

// tree is the host directory a container's base disk is built from, and
// the key that names its content.
type tree struct {
	dir     string
	key     string
	sources []string // the image's layer dirs (shared trees)
	private bool     // the container's own: its base disk goes with it
	cleanup func()   // unmounts what was mounted to show the tree
}

// rootfsTree turns the rootfs containerd passes (usually one overlay mount
// of snapshot dirs; none when the bundle has a rootfs dir of its own) into
// a tree for the base disk, mounted under scratch when it takes a mount.
//
// What is shared: an overlay's lower dirs are committed snapshots, which
// never change, so the key is their identity (path, device, inode and
// change time of each) and every container of one image shares one base
// disk, built once. A non-empty upper dir (a snapshot prepared with
// content of its own) or any other kind of rootfs is specific to the
// container: its key includes the container's id, and its base disk is
// built for it alone. The container writes to its box's own disk, never
// back into the snapshot.
func rootfsTree(id, bundle string, mounts []*types.Mount, specRoot string, scratch string) (*tree, error) {
	nothing := func() {}
	if len(mounts) == 0 {
		dir := specRoot
		if dir == "" {
			dir = "rootfs"
		}
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(bundle, dir)
		}
		k, err := identity(dir)
		if err != nil {
			return nil, err
		}
		return &tree{dir: dir, key: keyOf("dir", id, k), private: true, cleanup: nothing}, nil
	}
	if len(mounts) > 1 {
		return nil, fmt.Errorf("rootfs: %d mounts; one is supported", len(mounts))
	}
	m := mounts[0]
	switch m.Type {
	case "bind", "rbind", "":
		k, err := identity(m.Source)
		if err != nil {
			return nil, err
		}
		return &tree{dir: m.Source, key: keyOf("bind", id, k), private: true, cleanup: nothing}, nil
	case "overlay":
	default:
		return nil, fmt.Errorf("rootfs: mount type %q is not supported (overlay or bind)", m.Type)
	}
	var lowers []string
	var upper string
	for _, o := range m.Options {
		switch {
		case strings.HasPrefix(o, "lowerdir="):
			lowers = strings.Split(strings.TrimPrefix(o, "lowerdir="), ":")
		case strings.HasPrefix(o, "upperdir="):
			upper = strings.TrimPrefix(o, "upperdir=")
		}
	}
	if len(lowers) == 0 {
		return nil, fmt.Errorf("rootfs: overlay without lowerdir")
	}
	parts := []string{"overlay"}
	for _, l := range lowers {
		k, err := identity(l)
		if err != nil {
			return nil, err
		}
		parts = append(parts, k)
	}
	if upper != "" && !emptyDir(upper) {
		// The container's own content: a base of its own, from the
		// whole overlay as containerd would mount it.
		parts = append(parts, "upper", id)
		target := filepath.Join(scratch, "rootfs")
		if err := os.MkdirAll(target, 0o700); err != nil {
			return nil, err
		}
		mm := mount.Mount{Type: m.Type, Source: m.Source, Options: m.Options}
		if err := mm.Mount(target); err != nil {
			return nil, fmt.Errorf("rootfs: mount overlay: %w", err)
		}
		return &tree{dir: target, key: keyOf(parts...), private: true, cleanup: func() { unmount(target) }}, nil
	}
	if len(lowers) == 1 {
		return &tree{dir: lowers[0], key: keyOf(parts...), sources: lowers, cleanup: nothing}, nil
	}
	// The lower dirs merged, read only (overlayfs takes two or more
	// lower dirs without an upper one).
	target := filepath.Join(scratch, "rootfs")
	if err := os.MkdirAll(target, 0o700); err != nil {
		return nil, err
	}
	if err := syscall.Mount("overlay", target, "overlay", syscall.MS_RDONLY,
		"lowerdir="+strings.Join(lowers, ":")); err != nil {
		return nil, fmt.Errorf("rootfs: mount the image's layers: %w", err)
	}
	return &tree{dir: target, key: keyOf(parts...), sources: lowers, cleanup: func() { unmount(target) }}, nil
}

func unmount(target string) {
	syscall.Unmount(target, syscall.MNT_DETACH)
	os.Remove(target)
}

// identity names a directory and its version: a dir replaced by another
// (a snapshot removed and its id reused) gets another name.
func identity(dir string) (string, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return "", fmt.Errorf("rootfs: %w", err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return "", fmt.Errorf("rootfs: %s is not a directory", dir)
	}
	return fmt.Sprintf("%s:%d:%d:%d.%d", dir, st.Dev, st.Ino, st.Ctim.Sec, st.Ctim.Nsec), nil
}

func emptyDir(dir string) bool {
	f, err := os.Open(dir)
	if err != nil {
		return true
	}
	defer f.Close()
	names, _ := f.Readdirnames(1)
	return len(names) == 0
}

// keyOf is a Rootfs key (letters and digits) for the parts.
func keyOf(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return "ctr-" + hex.EncodeToString(h[:20])
}
