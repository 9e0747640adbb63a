//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

// Where the configuration looks for devices and mounts (tests point these
// elsewhere), and how long it waits for devices that are still probing.
var (
	virtio9pDriver = "/sys/bus/virtio/drivers/9pnet_virtio"
	virtiofsDriver = "/sys/bus/virtio/drivers/virtiofs"
	mountinfoPath  = "/proc/self/mountinfo"
	volumeTimeout  = 3 * time.Second
	linkTimeout    = 5 * time.Second
)

// ninepOptions are the mount options of every volume. cache=none: the host
// changes the files under us.
const ninepOptions = "trans=virtio,version=9p2000.L,msize=524288,cache=none"

// configure applies the box configuration a host sends with its Hello
// (ServerOptions.Configure). Every host connection sends it, so it is
// idempotent: a volume already mounted where it belongs is left alone, the
// address and default route are replaced rather than added. Every part is
// tried; the error lists each failure, naming the volume or setting.
func (a *agent) configure(ctx context.Context, mounts []exec.Mount, network *exec.Network) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.down {
		return errors.New("the box is shutting down")
	}
	root, err := fsroot.Open(a.root)
	if err != nil {
		return err
	}
	defer root.Close()
	var errs []string
	for _, m := range mounts {
		if err := a.mountVolume(ctx, root, m); err != nil {
			a.log.Error("mounting volume", "tag", m.Tag, "path", m.Path, "err", err)
			errs = append(errs, err.Error())
		}
	}
	if network != nil {
		if err := configureNetwork(ctx, root, *network); err != nil {
			a.log.Error("configuring the network", "err", err)
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// mountVolume mounts the share m at m.Path inside the box root, unless it
// is mounted there already: a virtio-9p share (QEMU), or a virtio-fs one
// when the kernel command line says boxrun.volumes=virtiofs (Cloud
// Hypervisor).
func (a *agent) mountVolume(ctx context.Context, root *fsroot.Root, m exec.Mount) error {
	fail := func(err error) error { return fmt.Errorf("volume %q at %s: %w", m.Tag, m.Path, err) }
	fstype := "9p"
	if a.cfg.virtiofs {
		fstype = "virtiofs"
	}
	fd, real, err := openMountPoint(root, m.Path, false)
	if err != nil {
		return fail(err)
	}
	defer unix.Close(fd)
	infos, err := readMountinfo(mountinfoPath)
	if err != nil {
		return fail(err)
	}
	for _, mi := range infos {
		if mi.fstype != fstype || mi.source != m.Tag {
			continue
		}
		if mi.target != real {
			// A virtio-9p channel (or virtio-fs device) serves one mount
			// at a time.
			return fail(fmt.Errorf("the share is already mounted at %s", boxPath(a.root, mi.target)))
		}
		if mi.readOnly != m.ReadOnly {
			return fail(fmt.Errorf("already mounted %s", rwName(mi.readOnly)))
		}
		a.log.Debug("volume already mounted", "tag", m.Tag, "path", m.Path)
		return nil
	}
	var flags uintptr
	if m.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if a.cfg.virtiofs {
		if err := a.mountVirtiofs(ctx, m, fmt.Sprintf("/proc/self/fd/%d", fd), flags); err != nil {
			return fail(err)
		}
		a.mounts = append(a.mounts, real)
		a.log.Info("volume mounted", "tag", m.Tag, "path", m.Path, "read_only", m.ReadOnly, "fs", fstype)
		return nil
	}
	if err := waitForTag(ctx, m.Tag, volumeTimeout); err != nil {
		return fail(err)
	}
	if err := a.sysMount(m.Tag, fmt.Sprintf("/proc/self/fd/%d", fd), "9p", flags, ninepOptions); err != nil {
		return fail(fmt.Errorf("mount 9p %s: %w", rwName(m.ReadOnly), err))
	}
	a.mounts = append(a.mounts, real)
	a.log.Info("volume mounted", "tag", m.Tag, "path", m.Path, "read_only", m.ReadOnly)
	return nil
}

func rwName(ro bool) string {
	if ro {
		return "read-only"
	}
	return "read-write"
}

// boxPath turns a real path under the box root into the box's view of it.
func boxPath(root, p string) string {
	if rel, err := filepath.Rel(root, p); err == nil && !strings.HasPrefix(rel, "..") {
		return filepath.Join("/", rel)
	}
	return p
}

// mountVirtiofs mounts the virtio-fs device with tag m.Tag on target.
// The kernel finds the device by its tag at mount time (there is no tag in
// sysfs before Linux 6.9): while the device is still probing, the mount
// fails with EINVAL, so it is retried until volumeTimeout.
func (a *agent) mountVirtiofs(ctx context.Context, m exec.Mount, target string, flags uintptr) error {
	if _, err := os.Stat(virtiofsDriver); err != nil {
		return fmt.Errorf("no virtio-fs driver in the guest kernel (module virtiofs): %w", err)
	}
	deadline := time.Now().Add(volumeTimeout)
	for {
		err := a.sysMount(m.Tag, target, "virtiofs", flags, "")
		if err == nil {
			return nil
		}
		if err != unix.EINVAL && err != unix.ENOENT {
			return fmt.Errorf("mount virtiofs %s: %w", rwName(m.ReadOnly), err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no virtio-fs device with tag %q (mount: %v); is the volume attached to the VM?", m.Tag, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// waitForTag waits until a virtio-9p device with the mount tag is bound
// to its driver. The devices are probed when the driver module is loaded
// at boot, so this normally returns at once.
func waitForTag(ctx context.Context, tag string, timeout time.Duration) error {
	if _, err := os.Stat(virtio9pDriver); err != nil {
		return fmt.Errorf("no virtio-9p driver in the guest kernel (module 9pnet_virtio): %w", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		var tags []string
		files, _ := filepath.Glob(filepath.Join(virtio9pDriver, "*", "mount_tag"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			t := strings.TrimRight(string(b), "\x00\n")
			if t == tag {
				return nil
			}
			tags = append(tags, t)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no virtio-9p device with mount tag %q (the VM has %d: %q); is the volume attached to the VM?", tag, len(tags), tags)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

type mountInfo struct {
	target, fstype, source string
	readOnly               bool
}

// readMountinfo parses /proc/self/mountinfo:
//
//	36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
func readMountinfo(path string) ([]mountInfo, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []mountInfo
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(f) {
			continue
		}
		opts := strings.Split(f[5], ",")
		out = append(out, mountInfo{
			target:   unescapeMountinfo(f[4]),
			fstype:   f[sep+1],
			source:   unescapeMountinfo(f[sep+2]),
			readOnly: len(opts) > 0 && opts[0] == "ro",
		})
	}
	return out, nil
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// configureNetwork brings up lo and the interface, sets its address and
// default route, and writes the box's resolv.conf.
func configureNetwork(ctx context.Context, root *fsroot.Root, n exec.Network) error {
	if err := loopbackUp(); err != nil {
		return fmt.Errorf("network: bringing up lo: %w", err)
	}
	nl, err := dialNetlink()
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	defer nl.close()
	link, err := nl.waitLink(ctx, n.Interface, linkTimeout)
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	if n.MAC != "" {
		// A VM restored from a snapshot carries the snapshotted NIC's
		// address: the box's own comes from the host.
		want, err := net.ParseMAC(n.MAC)
		if err != nil {
			return fmt.Errorf("network: MAC %q: %w", n.MAC, err)
		}
		cur, _ := os.ReadFile("/sys/class/net/" + link.name + "/address")
		if strings.TrimSpace(string(cur)) != want.String() {
			if err := nl.setMAC(link.index, want); err != nil {
				return fmt.Errorf("network: setting MAC %s on %s: %w", want, link.name, err)
			}
		}
	}
	if err := nl.setUp(link.index, n.MTU); err != nil {
		return fmt.Errorf("network: bringing up %s: %w", link.name, err)
	}
	if n.Address != "" {
		pfx, err := netip.ParsePrefix(n.Address)
		if err != nil {
			return fmt.Errorf("network: address %q: %w", n.Address, err)
		}
		if err := nl.replaceAddress(link.index, pfx); err != nil {
			return fmt.Errorf("network: setting address %s on %s: %w", n.Address, link.name, err)
		}
	}
	if n.Gateway != "" {
		gw, err := netip.ParseAddr(n.Gateway)
		if err != nil {
			return fmt.Errorf("network: gateway %q: %w", n.Gateway, err)
		}
		if err := nl.replaceDefaultRoute(link.index, gw); err != nil {
			return fmt.Errorf("network: default route via %s on %s: %w", n.Gateway, link.name, err)
		}
	}
	if len(n.DNS) > 0 {
		if err := writeResolvConf(root, n.DNS); err != nil {
			return fmt.Errorf("network: writing /etc/resolv.conf: %w", err)
		}
	}
	return nil
}

// resolvConf is the content of the box's /etc/resolv.conf.
func resolvConf(dns []string) []byte {
	var b bytes.Buffer
	b.WriteString("# Written by boxrun from the box's network configuration.\n")
	for _, d := range dns {
		fmt.Fprintf(&b, "nameserver %s\n", d)
	}
	return b.Bytes()
}

// writeResolvConf makes the box's /etc/resolv.conf a regular file listing
// the DNS servers. /etc is resolved inside the box root; resolv.conf itself
// is replaced by a rename, so an image's symlink (to systemd-resolved's
// stub file, say) is replaced rather than followed.
func writeResolvConf(root *fsroot.Root, dns []string) error {
	want := resolvConf(dns)
	if err := root.MkdirAll("/etc", 0o755); err != nil {
		return err
	}
	dir, base, err := root.Parent("/etc/resolv.conf")
	if err != nil {
		return err
	}
	defer unix.Close(dir)
	// An identical regular file is left as it is.
	if fd, err := unix.Openat(dir, base, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
		f := os.NewFile(uintptr(fd), base)
		st, serr := f.Stat()
		same := false
		if serr == nil && st.Mode().IsRegular() && st.Size() == int64(len(want)) {
			have, rerr := io.ReadAll(io.LimitReader(f, int64(len(want))+1))
			same = rerr == nil && bytes.Equal(have, want)
		}
		f.Close()
		if same {
			return nil
		}
	}
	const tmp = ".resolv.conf.boxrun"
	_ = unix.Unlinkat(dir, tmp, 0)
	fd, err := unix.Openat(dir, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, err = f.Write(want)
	if err == nil {
		err = f.Chmod(0o644) // whatever the umask
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(dir, tmp, dir, base)
	}
	if err != nil {
		_ = unix.Unlinkat(dir, tmp, 0)
	}
	return err
}
