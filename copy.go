package boxrun

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
)

// Copy copies a file or directory tree between the host and a box, like
// `docker cp`: exactly one of src and dst is "BOX:/abs/path" (BOX an id or
// name). When dst is an existing directory the copy lands inside it under
// src's base name; otherwise it is created as dst. Modes, symlinks and
// mtimes are kept. Nothing from the box is ever written outside dst.
func (e *Engine) Copy(ctx context.Context, src, dst string) error {
	sbox, spath, sIn := splitBoxPath(src)
	dbox, dpath, dIn := splitBoxPath(dst)
	switch {
	case sIn == dIn:
		return errdefs.New(errdefs.ValidationError, "copy: exactly one of %q and %q must be BOX:/path", src, dst)
	case dIn:
		return e.copyIn(ctx, src, dbox, dpath)
	default:
		return e.copyOut(ctx, sbox, spath, dst)
	}
}

// splitBoxPath splits "box:/path". A host path that contains a colon is
// written with a leading "/" or "." to keep it a host path.
func splitBoxPath(s string) (box, p string, ok bool) {
	if strings.HasPrefix(s, "/") || strings.HasPrefix(s, ".") {
		return "", s, false
	}
	box, p, ok = strings.Cut(s, ":")
	if !ok || box == "" {
		return "", s, false
	}
	return box, p, true
}

func (e *Engine) copyIn(ctx context.Context, hostPath, box, guestPath string) error {
	if !path.IsAbs(guestPath) {
		return errdefs.New(errdefs.ValidationError, "copy: box path %q must be absolute", guestPath)
	}
	if _, err := os.Lstat(hostPath); err != nil {
		return errdefs.Wrap(errdefs.ValidationError, err, "copy")
	}
	_, lb, err := e.running(box)
	if err != nil {
		return err
	}
	guestPath = path.Clean(guestPath)
	dir, name := path.Dir(guestPath), path.Base(guestPath)
	if st, err := lb.agent.Stat(ctx, guestPath); err != nil {
		return err
	} else if st.Exists && st.IsDir {
		dir, name = guestPath, filepath.Base(filepath.Clean(hostPath))
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(agentexec.TarPath(pw, hostPath, name)) }()
	err = lb.agent.CopyIn(ctx, dir, pr)
	pr.CloseWithError(io.ErrClosedPipe)
	if err != nil {
		return errdefs.Wrap(errdefs.CodeOf(err), err, "copy %s to %s:%s", hostPath, box, guestPath)
	}
	return nil
}

func (e *Engine) copyOut(ctx context.Context, box, guestPath, hostPath string) error {
	if !path.IsAbs(guestPath) {
		return errdefs.New(errdefs.ValidationError, "copy: box path %q must be absolute", guestPath)
	}
	_, lb, err := e.running(box)
	if err != nil {
		return err
	}
	guestPath = path.Clean(guestPath)
	hostPath = filepath.Clean(hostPath)
	if guestPath == "/" {
		return errdefs.New(errdefs.ValidationError, "copy: cannot copy the box's whole root; name a path below /")
	}
	// Extract into a private directory next to the destination, then move
	// the one top-level entry into place: the box chooses every name in the
	// archive, the host alone chooses where it ends up.
	target := hostPath
	if st, err := os.Stat(hostPath); err == nil && st.IsDir() {
		target = filepath.Join(hostPath, path.Base(guestPath))
	}
	stage, err := os.MkdirTemp(filepath.Dir(target), ".boxrun-copy-*")
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "copy")
	}
	defer os.RemoveAll(stage)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		filtered := onlyUnder(pr, path.Base(guestPath))
		err := agentexec.Untar(filtered, stage, "")
		// Unblock whichever side still writes: the filter, then the agent.
		filtered.CloseWithError(io.ErrClosedPipe)
		pr.CloseWithError(err)
		done <- err
	}()
	err = lb.agent.CopyOut(ctx, guestPath, pw)
	pw.CloseWithError(err)
	if uerr := <-done; err == nil {
		err = uerr
	}
	if err != nil {
		return errdefs.Wrap(errdefs.CodeOf(err), err, "copy %s:%s to %s", box, guestPath, hostPath)
	}
	// The stage directory must hold exactly the entry named after the source.
	got := filepath.Join(stage, path.Base(guestPath))
	if _, err := os.Lstat(got); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "copy %s:%s: archive from box lacks %s", box, guestPath, path.Base(guestPath))
	}
	// A file replaces a file; a directory never replaces a non-empty one.
	if err := os.Rename(got, target); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "copy")
	}
	return nil
}

// onlyUnder passes a tar stream through, failing at the first entry that
// is not name or below it: the box answers for one path, and anything else
// it sends must not even be written to the staging directory.
func onlyUnder(r io.Reader, name string) *io.PipeReader {
	pr, pw := io.Pipe()
	go func() {
		tr, tw := tar.NewReader(r), tar.NewWriter(pw)
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				pw.CloseWithError(tw.Close())
				return
			}
			if err != nil {
				pw.CloseWithError(err)
				return
			}
			n := strings.TrimSuffix(path.Clean("/"+hdr.Name), "/")
			if n != "/"+name && !strings.HasPrefix(n, "/"+name+"/") {
				pw.CloseWithError(fmt.Errorf("archive from box has entry %q outside %q", hdr.Name, name))
				return
			}
			if err := tw.WriteHeader(hdr); err != nil {
				pw.CloseWithError(err)
				return
			}
			if _, err := io.Copy(tw, tr); err != nil {
				pw.CloseWithError(err)
				return
			}
		}
	}()
	return pr
}

// Stat describes path p in a running box, following symlinks inside the
// box. A missing path is Exists == false, not an error.
func (e *Engine) Stat(ctx context.Context, box, p string) (FileInfo, error) {
	if !path.IsAbs(p) {
		return FileInfo{}, errdefs.New(errdefs.ValidationError, "path %q must be absolute", p)
	}
	_, lb, err := e.running(box)
	if err != nil {
		return FileInfo{}, err
	}
	return lb.agent.Stat(ctx, path.Clean(p))
}

// WriteFile streams r into a regular file at p in a running box, creating
// its parent directories. The data is written aside and renamed into place
// once complete, so a failed write leaves p as it was. r may be of any
// length: nothing is buffered whole, on the host or in the guest. The file
// is owned by root with mode's permission bits (0644 when zero).
func (e *Engine) WriteFile(ctx context.Context, box, p string, r io.Reader, mode os.FileMode) error {
	if !path.IsAbs(p) || path.Clean(p) == "/" {
		return errdefs.New(errdefs.ValidationError, "write file: %q must be an absolute path to a file", p)
	}
	_, lb, err := e.running(box)
	if err != nil {
		return err
	}
	if err := lb.agent.WriteFile(ctx, path.Clean(p), mode.Perm(), r); err != nil {
		return errdefs.Wrap(errdefs.CodeOf(err), err, "write %s:%s", box, p)
	}
	return nil
}

// FileReader streams a regular file out of a box; see [Engine.OpenFile].
type FileReader struct {
	Size int64       // bytes the reader will yield
	Mode os.FileMode // permission bits in the box
	r    io.Reader
	stop func() error
}

func (f *FileReader) Read(p []byte) (int, error) { return f.r.Read(p) }

// Close ends the transfer (early, if not everything was read).
func (f *FileReader) Close() error { return f.stop() }

// OpenFile opens the regular file at p in a running box for reading. Its
// size is known before the first byte is read, so a server can announce
// it. The caller must Close the reader. A missing file is a RUNTIME_ERROR
// "File 'p' not found in box"; a directory is a VALIDATION_ERROR (use
// [Engine.ReadTar]).
func (e *Engine) OpenFile(ctx context.Context, box, p string) (*FileReader, error) {
	if !path.IsAbs(p) || path.Clean(p) == "/" {
		return nil, errdefs.New(errdefs.ValidationError, "read file: %q must be an absolute path to a file", p)
	}
	_, lb, err := e.running(box)
	if err != nil {
		return nil, err
	}
	p = path.Clean(p)
	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := lb.agent.CopyOut(ctx, p, pw)
		pw.CloseWithError(err)
		done <- err
	}()
	stop := func() error {
		cancel()
		pr.CloseWithError(io.ErrClosedPipe) // unblocks the agent's writer
		if err := <-done; err != nil && !errdefs.Is(err, errdefs.Canceled) && !errors.Is(err, io.ErrClosedPipe) {
			return err
		}
		return nil
	}
	fail := func(err error) (*FileReader, error) {
		stop()
		return nil, err
	}
	tr := tar.NewReader(pr)
	hdr, err := tr.Next()
	if err != nil {
		if st, serr := lb.agent.Stat(ctx, p); serr == nil && !st.Exists {
			return fail(errdefs.New(errdefs.RuntimeError, "File '%s' not found in box", p))
		}
		return fail(errdefs.Wrap(errdefs.CodeOf(err), err, "read %s:%s", box, p))
	}
	// The archive comes from the guest: it must be exactly the asked file.
	switch {
	case hdr.Typeflag == tar.TypeDir:
		return fail(errdefs.New(errdefs.ValidationError, "'%s' in box is a directory", p))
	case hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeRegA:
		return fail(errdefs.New(errdefs.ValidationError, "'%s' in box is not a regular file", p))
	case strings.TrimSuffix(hdr.Name, "/") != path.Base(p) || hdr.Size < 0:
		return fail(errdefs.New(errdefs.RuntimeError, "read %s:%s: archive from box names %q", box, p, hdr.Name))
	}
	return &FileReader{Size: hdr.Size, Mode: os.FileMode(hdr.Mode).Perm(), r: tr, stop: stop}, nil
}

// ReadTar writes a tar stream of p in a running box (a file or a directory
// tree; entries named relative to p's parent, symlinks not followed) to w.
// Entries outside p that a hostile guest might add are refused.
func (e *Engine) ReadTar(ctx context.Context, box, p string, w io.Writer) error {
	if !path.IsAbs(p) || path.Clean(p) == "/" {
		return errdefs.New(errdefs.ValidationError, "read tar: %q must be an absolute path below /", p)
	}
	_, lb, err := e.running(box)
	if err != nil {
		return err
	}
	p = path.Clean(p)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := lb.agent.CopyOut(ctx, p, pw)
		pw.CloseWithError(err)
		done <- err
	}()
	filtered := onlyUnder(pr, path.Base(p))
	_, err = io.Copy(w, filtered)
	filtered.CloseWithError(io.ErrClosedPipe)
	pr.CloseWithError(io.ErrClosedPipe)
	if aerr := <-done; aerr != nil && (err == nil || errors.Is(err, aerr)) {
		err = aerr
	}
	if err != nil {
		return errdefs.Wrap(errdefs.CodeOf(err), err, "read %s:%s", box, p)
	}
	return nil
}
