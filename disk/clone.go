package disk

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun/errdefs"
)

// CloneDisk makes dst a copy of the disk image src that takes no more
// space than src's data: a reflink where the file system has them (XFS,
// Btrfs), else each of src's data extents copied in the kernel
// (copy_file_range), its holes left holes. A box's disk cloned from an
// image's template (a sparse file of a few MiB of data in 1 GiB or more)
// costs milliseconds. dst must not exist; on failure it is removed.
func CloneDisk(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "clone disk")
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "clone disk")
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "clone disk")
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = errdefs.Wrap(errdefs.RuntimeError, cerr, "clone disk")
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	if fileClone(int(out.Fd()), int(in.Fd())) == nil {
		return nil
	}
	if err := copyExtents(in, out, st.Size()); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "clone disk %s", src)
	}
	return nil
}

// The kernel's copies, replaced in tests to reach the fallbacks.
var (
	fileClone     = unix.IoctlFileClone
	copyFileRange = unix.CopyFileRange
)

// copyExtents copies the data extents of in (size bytes) to the same
// offsets of out, and gives out in's size.
func copyExtents(in, out *os.File, size int64) error {
	if err := out.Truncate(size); err != nil {
		return err
	}
	ifd, ofd := int(in.Fd()), int(out.Fd())
	inKernel := true
	var buf []byte
	for off := int64(0); off < size; {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole: %w", err)
		}
		for data < hole {
			var n int
			var err error
			if inKernel {
				roff, woff := data, data
				n, err = copyFileRange(ifd, &roff, ofd, &woff, int(min(hole-data, 1<<30)), 0)
				if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
					// Across file systems (Linux 5.19 and later refuse),
					// or not supported: copied here instead.
					inKernel = false
					continue
				}
			} else {
				if buf == nil {
					buf = make([]byte, 1<<20)
				}
				b := buf[:min(hole-data, int64(len(buf)))]
				if n, err = in.ReadAt(b, data); err == nil || errors.Is(err, io.EOF) && n > 0 {
					n, err = out.WriteAt(b[:n], data)
				}
			}
			if err != nil {
				return fmt.Errorf("copying at %d: %w", data, err)
			}
			if n == 0 {
				return io.ErrUnexpectedEOF // src shrank under us
			}
			data += int64(n)
		}
		off = hole
	}
	return nil
}
