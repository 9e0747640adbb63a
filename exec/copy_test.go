package exec

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/exec/internal/fsroot"
	"golang.org/x/sys/unix"
)

// copyIn copies the host path src into dir in the box, as the engine does.
func copyIn(c *Client, src, dir string) error {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(TarPath(pw, src, "")) }()
	err := c.CopyIn(context.Background(), dir, pr)
	pr.CloseWithError(io.ErrClosedPipe)
	return err
}

// copyOut copies the box path p into the host directory dst.
func copyOut(c *Client, p, dst string) error {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := Untar(pr, dst, ".")
		pr.CloseWithError(err)
		done <- err
	}()
	err := c.CopyOut(context.Background(), p, pw)
	pw.CloseWithError(err)
	if uerr := <-done; err == nil {
		err = uerr
	}
	return err
}

func sha(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestCopyBigFile(t *testing.T) {
	c := startServer(t, ServerOptions{})
	src := t.TempDir()
	data := make([]byte, 20<<20)
	rand.Read(data)
	os.WriteFile(src+"/big.bin", data, 0o600)

	box := t.TempDir() + "/box/dest" // created, with parents, by CopyIn
	start := time.Now()
	if err := copyIn(c, src+"/big.bin", box); err != nil {
		t.Fatal(err)
	}
	inTime := time.Since(start)
	if sha(t, box+"/big.bin") != sha256.Sum256(data) {
		t.Fatal("copied in file differs")
	}
	out := t.TempDir()
	start = time.Now()
	if err := copyOut(c, box+"/big.bin", out); err != nil {
		t.Fatal(err)
	}
	outTime := time.Since(start)
	if sha(t, out+"/big.bin") != sha256.Sum256(data) {
		t.Fatal("copied out file differs")
	}
	t.Logf("20 MiB: copy in %v, copy out %v", inTime, outTime)
}

var testMtime = time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)

// makeTree builds a tree with a subdirectory, an executable, a symlink, a
// hardlink and fixed mtimes.
func makeTree(t *testing.T, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(root+"/sub/deeper", 0o755))
	must(os.WriteFile(root+"/run.sh", []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(root+"/sub/data.txt", []byte("data"), 0o640))
	must(os.Link(root+"/sub/data.txt", root+"/sub/hard.txt"))
	must(os.Symlink("../run.sh", root+"/sub/link"))
	must(os.Symlink("/nonexistent/abs", root+"/abs-link"))
	must(os.Chmod(root+"/sub/deeper", 0o711))
	ts := []unix.Timespec{unix.NsecToTimespec(testMtime.UnixNano()), unix.NsecToTimespec(testMtime.UnixNano())}
	for _, p := range []string{"run.sh", "sub/data.txt", "sub/link", "abs-link", "sub/deeper", "sub", "."} {
		must(unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(root, p), ts, unix.AT_SYMLINK_NOFOLLOW))
	}
}

func checkTree(t *testing.T, root string) {
	t.Helper()
	for _, tc := range []struct {
		path string
		mode fs.FileMode
		link string
	}{
		{"run.sh", 0o755, ""},
		{"sub", fs.ModeDir | 0o755, ""},
		{"sub/deeper", fs.ModeDir | 0o711, ""},
		{"sub/data.txt", 0o640, ""},
		{"sub/hard.txt", 0o640, ""},
		{"sub/link", fs.ModeSymlink | 0o777, "../run.sh"},
		{"abs-link", fs.ModeSymlink | 0o777, "/nonexistent/abs"},
	} {
		p := filepath.Join(root, tc.path)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Error(err)
			continue
		}
		if fi.Mode() != tc.mode {
			t.Errorf("%s: mode %v, want %v", tc.path, fi.Mode(), tc.mode)
		}
		if !fi.ModTime().Equal(testMtime) {
			t.Errorf("%s: mtime %v, want %v", tc.path, fi.ModTime().UTC(), testMtime)
		}
		if tc.link != "" {
			if l, _ := os.Readlink(p); l != tc.link {
				t.Errorf("%s: link %q, want %q", tc.path, l, tc.link)
			}
		}
	}
	a, _ := os.Stat(root + "/sub/data.txt")
	b, _ := os.Stat(root + "/sub/hard.txt")
	if !os.SameFile(a, b) {
		t.Error("hardlink not kept")
	}
	if b, _ := os.ReadFile(root + "/sub/link"); string(b) != "#!/bin/sh\necho hi\n" {
		t.Errorf("through link: %q", b)
	}
}

func TestCopyTree(t *testing.T) {
	c := startServer(t, ServerOptions{})
	src := t.TempDir() + "/tree"
	makeTree(t, src)
	box := t.TempDir()
	if err := copyIn(c, src, box); err != nil {
		t.Fatal(err)
	}
	checkTree(t, box+"/tree")
	// The executable runs in the box.
	if r := run(t, c, Command{Args: []string{box + "/tree/run.sh"}}); r.stdout != "hi\n" {
		t.Errorf("run.sh: %q %+v", r.stdout, r.exit)
	}
	out := t.TempDir()
	if err := copyOut(c, box+"/tree", out); err != nil {
		t.Fatal(err)
	}
	checkTree(t, out+"/tree")

	// A symlink is copied out as a symlink.
	out2 := t.TempDir()
	if err := copyOut(c, box+"/tree/sub/link", out2); err != nil {
		t.Fatal(err)
	}
	if l, err := os.Readlink(out2 + "/link"); err != nil || l != "../run.sh" {
		t.Errorf("copy out of a symlink: %q %v", l, err)
	}
}

func TestCopyOutMissing(t *testing.T) {
	c := startServer(t, ServerOptions{})
	var buf bytes.Buffer
	err := c.CopyOut(context.Background(), "/no/such/path", &buf)
	var e *errdefs.Error
	if !errdefsAs(err, &e) || e.Code != errdefs.RuntimeError || !strings.Contains(e.Message, "no such file or directory") {
		t.Errorf("got %v", err)
	}
	if buf.Len() != 0 {
		t.Errorf("wrote %d bytes", buf.Len())
	}
}

func TestCopyInBadArchive(t *testing.T) {
	c := startServer(t, ServerOptions{})
	err := c.CopyIn(context.Background(), t.TempDir(), strings.NewReader(strings.Repeat("not a tar ", 1000)))
	if !errdefs.Is(err, errdefs.RuntimeError) {
		t.Errorf("got %v", err)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Errorf("connection broken after a bad archive: %v", err)
	}
}

func errdefsAs(err error, e **errdefs.Error) bool {
	for err != nil {
		if x, ok := err.(*errdefs.Error); ok {
			*e = x
			return true
		}
		err = errorsUnwrap(err)
	}
	return false
}

func errorsUnwrap(err error) error {
	u, ok := err.(interface{ Unwrap() error })
	if !ok {
		return nil
	}
	return u.Unwrap()
}

// --- path escapes --------------------------------------------------------

type entry struct {
	name, link string
	typ        byte
	body       string
}

func makeTar(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body))}
		if e.typ == tar.TypeDir {
			h.Mode = 0o755
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// snapshot lists everything under dir except the subtree skip.
func snapshot(t *testing.T, dir, skip string) map[string]string {
	t.Helper()
	m := map[string]string{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if p == skip {
			return filepath.SkipDir
		}
		fi, _ := d.Info()
		var st unix.Stat_t
		unix.Lstat(p, &st)
		m[p] = fi.Mode().String() + " " + fi.ModTime().String() + " " + string(rune('0'+st.Nlink))
		return nil
	})
	return m
}

func withFallback(t *testing.T, f func(t *testing.T)) {
	t.Run("openat2", f)
	t.Run("walk", func(t *testing.T) {
		fsroot.ForceWalk(true)
		defer fsroot.ForceWalk(false)
		f(t)
	})
}

func TestUntarContainsEscapes(t *testing.T) {
	withFallback(t, testUntarContainsEscapes)
}

func testUntarContainsEscapes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		entries []entry
		inside  []string // must exist under root afterwards
	}{
		{"dotdot", []entry{{name: "../../x", typ: tar.TypeReg, body: "x"}}, []string{"dest/x"}},
		{"absolute", []entry{{name: "/etc/boxrun-escape", typ: tar.TypeReg, body: "x"}}, []string{"dest/etc/boxrun-escape"}},
		{"symlink-abs-then-write", []entry{
			{name: "l", link: "/", typ: tar.TypeSymlink},
			{name: "l/escaped", typ: tar.TypeReg, body: "x"},
		}, []string{"escaped"}},
		{"symlink-up-then-write", []entry{
			{name: "l", link: "../../../../../../..", typ: tar.TypeSymlink},
			{name: "l/escaped", typ: tar.TypeReg, body: "x"},
			{name: "l/newdir/escaped", typ: tar.TypeReg, body: "x"},
		}, []string{"escaped", "newdir/escaped"}},
		{"symlink-to-outside-abs-path", []entry{
			{name: "l", link: "OUTSIDE", typ: tar.TypeSymlink},
			{name: "l/secret", typ: tar.TypeReg, body: "overwritten"},
		}, nil},
		{"symlink-replacing-dir", []entry{
			{name: "d/", typ: tar.TypeDir},
			{name: "d", link: "/..", typ: tar.TypeSymlink},
			{name: "d/escaped", typ: tar.TypeReg, body: "x"},
		}, []string{"escaped"}},
		{"hardlink-dotdot", []entry{{name: "h", link: "../../outside/secret", typ: tar.TypeLink}}, nil},
		{"hardlink-abs", []entry{{name: "h", link: "OUTSIDE/secret", typ: tar.TypeLink}}, nil},
		{"hardlink-through-symlink", []entry{
			{name: "l", link: "OUTSIDE", typ: tar.TypeSymlink},
			{name: "h", link: "l/secret", typ: tar.TypeLink},
		}, nil},
		{"pre-existing-symlink", []entry{{name: "pre/secret", typ: tar.TypeReg, body: "overwritten"}}, nil},
		{"pre-existing-symlink-file", []entry{{name: "prefile", typ: tar.TypeReg, body: "overwritten"}}, []string{"dest/prefile"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			root, outside := tmp+"/root", tmp+"/outside"
			os.MkdirAll(root+"/dest", 0o755)
			os.MkdirAll(outside, 0o755)
			os.WriteFile(outside+"/secret", []byte("secret"), 0o600)
			// Symlinks already in the root that point outside of it.
			os.Symlink(outside, root+"/dest/pre")
			os.Symlink(outside+"/secret", root+"/dest/prefile")
			for i := range tc.entries {
				tc.entries[i].link = strings.ReplaceAll(tc.entries[i].link, "OUTSIDE", outside)
			}
			before := snapshot(t, tmp, root)
			err := Untar(bytes.NewReader(makeTar(t, tc.entries...)), root, "dest")
			after := snapshot(t, tmp, root)
			for p, v := range after {
				if before[p] != v {
					t.Errorf("outside root changed: %s: %q -> %q", p, before[p], v)
				}
			}
			if len(before) != len(after) {
				t.Errorf("outside root: %d entries before, %d after", len(before), len(after))
			}
			if b, _ := os.ReadFile(outside + "/secret"); string(b) != "secret" {
				t.Errorf("secret overwritten: %q", b)
			}
			for _, p := range tc.inside {
				if _, serr := os.Lstat(filepath.Join(root, p)); serr != nil {
					t.Errorf("expected %s inside root (untar err %v)", p, err)
				}
			}
			t.Logf("untar: %v", err)
		})
	}
}

// A server whose Root is a directory treats it as "/": symlinks in the box
// cannot lead CopyIn, CopyOut or Stat out of it.
func TestServerRootContainment(t *testing.T) {
	withFallback(t, testServerRootContainment)
}

func testServerRootContainment(t *testing.T) {
	tmp := t.TempDir()
	box, outside := tmp+"/box", tmp+"/outside"
	os.MkdirAll(box+"/etc", 0o755)
	os.MkdirAll(outside, 0o755)
	os.WriteFile(outside+"/secret", []byte("secret"), 0o600)
	os.WriteFile(box+"/etc/secret", []byte("box secret"), 0o600)
	os.Symlink("/", box+"/to-root")
	os.Symlink("../../../../..", box+"/up")
	os.Symlink(outside, box+"/to-outside")
	c := startServer(t, ServerOptions{Root: box})
	ctx := context.Background()

	before := snapshot(t, tmp, box)
	src := t.TempDir()
	os.WriteFile(src+"/secret", []byte("evil"), 0o644)
	for _, dest := range []string{"/to-root", "/up", "/to-outside", "/up/" + outside} {
		if err := copyIn(c, src+"/secret", dest); err != nil {
			t.Logf("copy in to %s: %v", dest, err)
		}
	}
	after := snapshot(t, tmp, box)
	for p, v := range after {
		if before[p] != v {
			t.Errorf("outside the box changed: %s", p)
		}
	}
	if b, _ := os.ReadFile(outside + "/secret"); string(b) != "secret" {
		t.Errorf("secret overwritten: %q", b)
	}
	if b, _ := os.ReadFile(box + "/secret"); string(b) != "evil" {
		t.Errorf("copy to /to-root should land in the box root: %q", b)
	}

	// Stat and CopyOut resolve in the box too.
	fi, err := c.Stat(ctx, "/up/etc/secret")
	if err != nil || !fi.Exists || fi.Size != int64(len("box secret")) {
		t.Errorf("stat /up/etc/secret: %+v %v", fi, err)
	}
	// The host path names a file in the box (written by the copy to /up/...).
	if fi, _ := c.Stat(ctx, outside+"/secret"); fi.Size != int64(len("evil")) {
		t.Errorf("stat of a host path: %+v", fi)
	}
	if b, _ := os.ReadFile(box + outside + "/secret"); string(b) != "evil" {
		t.Errorf("copy to /up/<outside> should land in the box: %q", b)
	}
	out := t.TempDir()
	if err := copyOut(c, "/to-root/etc/secret", out); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out + "/secret"); string(b) != "box secret" {
		t.Errorf("copy out through /to-root: %q", b)
	}
}

// busyboxRoot is a box root with the host's static busybox as /bin/busybox,
// the commands names as links to it, and an empty /etc.
func busyboxRoot(t *testing.T, names ...string) string {
	t.Helper()
	bb, err := os.ReadFile("/usr/bin/busybox")
	if err != nil {
		t.Skip("no static busybox on this host")
	}
	box := t.TempDir()
	os.MkdirAll(box+"/bin", 0o755)
	os.MkdirAll(box+"/etc", 0o755)
	os.WriteFile(box+"/bin/busybox", bb, 0o755)
	for _, n := range names {
		os.Symlink("/bin/busybox", box+"/bin/"+n) // absolute: resolved in the box
	}
	return box
}

// Commands run chrooted into Root.
func TestServerRootChroot(t *testing.T) {
	box := busyboxRoot(t, "sh", "id", "pwd", "ls", "cat")
	os.MkdirAll(box+"/home/app", 0o755)
	os.WriteFile(box+"/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"), 0o644)
	os.WriteFile(box+"/etc/group", []byte("root:x:0:\napp:x:1000:\nextra:x:2000:app\n"), 0o644)
	os.WriteFile(box+"/marker", []byte("in the box\n"), 0o644)
	c := startServer(t, ServerOptions{Root: box})

	r := run(t, c, Command{Args: []string{"sh", "-c", "cat /marker; pwd; id -u; id -G; echo $HOME"}, User: "app", Dir: "/home/app"})
	want := "in the box\n/home/app\n1000\n1000 2000\n/home/app\n"
	if r.stdout != want || r.exit.Code != 0 {
		t.Errorf("got %q (%q, %+v), want %q", r.stdout, r.stderr, r.exit, want)
	}
	if _, err := c.Start(context.Background(), Command{Args: []string{"bash"}}); err == nil || !strings.Contains(err.Error(), "executable file not found") {
		t.Errorf("bash in a busybox box: %v", err)
	}
}

// What a guest sends to the host must not plant setuid programs or files
// owned by someone else, even when the host side runs as root.
func TestUntarOnHostDropsOwnersAndSetID(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := []byte("#!/bin/sh\n")
	tw.WriteHeader(&tar.Header{Name: "suid", Mode: 0o4755 | 0o2000, Size: int64(len(body)), Uid: 1234, Gid: 1234, Typeflag: tar.TypeReg})
	tw.Write(body)
	tw.WriteHeader(&tar.Header{Name: "dir/", Mode: 0o2775, Uid: 1234, Typeflag: tar.TypeDir})
	tw.Close()
	root := t.TempDir()
	if err := Untar(&buf, root, "/"); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{"suid": 0o755, "dir": 0o775 | os.ModeDir} {
		st, err := os.Lstat(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != want {
			t.Errorf("%s: mode %v, want %v", name, st.Mode(), want)
		}
		if uid := st.Sys().(*syscall.Stat_t).Uid; int(uid) != os.Geteuid() {
			t.Errorf("%s: owned by %d, want the caller %d", name, uid, os.Geteuid())
		}
	}
}

// A box's users are resolved from its passwd and group once, and again
// whenever either file changes: in place with the same size and its
// modification time put back, replaced by a rename, or removed. Each new
// version is cached in turn once it is over a second old (file times have
// the kernel tick's granularity: younger files are not cached).
func TestServerUserCacheFollowsTheFiles(t *testing.T) {
	box := busyboxRoot(t, "sh", "id")
	passwd := func(uid string) []byte {
		return []byte("root:x:0:0:root:/root:/bin/sh\napp:x:" + uid + ":1000:app:/:/bin/sh\n")
	}
	old := time.Now().Add(-time.Minute)
	settle := func() {
		for _, f := range []string{"/etc/passwd", "/etc/group"} {
			os.Chtimes(box+f, old, old)
		}
		time.Sleep(1100 * time.Millisecond) // ctime cannot be set back
	}
	os.WriteFile(box+"/etc/passwd", passwd("1001"), 0o644)
	os.WriteFile(box+"/etc/group", []byte("root:x:0:\napp:x:1000:\nextra:x:2000:app\n"), 0o644)
	settle()
	c := startServer(t, ServerOptions{Root: box})
	ids := func() string {
		t.Helper()
		r := run(t, c, Command{Args: []string{"sh", "-c", "id -u; id -G"}, User: "app"})
		if r.exit.Code != 0 {
			t.Fatalf("id: %q %+v", r.stderr, r.exit)
		}
		return trim(r.stdout)
	}
	hits := func() int64 { return users.hits.Load() }
	// expect checks the ids twice: the second lookup must come from the
	// cache and give the same answer.
	expect := func(what, want string) {
		t.Helper()
		if got := ids(); got != want {
			t.Fatalf("%s: ids %q, want %q", what, got, want)
		}
		h := hits()
		if got := ids(); got != want || hits() != h+1 {
			t.Fatalf("%s, again: ids %q (want %q), cache hits %d -> %d (want one more)", what, got, want, h, hits())
		}
	}
	expect("first", "1001\n1000 2000")
	// Rewritten in place, same size, its modification time put back.
	f, err := os.OpenFile(box+"/etc/passwd", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(passwd("1002"), 0)
	f.Close()
	settle()
	expect("after an in-place rewrite", "1002\n1000 2000")
	// Replaced by another file.
	os.WriteFile(box+"/etc/passwd.new", passwd("1003"), 0o644)
	os.Rename(box+"/etc/passwd.new", box+"/etc/passwd")
	settle()
	expect("after a rename over it", "1003\n1000 2000")
	// The group file gone: app keeps its uid, loses its extra group.
	os.Remove(box + "/etc/group")
	settle()
	expect("without /etc/group", "1003\n1000")
}

// A file of mostly zeros (a sparse file in the box: a disk image,
// `truncate -s`) is written with holes: it takes the space of its data on
// the host, not its size, and reads back the same.
func TestUntarWritesZerosAsHoles(t *testing.T) {
	const size = 64 << 20
	data := make([]byte, size)
	copy(data[10<<20:], "data in the middle")
	copy(data[20<<20+12345:], bytes.Repeat([]byte{0xff}, 100<<10)) // not block-aligned
	// ends in 40 MiB of zeros: the size must still be 64 MiB
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "disk.img", Mode: 0o644, Size: size, Typeflag: tar.TypeReg})
	tw.Write(data)
	tw.WriteHeader(&tar.Header{Name: "zeros", Mode: 0o644, Size: 1 << 20, Typeflag: tar.TypeReg})
	tw.Write(make([]byte, 1<<20))
	tw.Close()
	root := t.TempDir()
	if err := Untar(&buf, root, "/"); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(root, "disk.img"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("disk.img read back differs (%d bytes, %v)", len(got), err)
	}
	for name, wantSize := range map[string]int64{"disk.img": size, "zeros": 1 << 20} {
		st, err := os.Stat(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		used := st.Sys().(*syscall.Stat_t).Blocks * 512
		t.Logf("%s: size %d, %d bytes allocated", name, st.Size(), used)
		if st.Size() != wantSize || used > 1<<20 {
			t.Errorf("%s: size %d (want %d), %d bytes allocated (want its data only, under 1 MiB)", name, st.Size(), wantSize, used)
		}
	}
}
