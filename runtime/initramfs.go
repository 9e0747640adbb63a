package runtime

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
)

// GuestModules are the kernel modules a box needs, by module name. Distro
// kernels build virtio, ext4 and overlayfs as modules; the agent loads them
// from the initramfs before it can see its disks or talk to the host.
var GuestModules = []string{
	"virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng",
	"crc32c_generic", "ext4", "overlay",
	"9pnet_virtio", "9p", // QEMU's volumes
	"fuse", "virtiofs", // Cloud Hypervisor's volumes
	"vsock", "vmw_vsock_virtio_transport", // Cloud Hypervisor's agent channel
}

// ResolveModules returns the module files (relative to modulesDir) that
// loading names requires, every dependency before its dependents, following
// modules.dep. Modules built into the kernel (modules.builtin) or absent from
// it are skipped: a kernel that builds virtio in needs none of them.
func ResolveModules(modulesDir string, names []string) ([]string, error) {
	deps := map[string][]string{} // file -> dependency files
	byName := map[string]string{} // module name -> file
	f, err := os.Open(filepath.Join(modulesDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		file, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[file] = strings.Fields(rest)
		byName[moduleName(file)] = file
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var order []string
	seen := map[string]bool{}
	var visit func(file string)
	visit = func(file string) {
		if seen[file] {
			return
		}
		seen[file] = true
		for _, d := range deps[file] {
			visit(d)
		}
		order = append(order, file)
	}
	for _, n := range names {
		if file, ok := byName[strings.ReplaceAll(n, "-", "_")]; ok {
			visit(file)
		}
	}
	return order, nil
}

// moduleName turns "kernel/fs/ext4/ext4.ko.xz" into "ext4" (dashes as
// underscores, as the kernel does).
func moduleName(file string) string {
	base := filepath.Base(file)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// BuildInitramfs writes (once, cached in cacheDir by content) an uncompressed
// newc cpio archive holding the agent as /init and the kernel modules the
// guest needs, listed in load order in /etc/boxrun/modules. Uncompressed,
// because unpacking costs the guest nothing while decompressing costs TCG
// guests a noticeable slice of their boot.
func BuildInitramfs(k *Kernel, agentPath, cacheDir string) (string, error) {
	mods, err := ResolveModules(k.Modules, GuestModules)
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "resolve guest kernel modules")
	}
	agent, err := os.ReadFile(agentPath)
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "read guest agent")
	}
	h := sha256.New()
	h.Write(agent)
	fmt.Fprintf(h, "\x00%s\x00%s\x00", k.Version, k.Modules)
	for _, m := range mods {
		st, err := os.Stat(filepath.Join(k.Modules, m))
		if err != nil {
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "guest kernel module")
		}
		fmt.Fprintf(h, "%s %d %d\x00", m, st.Size(), st.ModTime().UnixNano())
	}
	out := filepath.Join(cacheDir, "initramfs-"+hex.EncodeToString(h.Sum(nil)[:8])+".cpio")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}

	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(cacheDir, ".tmp-initramfs-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	w := newCpioWriter(bufio.NewWriterSize(tmp, 1<<20))
	for _, d := range []string{"dev", "proc", "sys", "run", "rootfs", "tmp", "etc", "etc/boxrun", "lib", "lib/modules"} {
		w.dir(d, 0o755)
	}
	// The kernel opens /dev/console for init's stdio before devtmpfs exists.
	w.charDev("dev/console", 0o600, 5, 1)
	w.file("init", 0o755, agent)
	var list strings.Builder
	for _, m := range mods {
		data, err := readModule(filepath.Join(k.Modules, m))
		if err != nil {
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "read guest kernel module %s", m)
		}
		name := moduleName(m) + ".ko"
		w.file("lib/modules/"+name, 0o644, data)
		list.WriteString(name + "\n")
	}
	w.file("etc/boxrun/modules", 0o644, []byte(list.String()))
	if err := w.close(); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return "", err
	}
	return out, os.Rename(tmp.Name(), out)
}

// readModule returns a module's ELF bytes. Newer distro kernels ship
// compressed modules; finit_module can only decompress them when the kernel
// was built to, so the host decompresses once here instead.
func readModule(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil || isELF(data) {
		return data, err
	}
	switch {
	case strings.HasSuffix(path, ".xz"):
		return decompressWith(data, "xz", "-dc")
	case strings.HasSuffix(path, ".zst"):
		return decompressWith(data, "zstd", "-dcq")
	case strings.HasSuffix(path, ".gz"):
		return decompressWith(data, "gzip", "-dc")
	}
	return nil, fmt.Errorf("%s: not an ELF module", path)
}

// cpioWriter writes the "newc" cpio format the kernel unpacks as initramfs.
type cpioWriter struct {
	w    *bufio.Writer
	ino  int
	n    int64
	err  error
	zero [4]byte
}

func newCpioWriter(w *bufio.Writer) *cpioWriter { return &cpioWriter{w: w, ino: 1} }

func (c *cpioWriter) entry(name string, mode uint32, data []byte, rmaj, rmin int) {
	if c.err != nil {
		return
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name + "\x00"))
	c.pad()
	c.write(data)
	c.pad()
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(c.zero[:4-r])
	}
}

func (c *cpioWriter) dir(name string, perm uint32) { c.entry(name, 0o040000|perm, nil, 0, 0) }
func (c *cpioWriter) file(name string, perm uint32, data []byte) {
	c.entry(name, 0o100000|perm, data, 0, 0)
}
func (c *cpioWriter) charDev(name string, perm uint32, maj, min int) {
	c.entry(name, 0o020000|perm, nil, maj, min)
}

func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
