//go:build linux

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

const (
	baseDir = "/run/boxrun/base"
	dataDir = "/run/boxrun/data"
	rootDir = "/rootfs"

	deviceTimeout = 10 * time.Second
)

// prefixWriter prefixes every log line, so the agent's lines stand out in
// the console log among the kernel's.
type prefixWriter struct{ w io.Writer }

func (p prefixWriter) Write(b []byte) (int, error) {
	if _, err := p.w.Write(append([]byte("boxrun-agent: "), b...)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// earlyConsole is where logs go before /dev is mounted: the console the
// kernel opened as our stdio, if the initramfs had a /dev/console.
func earlyConsole() io.Writer { return prefixWriter{os.Stderr} }

// console opens /dev/console for logging: the host captures the serial
// console to the box's log file. /dev/kmsg is the fallback (rate limited).
func console() io.Writer {
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0); err == nil {
		return prefixWriter{f}
	}
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		return prefixWriter{f}
	}
	return earlyConsole()
}

// mountEarly mounts /dev, /proc and /sys of the initramfs.
func mountEarly() error {
	for _, m := range []struct{ fstype, target string }{
		{"devtmpfs", "/dev"},
		{"proc", "/proc"},
		{"sysfs", "/sys"},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		err := unix.Mount(m.fstype, m.target, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, "")
		if err != nil && err != unix.EBUSY { // EBUSY: the kernel mounted it already
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	// The agent is the box's lifeline, and the OOM killer never picks it:
	// the kernel exempts the global init, PID 1 of the VM, and all its
	// threads (oom_unkillable_task). So it keeps oom_score_adj 0, and the
	// box's commands inherit that 0 from their first instruction; lowering
	// it (-1000) would have to be undone around every fork, two writes to
	// /proc per command.
	return nil
}

// perBoxDevices are the virtio device types that differ from box to box
// (virtio spec device IDs): disks, NIC, 9p shares, virtio-fs. boot loads
// their drivers but binds none of them, the disks excepted when the host
// asks (holdBack): the virtio bus's autoprobe is off from the moment the
// bus exists, so that a VM snapshotted before its Hello has never read a
// MAC (nor, disks held back, probed a disk); setup binds them. Every other
// virtio device (the agent's port, the RNG, vsock) is bound at boot.
var perBoxDevices = map[uint64]bool{1: true, virtioBlock: true, 9: true, 26: true}

const (
	virtioBus   = "/sys/bus/virtio"
	virtioBlock = 2 // virtio-blk's device ID
)

// holdBack reports whether boot leaves a device of type kind unbound.
// Disks are bound at boot when the host asks (boxrun.bootdisks: QEMU):
// probing two disks cost a restored box more than a tenth of its start,
// all of it translation under TCG. A restored guest then keeps what the
// template's guest probed of its stand-ins, and the host makes up for it:
// a read-only disk's size is in the template's key, a writable disk's
// capacity is signalled at the restore (QMP block_resize), and setup
// waits for every disk's size from the Hello (waitDiskSizes) and drops
// their block caches (dropDiskCaches) before mounting.
func holdBack(kind uint64, bootDisks bool) bool {
	return perBoxDevices[kind] && !(bootDisks && kind == virtioBlock)
}

// loadModules loads the modules listed in /etc/boxrun/modules, in order,
// with the virtio bus's autoprobe off, then binds the devices that are not
// held back (holdBack). A module that fails is logged and skipped: the
// boot fails later, with a clearer message, if it mattered. It returns the
// devices it held back, in device order, and false when it could not hold
// any back (the virtio bus is built into the kernel and probed them before
// we ran).
func loadModules(log *slog.Logger, bootDisks bool) (held []virtioDevice, heldBack bool) {
	builtin := false
	if _, err := os.Stat(virtioBus); err == nil {
		builtin = true // the kernel probed its devices before init ran
	}
	list, err := os.ReadFile("/etc/boxrun/modules")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Error("reading the module list", "err", err)
	}
	autoprobeOff := false
	n := 0
	for _, line := range strings.Split(string(list), "\n") {
		name := strings.TrimSpace(line)
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		if !autoprobeOff {
			autoprobeOff = setAutoprobe(false)
		}
		if err := loadModule(filepath.Join("/lib/modules", name)); err != nil {
			log.Warn("loading module", "module", name, "err", err)
			continue
		}
		n++
	}
	if !autoprobeOff {
		autoprobeOff = setAutoprobe(false)
	}
	for _, d := range virtioDevices() {
		if holdBack(d.kind, bootDisks) {
			held = append(held, d)
		} else {
			probe(log, d.name)
		}
	}
	log.Debug("modules loaded", "count", n, "autoprobe_off", autoprobeOff, "builtin", builtin, "held_back", len(held))
	return held, autoprobeOff && !builtin
}

// bindPerBox binds the per-box devices boot held back (held, in device
// order: the disks become vda, vdb, ... in the order the host attached
// them) and returns how many disks it probed. When boot could not hold
// them back, the disks' driver has bound them before init: they are
// unbound and bound again, so that the driver probes them afresh
// (capacity, caches).
func bindPerBox(log *slog.Logger, held []virtioDevice, heldBack bool) (disks int) {
	if !heldBack {
		rebind(log, virtioBus+"/drivers/virtio_blk")
		held = nil
		for _, d := range virtioDevices() {
			if perBoxDevices[d.kind] {
				held = append(held, d)
			}
		}
	}
	// The devices of a VM do not change between its boot (or its
	// template's) and its Hello: boot's list saves listing the bus again.
	for _, d := range held {
		probe(log, d.name)
		if d.kind == virtioBlock {
			disks++
		}
	}
	return disks
}

// diskSizeTimeout bounds the wait for a disk's capacity (waitDiskSizes).
const diskSizeTimeout = 10 * time.Second

// sysBlock is where the kernel lists block devices (a stand-in in tests).
var sysBlock = "/sys/class/block"

// waitDiskSizes waits until the kernel sees each disk at the size the host
// gave it (bytes, by device). A disk bound at boot in a template has its
// stand-in's capacity until the VMM signals the box disk's (QEMU: the
// host's block_resize, which the guest takes in a work queue, maybe after
// the Hello arrived); mounting it before would show the file system a disk
// of the wrong size. A disk whose capacity is already right costs a read.
func waitDiskSizes(disks map[string]int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for dev, size := range disks {
		f := filepath.Join(sysBlock, filepath.Base(dev), "size") // 512-byte sectors
		for {
			b, err := os.ReadFile(f)
			got, perr := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err == nil && perr == nil && got*512 == size {
				break
			}
			if time.Now().After(deadline) {
				if err == nil {
					err = perr
				}
				if err == nil {
					err = fmt.Errorf("%d bytes", got*512)
				}
				// TIMEOUT: the host takes it for its template's fault
				// (a VMM that did not signal the capacity) and boots
				// the box cold.
				return errdefs.New(errdefs.Timeout, "disk %s: not at the host's size of %d bytes within %v: %v", dev, size, timeout, err)
			}
			time.Sleep(time.Millisecond)
		}
	}
	return nil
}

// dropDiskCaches drops the block caches of the disks bound at boot
// (boxrun.bootdisks), lest they hold what the template's guest read of its
// stand-ins: the probe's partition scan reads their first page, where an
// ext4 keeps its superblock. Linux 6.1 drops a disk's cache when its last
// opener closes it, which the scan does, and nothing in the template opens
// them again; BLKFLSBUF (write back, invalidate) makes it so whatever the
// kernel or the template did. The disks are not mounted yet: nothing else
// holds their pages.
func dropDiskCaches(devs ...string) error {
	for _, dev := range devs {
		if dev == "" {
			continue
		}
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == unix.ENOENT {
			continue // no such disk: mountBox waits for it, and says so
		}
		if err != nil {
			return fmt.Errorf("disk %s: %w", dev, err)
		}
		err = unix.IoctlSetInt(fd, unix.BLKFLSBUF, 0)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("dropping the block cache of %s: %w", dev, err)
		}
	}
	return nil
}

// setAutoprobe sets the virtio bus's drivers_autoprobe; false when the bus
// does not exist (yet).
func setAutoprobe(on bool) bool {
	v := "0"
	if on {
		v = "1"
	}
	return os.WriteFile(virtioBus+"/drivers_autoprobe", []byte(v), 0) == nil
}

type virtioDevice struct {
	name string // virtioN
	kind uint64 // virtio device ID
}

// virtioDevices lists the virtio devices in the order they were added.
func virtioDevices() []virtioDevice {
	ents, _ := os.ReadDir(virtioBus + "/devices")
	var devs []virtioDevice
	for _, e := range ents {
		if _, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "virtio")); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(virtioBus, "devices", e.Name(), "device"))
		if err != nil {
			continue
		}
		kind, err := strconv.ParseUint(strings.TrimSpace(string(b)), 0, 32)
		if err != nil {
			continue
		}
		devs = append(devs, virtioDevice{name: e.Name(), kind: kind})
	}
	sort.Slice(devs, func(i, j int) bool {
		a, _ := strconv.Atoi(strings.TrimPrefix(devs[i].name, "virtio"))
		b, _ := strconv.Atoi(strings.TrimPrefix(devs[j].name, "virtio"))
		return a < b
	})
	return devs
}

// probe binds a device to its driver (drivers_probe), unless bound.
func probe(log *slog.Logger, name string) {
	if _, err := os.Stat(filepath.Join(virtioBus, "devices", name, "driver")); err == nil {
		return
	}
	if err := os.WriteFile(virtioBus+"/drivers_probe", []byte(name), 0); err != nil {
		log.Warn("binding", "device", name, "err", err)
	}
}

// rebind unbinds every device of a driver and binds it again, in order.
func rebind(log *slog.Logger, driver string) {
	devs, _ := filepath.Glob(filepath.Join(driver, "virtio*"))
	for _, d := range devs {
		name := filepath.Base(d)
		if err := os.WriteFile(filepath.Join(driver, "unbind"), []byte(name), 0); err != nil {
			log.Warn("unbinding", "device", name, "err", err)
			continue
		}
		if err := os.WriteFile(filepath.Join(driver, "bind"), []byte(name), 0); err != nil {
			log.Warn("binding", "device", name, "err", err)
		}
	}
}

// reseed mixes the host's bytes into the kernel's pool and reseeds the
// CRNG at once (RNDADDENTROPY credits them; RNDRESEEDCRNG makes every
// reader see the new state now, not at the next scheduled reseed).
func reseed(entropy []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(entropy))
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(entropy)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(entropy)))
	copy(buf[8:], entropy)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(path, ext) {
			flags = unix.MODULE_INIT_COMPRESSED_FILE
		}
	}
	err = unix.FinitModule(int(f.Fd()), "", flags)
	if err == unix.EEXIST {
		return nil
	}
	return err
}

// waitFor polls until path exists: drivers probe devices asynchronously
// after their module is loaded.
func waitFor(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := os.Stat(path)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v: %w", path, timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (a *agent) mount(src, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(src, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s (%s) on %s: %w", src, fstype, target, err)
	}
	a.mounts = append(a.mounts, target)
	return nil
}

// mountBox assembles the box root at /rootfs.
func (a *agent) mountBox() error {
	if err := waitFor(a.cfg.base, deviceTimeout); err != nil {
		return fmt.Errorf("base disk: %w", err)
	}
	// The base disk is shared and read-only: never replay its journal.
	err := a.mount(a.cfg.base, baseDir, "ext4", unix.MS_RDONLY, "")
	if err != nil {
		err = a.mount(a.cfg.base, baseDir, "ext4", unix.MS_RDONLY, "noload")
	}
	if err != nil {
		return err
	}
	if a.cfg.data != "" {
		if err := waitFor(a.cfg.data, deviceTimeout); err != nil {
			return fmt.Errorf("data disk: %w", err)
		}
		// noinit_itable: no background zeroing of inode tables (the
		// host made the disk as a sparse file: they read as zeros), which
		// would compete with the box's first commands.
		if err := a.mount(a.cfg.data, dataDir, "ext4", unix.MS_NOATIME, "noinit_itable"); err != nil {
			return err
		}
	} else {
		a.log.Warn("no boxrun.data disk: the box's writes will not persist")
		if err := a.mount("tmpfs", dataDir, "tmpfs", 0, "mode=0755"); err != nil {
			return err
		}
	}
	for _, d := range []string{dataDir + "/upper", dataDir + "/work"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", baseDir, dataDir, dataDir)
	if err := a.mount("overlay", rootDir, "overlay", 0, opts); err != nil {
		return err
	}

	root, err := fsroot.Open(rootDir)
	if err != nil {
		return err
	}
	defer root.Close()
	const (
		nosuid = unix.MS_NOSUID
		nodev  = unix.MS_NODEV
		noexec = unix.MS_NOEXEC
	)
	for _, m := range []struct {
		target, src, fstype string
		flags               uintptr
		data                string
		file                bool // target is a file (bind mount)
	}{
		{"/proc", "proc", "proc", nosuid | nodev | noexec, "", false},
		{"/sys", "sysfs", "sysfs", nosuid | nodev | noexec, "", false},
		{"/dev", "devtmpfs", "devtmpfs", nosuid, "mode=0755", false},
		{"/dev/pts", "devpts", "devpts", nosuid | noexec, "newinstance,ptmxmode=0666,mode=0620,gid=5", false},
		// Programs open /dev/ptmx: make it the new devpts instance's.
		{"/dev/ptmx", "/dev/pts/ptmx", "", unix.MS_BIND, "", true},
		{"/dev/shm", "shm", "tmpfs", nosuid | nodev, "mode=1777", false},
		{"/run", "tmpfs", "tmpfs", nosuid | nodev, "mode=0755", false},
	} {
		src := m.src
		if m.flags&unix.MS_BIND != 0 {
			src = rootDir + m.src
		}
		if err := a.mountIn(root, m.target, src, m.fstype, m.flags, m.data, m.file); err != nil {
			return err
		}
	}
	for name, target := range map[string]string{
		"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2",
	} {
		if err := os.Symlink(target, rootDir+"/dev/"+name); err != nil && !errors.Is(err, os.ErrExist) {
			a.log.Warn("creating /dev symlink", "name", name, "err", err)
		}
	}
	return nil
}

// mountIn mounts on target inside the box root. The target is resolved
// in the root (an image's symlinked /run or /dev/shm must not send the
// mount elsewhere) and mounted through its descriptor.
func (a *agent) mountIn(root *fsroot.Root, target, src, fstype string, flags uintptr, data string, file bool) error {
	fd, real, err := openMountPoint(root, target, file)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := a.sysMount(src, fmt.Sprintf("/proc/self/fd/%d", fd), fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s (%s) on %s: %w", src, fstype, real, err)
	}
	a.mounts = append(a.mounts, real)
	return nil
}

// openMountPoint resolves target inside root, creating it (a directory,
// with its parents) unless file is set, and returns an O_PATH descriptor
// for it with its real path (as /proc/self/mountinfo will show it).
func openMountPoint(root *fsroot.Root, target string, file bool) (int, string, error) {
	oflags := unix.O_PATH | unix.O_DIRECTORY
	if file {
		oflags = unix.O_PATH
	} else if err := root.MkdirAll(target, 0o755); err != nil {
		return -1, "", fmt.Errorf("box mount point %s: %w", target, err)
	}
	fd, err := root.OpenFile(target, oflags)
	if err != nil {
		return -1, "", fmt.Errorf("box mount point %s: %w", target, err)
	}
	real, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		unix.Close(fd)
		return -1, "", err
	}
	return fd, real, nil
}

// sysMount is mount(2), or the test's stand-in.
func (a *agent) sysMount(src, target, fstype string, flags uintptr, data string) error {
	if a.mountFunc != nil {
		return a.mountFunc(src, target, fstype, flags, data)
	}
	return unix.Mount(src, target, fstype, flags, data)
}

// unmountAll unmounts the box filesystems in reverse order, lazily where
// busy. The data disk, if it cannot be unmounted, is remounted read-only so
// its file system is consistent when the VM stops.
func (a *agent) unmountAll() error {
	var firstErr error
	for i := len(a.mounts) - 1; i >= 0; i-- {
		m := a.mounts[i]
		err := unix.Unmount(m, 0)
		if err == unix.EBUSY {
			if m == dataDir {
				if rerr := unix.Mount("", dataDir, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); rerr != nil {
					a.log.Warn("remounting the data disk read-only", "err", rerr)
				}
			}
			err = unix.Unmount(m, unix.MNT_DETACH)
			a.log.Debug("unmounted lazily", "mount", m)
		}
		if err != nil && err != unix.EINVAL { // EINVAL: not mounted (anymore)
			a.log.Warn("unmounting", "mount", m, "err", err)
			if firstErr == nil && (m == dataDir || m == rootDir) {
				firstErr = fmt.Errorf("unmount %s: %w", m, err)
			}
		}
	}
	a.mounts = nil
	return firstErr
}

// loopbackUp brings lo up; the kernel then gives it 127.0.0.1 and ::1.
func loopbackUp() error { return linkUp("lo") }

// linkUp sets the IFF_UP flag of the interface name.
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP | unix.IFF_RUNNING)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}
