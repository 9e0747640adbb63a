package runtime

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
)

// Kernel is a guest kernel ready to boot directly (no firmware, no bootloader).
type Kernel struct {
	// Image is the compressed kernel as installed (bzImage, /boot/vmlinuz-*).
	Image string
	// Vmlinux is the uncompressed ELF kernel extracted from Image. Booting it
	// through its PVH entry point skips the real-mode setup and the
	// self-decompression, about 3x faster than a bzImage under TCG.
	Vmlinux string
	// Version is the kernel release (the name of its /lib/modules directory).
	Version string
	// Modules is the kernel's module tree, /lib/modules/<Version>.
	Modules string
}

// FindKernel picks the guest kernel: path if non-empty, else $BOXRUN_KERNEL,
// else the newest /boot/vmlinuz-* whose modules are installed.
func FindKernel(path string) (string, error) {
	if path == "" {
		path = os.Getenv("BOXRUN_KERNEL")
	}
	if path != "" {
		if _, err := os.Stat(path); err != nil {
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "guest kernel %q", path)
		}
		return path, nil
	}
	matches, _ := filepath.Glob("/boot/vmlinuz-*")
	var found []string
	for _, m := range matches {
		ver := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		if st, err := os.Stat(filepath.Join("/lib/modules", ver, "modules.dep")); err == nil && !st.IsDir() {
			found = append(found, m)
		}
	}
	if len(found) == 0 {
		return "", errdefs.New(errdefs.RuntimeError,
			"no guest kernel: no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep; install linux-image-amd64 (scripts/setup.sh) or set BOXRUN_KERNEL")
	}
	sort.Slice(found, func(i, j int) bool { return versionLess(found[i], found[j]) })
	return found[len(found)-1], nil
}

// versionLess orders kernel file names by their dotted/dashed numeric parts.
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		var na, nb int
		_, ea := fmt.Sscanf(pa[i], "%d", &na)
		_, eb := fmt.Sscanf(pb[i], "%d", &nb)
		if ea == nil && eb == nil && na != nb {
			return na < nb
		}
		if pa[i] != pb[i] && (ea != nil || eb != nil) {
			return pa[i] < pb[i]
		}
	}
	return len(pa) < len(pb)
}

// PrepareKernel resolves the kernel at path (see FindKernel), finds its
// modules and extracts its uncompressed vmlinux into cacheDir once; later
// calls reuse the cached copy, keyed by the kernel's content hash.
func PrepareKernel(path, modulesDir, cacheDir string) (*Kernel, error) {
	img, err := FindKernel(path)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(img)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "read guest kernel")
	}
	k := &Kernel{Image: img}
	if ver, ok := bzImageVersion(data); ok {
		k.Version = ver
	} else {
		k.Version = strings.TrimPrefix(filepath.Base(img), "vmlinuz-")
	}
	if modulesDir == "" {
		modulesDir = filepath.Join("/lib/modules", k.Version)
	}
	if _, err := os.Stat(filepath.Join(modulesDir, "modules.dep")); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "guest kernel %s has no modules at %s", img, modulesDir)
	}
	k.Modules = modulesDir

	sum := sha256.Sum256(data)
	out := filepath.Join(cacheDir, "vmlinux-"+hex.EncodeToString(sum[:8]))
	if _, err := os.Stat(out); err == nil {
		k.Vmlinux = out
		return k, nil
	}
	if isELF(data) { // already uncompressed
		k.Vmlinux = img
		return k, nil
	}
	elf, err := extractVmlinux(data)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "extract vmlinux from %s", img)
	}
	if err := writeFileAtomic(out, elf, 0o644); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "cache vmlinux")
	}
	k.Vmlinux = out
	return k, nil
}

func isELF(b []byte) bool { return len(b) > 4 && string(b[:4]) == "\x7fELF" }

// bzImageVersion reads the kernel release string that a bzImage carries in
// its setup header (kernel_version field), e.g. "6.1.0-56-amd64".
func bzImageVersion(b []byte) (string, bool) {
	if len(b) < 0x210 || string(b[0x202:0x206]) != "HdrS" {
		return "", false
	}
	off := int(binary.LittleEndian.Uint16(b[0x20e:])) + 0x200
	if off <= 0x200 || off >= len(b) {
		return "", false
	}
	s := b[off:]
	if i := bytes.IndexAny(s, " \x00"); i > 0 {
		return string(s[:i]), true
	}
	return "", false
}

// extractVmlinux decompresses the payload of a bzImage. The setup header
// says where the compressed kernel is; its magic says how it is compressed.
// Debian compresses with xz and the x86 BCJ filter, which no pure-Go xz
// reader supports, so the host's decompressors do the work.
func extractVmlinux(b []byte) ([]byte, error) {
	if len(b) < 0x250 || string(b[0x202:0x206]) != "HdrS" {
		return nil, fmt.Errorf("not a bzImage")
	}
	setupSects := int(b[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	off := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(b[0x248:]))
	n := int(binary.LittleEndian.Uint32(b[0x24c:]))
	if off+n > len(b) || n <= 0 {
		return nil, fmt.Errorf("bad payload offset/length")
	}
	payload := b[off : off+n]
	var tool []string
	switch {
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		tool = []string{"xz", "-dc"}
	case bytes.HasPrefix(payload, []byte("\x28\xb5\x2f\xfd")):
		tool = []string{"zstd", "-dcq"}
	case bytes.HasPrefix(payload, []byte("\x1f\x8b")):
		tool = []string{"gzip", "-dc"}
	case bytes.HasPrefix(payload, []byte("\x02\x21\x4c\x18")):
		tool = []string{"lz4", "-dc"}
	case bytes.HasPrefix(payload, []byte("BZh")):
		tool = []string{"bzip2", "-dc"}
	case bytes.HasPrefix(payload, []byte("\x5d\x00\x00")):
		tool = []string{"xz", "--format=lzma", "-dc"}
	default:
		return nil, fmt.Errorf("unknown kernel compression (magic %x)", payload[:4])
	}
	out, err := decompressWith(payload, tool[0], tool[1:]...)
	if err != nil {
		return nil, err
	}
	return out, nil
}

// decompressWith pipes data through a host decompressor. Decompressors
// complain about bytes trailing the stream (a bzImage pads its payload), but
// the output is complete, so the result is judged by its ELF magic.
func decompressWith(data []byte, tool string, args ...string) ([]byte, error) {
	cmd := exec.Command(tool, args...)
	cmd.Stdin = bytes.NewReader(data)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	runErr := cmd.Run()
	if !isELF(out.Bytes()) {
		return nil, fmt.Errorf("%s: %v: %s", tool, runErr, strings.TrimSpace(stderr.String()))
	}
	return out.Bytes(), nil
}

// writeFileAtomic writes data to path through a temporary file and a rename,
// so concurrent engines never see a half-written cache entry.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := io.Copy(f, bytes.NewReader(data)); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
