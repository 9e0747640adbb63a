package main

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/boxrun/boxrun/boxrund/client"
	"golang.org/x/sync/errgroup"
)

// remoteSpec splits a cp argument: BOX:PATH is in a box when it has a ":"
// and the part before it does not start with "/" or "." (spec §7.4), so
// ./a:b and /x:y are local files.
func remoteSpec(arg string) (box, p string, remote bool) {
	i := strings.IndexByte(arg, ':')
	if i < 0 || strings.HasPrefix(arg, "/") || strings.HasPrefix(arg, ".") {
		return "", arg, false
	}
	return arg[:i], arg[i+1:], true
}

const cpHelp = `SRC or DST is BOX:PATH when it has a ":" and does not start with "/" or
"." (./a:b is a local file). A relative PATH in a box starts at its workdir.
"-" is stdin (upload) or stdout (download; a directory as a tar stream).

  boxrun cp dev:/root/out.bin .       a file: into ., under its name
  boxrun cp dev:/root/src ./src       a directory: ./src becomes the copy
                                      (into ./src/src if ./src exists)
  boxrun cp data.bin dev:/root/       into /root/, under its name
  boxrun cp ./proj dev:/root/proj     a directory, file by file

A directory comes down as a tar stream and is extracted safely: nothing
lands outside the target, links that point out of it are refused, setuid
bits are dropped. The server takes single files only, so a directory goes
up file by file; empty directories, modes and symlinks are then made in
the box with mkdir, chmod and ln (the image needs them; else a warning).
`

// cmdCp copies between a box and here, either way:
//
//   - BOX:FILE → LOCAL: the file; LOCAL an existing directory (or ending
//     in /) receives it under its name; parents are created. "-" writes it
//     to stdout.
//   - BOX:DIR → LOCAL: boxrund sends a tar stream, extracted safely: no
//     entry lands outside the target, links that point out of it are
//     refused, modes lose setuid/setgid, files are owned by the caller.
//     LOCAL an existing directory receives DIR under its name, else LOCAL
//     becomes the copy of DIR. "-" writes the tar stream to stdout.
//   - LOCAL FILE → BOX:PATH: PATH is the file's full path (ending in /: a
//     directory that receives it under its name). "-" reads stdin.
//   - LOCAL DIR → BOX:PATH: the server takes files only, so every regular
//     file is uploaded on its own (dest = PATH/relative path), four at a
//     time; then empty directories, modes other than 0644/0755 and
//     symlinks are made in the box with mkdir, chmod and ln (they need
//     those tools in the image; without them a warning is printed). PATH
//     ending in / receives DIR under its name.
func cmdCp(a *app, ctx context.Context, args []string) error {
	f := newFlags(a, "cp")
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usagef("cp needs SRC and DST")
	}
	sbox, spath, sremote := remoteSpec(pos[0])
	dbox, dpath, dremote := remoteSpec(pos[1])
	if sremote == dremote {
		return usagef("exactly one of SRC and DST must be BOX:PATH")
	}
	if sremote && sbox == "" || dremote && dbox == "" {
		return usagef("BOX:PATH needs a box name")
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	if sremote {
		a.box = sbox
		spath, err = a.boxPath(ctx, c, sbox, spath)
		if err != nil {
			return err
		}
		return a.download(ctx, c, sbox, spath, dpath)
	}
	a.box = dbox
	dpath, err = a.boxPath(ctx, c, dbox, dpath)
	if err != nil {
		return err
	}
	return a.upload(ctx, c, spath, dbox, dpath)
}

// boxPath makes a relative path in a box absolute, from the box's workdir.
func (a *app) boxPath(ctx context.Context, c *client.Client, box, p string) (string, error) {
	if strings.HasPrefix(p, "/") {
		return p, nil
	}
	b, err := c.GetBox(ctx, box)
	if err != nil {
		return "", err
	}
	dir := b.Workdir
	if dir == "" {
		dir = "/"
	}
	out := path.Join(dir, p)
	if strings.HasSuffix(p, "/") || p == "" {
		out += "/"
	}
	return out, nil
}

func (a *app) download(ctx context.Context, c *client.Client, box, src, dst string) error {
	d, err := c.Download(ctx, box, src)
	if err != nil {
		return err
	}
	defer d.Close()
	name := path.Base(path.Clean(src))
	if dst == "-" {
		_, err := io.Copy(a.stdout, d)
		return err
	}
	fi, statErr := os.Stat(dst)
	isDir := statErr == nil && fi.IsDir()
	if d.Dir {
		target := dst
		if isDir {
			target = filepath.Join(dst, name)
		}
		if err := extractTar(d, target, name, a.stderr); err != nil {
			return fmt.Errorf("extract %s:%s into %s: %w", box, src, target, err)
		}
		fmt.Fprintf(a.stdout, "Downloaded to %s\n", target)
		return nil
	}
	target := dst
	if isDir || strings.HasSuffix(dst, "/") {
		target = filepath.Join(dst, name)
	}
	if err := writeFileAtomic(target, d, d.Size); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "Downloaded to %s\n", target)
	return nil
}

// writeFileAtomic writes r to p through a temporary file beside it: a
// broken transfer leaves p as it was. Parents are created.
func writeFileAtomic(p string, r io.Reader, size int64) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".boxrun-*")
	if err != nil {
		return err
	}
	n, err := io.Copy(tmp, r)
	if err == nil && size >= 0 && n != size {
		err = fmt.Errorf("short transfer: %d of %d bytes", n, size)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), p)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// extractTar extracts a directory's tar stream (entries named
// "top/...") into target, which is created (or merged into). The stream
// comes from a box and is not trusted: every operation goes through an
// os.Root on target, so no entry or link can reach outside it; names with
// "..", absolute names, links whose target is absolute or leaves the
// tree, and entries of another top directory are refused; devices and
// fifos are skipped with a warning; modes keep their permission bits only.
func extractTar(r io.Reader, target, top string, warn io.Writer) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(target)
	if err != nil {
		return err
	}
	defer root.Close()
	type dirMeta struct {
		rel  string
		mode fs.FileMode
		hdr  *tar.Header
	}
	var dirs []dirMeta
	tr := tar.NewReader(r)
	first := true
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		rel, err := entryPath(hdr.Name, &top, first)
		if err != nil {
			return err
		}
		first = false
		mode := fs.FileMode(hdr.Mode).Perm()
		if rel == "." {
			if hdr.Typeflag != tar.TypeDir {
				return fmt.Errorf("archive: %q is not a directory", hdr.Name)
			}
			dirs = append(dirs, dirMeta{".", mode, hdr})
			continue
		}
		if dir := path.Dir(rel); dir != "." {
			if err := root.MkdirAll(dir, 0o755); err != nil {
				return err
			}
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := root.Mkdir(rel, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			dirs = append(dirs, dirMeta{rel, mode, hdr})
		case tar.TypeReg, tar.TypeRegA:
			removeNonDir(root, rel)
			f, err := root.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_EXCL, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err == nil {
				err = root.Chmod(rel, mode)
			}
			if err == nil && !hdr.ModTime.IsZero() {
				err = root.Chtimes(rel, hdr.ModTime, hdr.ModTime)
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := linkInside(rel, hdr.Linkname); err != nil {
				return err
			}
			removeNonDir(root, rel)
			if err := root.Symlink(hdr.Linkname, rel); err != nil {
				return err
			}
		case tar.TypeLink:
			old, err := entryPath(hdr.Linkname, &top, false)
			if err != nil || old == "." {
				return fmt.Errorf("archive: hard link %q to %q outside the tree", hdr.Name, hdr.Linkname)
			}
			removeNonDir(root, rel)
			if err := root.Link(old, rel); err != nil {
				return err
			}
		default:
			fmt.Fprintf(warn, "Warning: skipped %s (not a file, directory or link)\n", hdr.Name)
		}
	}
	// Directory modes and times last (deepest first): a read-only
	// directory must not stop its own extraction.
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i].rel) > len(dirs[j].rel) })
	for _, d := range dirs {
		if err := root.Chmod(d.rel, d.mode|0o700); err != nil {
			return err
		}
		if !d.hdr.ModTime.IsZero() {
			root.Chtimes(d.rel, d.hdr.ModTime, d.hdr.ModTime)
		}
	}
	return nil
}

// entryPath checks an archive name and returns it relative to the top
// directory ("." for the top itself). The first entry sets the top when
// first is set and *top is empty.
func entryPath(name string, top *string, first bool) (string, error) {
	if name == "" || strings.HasPrefix(name, "/") || strings.Contains(name, "\\") {
		return "", fmt.Errorf("archive: refusing entry %q", name)
	}
	for _, part := range strings.Split(strings.TrimSuffix(name, "/"), "/") {
		if part == ".." {
			return "", fmt.Errorf("archive: refusing entry %q (..)", name)
		}
	}
	clean := path.Clean(name)
	head, rest, _ := strings.Cut(clean, "/")
	if first && *top == "" {
		*top = head
	}
	if head != *top {
		return "", fmt.Errorf("archive: entry %q is not under %q", name, *top)
	}
	if rest == "" {
		return ".", nil
	}
	return rest, nil
}

// linkInside refuses a symlink at rel whose target is absolute or leads
// out of the tree.
func linkInside(rel, target string) error {
	if target == "" || path.IsAbs(target) {
		return fmt.Errorf("archive: refusing symlink %q -> %q (absolute)", rel, target)
	}
	j := path.Join(path.Dir(rel), target)
	if j == ".." || strings.HasPrefix(j, "../") {
		return fmt.Errorf("archive: refusing symlink %q -> %q (leads outside)", rel, target)
	}
	return nil
}

// removeNonDir removes rel when it exists and is not a directory (a file
// is replaced, never written through a link).
func removeNonDir(root *os.Root, rel string) {
	if fi, err := root.Lstat(rel); err == nil && !fi.IsDir() {
		root.Remove(rel)
	}
}

func (a *app) upload(ctx context.Context, c *client.Client, src, box, dst string) error {
	if src == "-" {
		if strings.HasSuffix(dst, "/") {
			return usagef("from stdin, DST must name a file")
		}
		if err := c.Upload(ctx, box, dst, a.stdin); err != nil {
			return err
		}
		fmt.Fprintf(a.stdout, "Uploaded to %s:%s\n", box, dst)
		return nil
	}
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if strings.HasSuffix(dst, "/") {
		dst = path.Join(dst, filepath.Base(filepath.Clean(src)))
	}
	if path.Clean(dst) == "/" {
		return usagef("DST must not be /")
	}
	if !fi.IsDir() {
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s is not a regular file or directory", src)
		}
		fh, err := os.Open(src)
		if err != nil {
			return err
		}
		defer fh.Close()
		if err := c.Upload(ctx, box, dst, fh); err != nil {
			return err
		}
		if m := fi.Mode().Perm(); m != 0o644 {
			if err := a.boxCmd(ctx, c, box, "chmod", fmt.Sprintf("%o", m), dst); err != nil {
				fmt.Fprintf(a.stderr, "Warning: mode %o not set in the box: %v\n", m, err)
			}
		}
		fmt.Fprintf(a.stdout, "Uploaded to %s:%s\n", box, dst)
		return nil
	}
	return a.uploadDir(ctx, c, src, box, dst)
}

// uploadDir uploads a directory file by file (see cmdCp).
func (a *app) uploadDir(ctx context.Context, c *client.Client, src, box, dst string) error {
	type file struct{ local, remote string }
	var files []file
	dirs := []string{dst}
	modes := map[fs.FileMode][]string{} // non-default modes → remote paths
	var links [][2]string               // target, remote path
	err := filepath.WalkDir(src, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		remote := path.Join(dst, filepath.ToSlash(rel))
		fi, err := de.Info()
		if err != nil {
			return err
		}
		switch {
		case de.IsDir():
			if rel != "." {
				dirs = append(dirs, remote)
			}
			if m := fi.Mode().Perm(); m != 0o755 {
				modes[m] = append(modes[m], remote)
			}
		case fi.Mode().IsRegular():
			files = append(files, file{p, remote})
			if m := fi.Mode().Perm(); m != 0o644 {
				modes[m] = append(modes[m], remote)
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			links = append(links, [2]string{t, remote})
		default:
			fmt.Fprintf(a.stderr, "Warning: skipped %s (not a file, directory or link)\n", p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for _, f := range files {
		g.Go(func() error {
			fh, err := os.Open(f.local)
			if err != nil {
				return err
			}
			defer fh.Close()
			if err := c.Upload(gctx, box, f.remote, fh); err != nil {
				return fmt.Errorf("upload %s: %w", f.local, err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	// What uploads cannot make: directories (the empty ones), modes,
	// links. The paths are absolute, so no "--" is needed (busybox's
	// chmod would take one after the mode for a file name).
	var fixErrs []error
	for _, batch := range batches(dirs, 200) {
		if err := a.boxCmd(ctx, c, box, append([]string{"mkdir", "-p"}, batch...)...); err != nil {
			fixErrs = append(fixErrs, err)
			break
		}
	}
	var perms []fs.FileMode
	for m := range modes {
		perms = append(perms, m)
	}
	sort.Slice(perms, func(i, j int) bool { return perms[i] < perms[j] })
	for _, m := range perms {
		for _, batch := range batches(modes[m], 200) {
			if err := a.boxCmd(ctx, c, box, append([]string{"chmod", fmt.Sprintf("%o", m)}, batch...)...); err != nil {
				fixErrs = append(fixErrs, err)
			}
		}
	}
	if len(links) > 0 {
		var args []string
		for _, l := range links {
			args = append(args, l[0], l[1])
		}
		for _, batch := range batches(args, 200) {
			script := `while [ $# -gt 1 ]; do ln -sfn -- "$1" "$2" || exit 1; shift 2; done`
			if err := a.boxCmd(ctx, c, box, append([]string{"sh", "-c", script, "sh"}, batch...)...); err != nil {
				fixErrs = append(fixErrs, err)
			}
		}
	}
	if len(fixErrs) > 0 {
		fmt.Fprintf(a.stderr, "Warning: directories, modes or links not all made in the box: %v\n", errors.Join(fixErrs...))
	}
	fmt.Fprintf(a.stdout, "Uploaded %d file(s) to %s:%s\n", len(files), box, dst)
	return nil
}

func batches(s []string, n int) [][]string {
	var out [][]string
	for len(s) > n {
		out = append(out, s[:n])
		s = s[n:]
	}
	if len(s) > 0 {
		out = append(out, s)
	}
	return out
}

// boxCmd runs argv in a box to its end; a non-zero exit is an error with
// its stderr.
func (a *app) boxCmd(ctx context.Context, c *client.Client, box string, argv ...string) error {
	x, err := c.StartExec(ctx, box, client.ExecRequest{Cmd: argv})
	if err != nil {
		return err
	}
	var stderr lockedBuffer
	st, err := c.Wait(ctx, x.ID, nil, &stderr)
	if err != nil {
		return err
	}
	if st.ExitCode == nil || *st.ExitCode != 0 {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = st.Error
		}
		return fmt.Errorf("%s: %s", argv[0], msg)
	}
	return nil
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
