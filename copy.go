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
	"slices"
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
// it sends must not even be written to the staging directory. (Untar then
// keeps every link inside the staging directory.)
func onlyUnder(r io.Reader, name string) *io.PipeReader {
	pr, pw := io.Pipe()
	go func() {
		tr, tw := tar.NewReader(r), tar.NewWriter(pw)
		f := treeFilter{root: name}
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				pw.CloseWithError(tw.Close())
				return
			}
			if err == nil {
				hdr, err = f.check(hdr)
			}
			if err == nil {
				err = tw.WriteHeader(hdr)
			}
			if err == nil {
				_, err = io.Copy(tw, tr)
			}
			if err != nil {
				pw.CloseWithError(err)
				return
			}
		}
	}()
	return pr
}

// treeFilter judges the entries of a tar stream from the box that must
// hold one tree, the path named root (entries "root" and "root/...").
// An entry outside the tree is an error.
//
// A strict filter makes the stream safe for a naive extractor (tar x,
// Python's tarfile without a filter), as a download's client may be: names
// are written cleaned (no "..", not absolute), and it leaves out
//   - symlinks whose target is absolute, climbs above the tree, or has a
//     ".." after a name (through a link, that climbs elsewhere): every link
//     kept leads to a place inside the tree;
//   - hard links to a path outside the tree or through a symlink;
//   - entries whose path is, or goes through, an earlier symlink entry: an
//     extractor would write through the link.
//
// The tree may be renamed: as names the entries it would be called as.
type treeFilter struct {
	root   string
	as     string // the tree's name in the output; "" keeps root
	strict bool
	links  map[string]bool // symlink entries passed, as lower-case rooted paths
}

// check returns the entry to write (renamed, if so), nil to leave it out,
// or an error for an entry outside the tree.
func (f *treeFilter) check(hdr *tar.Header) (*tar.Header, error) {
	// The agent writes no sparse entries (Go's archive/tar cannot): one is
	// a hostile agent's, whose few bytes of sparse map would expand to
	// terabytes of zeros here.
	if hdr.Typeflag == tar.TypeGNUSparse {
		return nil, fmt.Errorf("archive from box has a sparse entry %q", hdr.Name)
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return nil, fmt.Errorf("archive from box has a sparse entry %q", hdr.Name)
		}
	}
	root := "/" + f.root
	n := strings.TrimSuffix(path.Clean("/"+hdr.Name), "/")
	if n != root && !strings.HasPrefix(n, root+"/") {
		return nil, fmt.Errorf("archive from box has entry %q outside %q", hdr.Name, f.root)
	}
	if !f.strict {
		return hdr, nil
	}
	if f.as != "" {
		n = "/" + f.as + n[len(root):]
		root = "/" + f.as
	}
	if f.throughLink(n) {
		return nil, nil
	}
	out := *hdr
	out.Name = n[1:]
	out.Format = tar.FormatUnknown // the writer picks one that holds the new names
	switch hdr.Typeflag {
	case tar.TypeDir:
		out.Name += "/"
	case tar.TypeSymlink:
		if !linkInside(path.Dir(n), hdr.Linkname, root) {
			return nil, nil
		}
		if f.links == nil {
			f.links = make(map[string]bool)
		}
		f.links[strings.ToLower(n)] = true
	case tar.TypeLink:
		// Link names are archive paths, like entry names; no "..": tar
		// never writes one, and an extractor resolves it on disk.
		t := hdr.Linkname
		if strings.HasPrefix(t, "/") || slices.Contains(strings.Split(t, "/"), "..") {
			return nil, nil
		}
		t = path.Clean("/" + t)
		if f.as != "" && (t == "/"+f.root || strings.HasPrefix(t, "/"+f.root+"/")) {
			t = "/" + f.as + t[len(f.root)+1:]
		}
		if t != root && !strings.HasPrefix(t, root+"/") || f.throughLink(t) {
			return nil, nil
		}
		out.Linkname = t[1:]
	}
	return &out, nil
}

// throughLink reports whether the rooted path n is, or is below, a symlink
// entry passed before (case-insensitively: the client's file system may
// not tell "A" from "a").
func (f *treeFilter) throughLink(n string) bool {
	if len(f.links) == 0 {
		return false
	}
	for p := strings.ToLower(n); p != "/"; p = path.Dir(p) {
		if f.links[p] {
			return true
		}
	}
	return false
}

// linkInside reports whether a symlink in the directory dir (rooted) with
// target target leads to root or below it, whatever other links of the
// tree it goes through: not absolute, and ".." only at its start (a ".."
// after a name that is itself a link would climb from the link's target).
func linkInside(dir, target, root string) bool {
	if target == "" || strings.HasPrefix(target, "/") {
		return false
	}
	named := false
	for _, c := range strings.Split(target, "/") {
		switch c {
		case "", ".":
		case "..":
			if named {
				return false
			}
		default:
			named = true
		}
	}
	t := path.Join(dir, target)
	return t == root || strings.HasPrefix(t, root+"/")
}

// maxSymlinkHops bounds how many symlinks are followed to reach a path, as
// Linux does (ELOOP after 40).
const maxSymlinkHops = 40

// linkTarget is the box path a symlink at p with target target leads to:
// an absolute target is taken from the box's root, a relative one from
// p's directory. It is resolved again inside the box, which keeps it there.
func linkTarget(p, target string) string {
	if path.IsAbs(target) {
		return path.Clean(target)
	}
	return path.Join(path.Dir(p), target)
}

// copyOutStream starts the agent's archive of p. stop ends the transfer
// and returns the agent's error: at once when abort (the agent's context
// is canceled), else once the agent has finished (after the whole archive
// was read).
func copyOutStream(ctx context.Context, lb *liveBox, p string) (r *io.PipeReader, stop func(abort bool) error) {
	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := lb.agent.CopyOut(ctx, p, pw)
		pw.CloseWithError(err)
		done <- err
	}()
	return pr, func(abort bool) error {
		if abort {
			cancel()
		}
		pr.CloseWithError(io.ErrClosedPipe) // unblocks the agent's writer
		err := <-done
		cancel()
		return err
	}
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
// it. A symlink at p is followed inside the box, as Stat does (an absolute
// target from the box's root, at most 40 links). The caller must Close the
// reader. A missing file is a RUNTIME_ERROR
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
	asked := p
	for hops := 0; ; hops++ {
		pr, stopCopy := copyOutStream(ctx, lb, p)
		// Close ends the transfer early or after the file's data (the
		// archive's end may still be in flight): the agent's context is
		// canceled, and so are its errors of that kind.
		stop := func() error {
			if err := stopCopy(true); err != nil && !errdefs.Is(err, errdefs.Canceled) && !errors.Is(err, io.ErrClosedPipe) {
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
			if aerr := stopCopy(true); aerr != nil && !errdefs.Is(aerr, errdefs.Canceled) {
				err = aerr
			}
			if st, serr := lb.agent.Stat(ctx, p); serr == nil && !st.Exists {
				return nil, errdefs.New(errdefs.RuntimeError, "File '%s' not found in box", asked)
			}
			return nil, errdefs.Wrap(errdefs.CodeOf(err), err, "read %s:%s", box, asked)
		}
		// The archive comes from the guest: it must be exactly the asked file.
		switch {
		case strings.TrimSuffix(hdr.Name, "/") != path.Base(p) || hdr.Size < 0:
			return fail(errdefs.New(errdefs.RuntimeError, "read %s:%s: archive from box names %q", box, asked, hdr.Name))
		case hdr.Typeflag == tar.TypeSymlink:
			// As Stat does: follow it, inside the box.
			stop()
			if hops == maxSymlinkHops {
				return nil, errdefs.New(errdefs.RuntimeError, "read %s:%s: too many levels of symbolic links", box, asked)
			}
			if p = linkTarget(p, hdr.Linkname); p == "/" {
				return nil, errdefs.New(errdefs.ValidationError, "'%s' in box is a directory", asked)
			}
			continue
		case hdr.Typeflag == tar.TypeDir:
			return fail(errdefs.New(errdefs.ValidationError, "'%s' in box is a directory", asked))
		case hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeRegA:
			return fail(errdefs.New(errdefs.ValidationError, "'%s' in box is not a regular file", asked))
		}
		return &FileReader{Size: hdr.Size, Mode: os.FileMode(hdr.Mode).Perm(), r: tr, stop: stop}, nil
	}
}

// ReadTar writes a tar stream of p in a running box (a file or a directory
// tree; entries named relative to p's parent) to w. When p itself is a
// symlink it is followed inside the box, as Stat does, and the tree is
// named as p; symlinks below it are archived as links. The stream is safe
// for a naive extractor although the box is untrusted: entries outside p
// are refused, and links that lead out of the tree, and entries reached
// through a link, are left out (see treeFilter).
func (e *Engine) ReadTar(ctx context.Context, box, p string, w io.Writer) error {
	if !path.IsAbs(p) || path.Clean(p) == "/" {
		return errdefs.New(errdefs.ValidationError, "read tar: %q must be an absolute path below /", p)
	}
	_, lb, err := e.running(box)
	if err != nil {
		return err
	}
	p = path.Clean(p)
	asked := p
	for hops := 0; ; hops++ {
		pr, stop := copyOutStream(ctx, lb, p)
		tr := tar.NewReader(pr)
		hdr, err := tr.Next()
		if err == nil && hdr.Typeflag == tar.TypeSymlink && strings.TrimSuffix(hdr.Name, "/") == path.Base(p) {
			stop(true)
			if hops == maxSymlinkHops {
				return errdefs.New(errdefs.RuntimeError, "read %s:%s: too many levels of symbolic links", box, asked)
			}
			if p = linkTarget(p, hdr.Linkname); p == "/" {
				return errdefs.New(errdefs.ValidationError, "read tar: %s in box leads to /: name a path below /", asked)
			}
			continue
		}
		if err == nil {
			err = writeTree(w, tr, hdr, &treeFilter{root: path.Base(p), as: path.Base(asked), strict: true})
		}
		if aerr := stop(err != nil); aerr != nil && (err == nil || errors.Is(err, aerr) || errors.Is(err, io.ErrClosedPipe)) {
			err = aerr
		}
		if err != nil {
			return errdefs.Wrap(errdefs.CodeOf(err), err, "read %s:%s", box, asked)
		}
		return nil
	}
}

// writeTree writes the tar stream tr, whose first header is first, to w
// through the filter f.
func writeTree(w io.Writer, tr *tar.Reader, first *tar.Header, f *treeFilter) error {
	tw := tar.NewWriter(w)
	for hdr := first; ; {
		out, err := f.check(hdr)
		if err != nil {
			return err
		}
		if out != nil {
			if err := tw.WriteHeader(out); err != nil {
				return err
			}
			if _, err := io.Copy(tw, tr); err != nil {
				return err
			}
		}
		if hdr, err = tr.Next(); err == io.EOF {
			return tw.Close()
		} else if err != nil {
			return err
		}
	}
}
