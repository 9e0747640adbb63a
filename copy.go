package boxrun

import (
	"archive/tar"
	"context"
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
