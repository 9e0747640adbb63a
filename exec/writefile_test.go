package exec

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// tempLeftovers lists the WriteFile temporary files under dir.
func tempLeftovers(t *testing.T, dir string) []string {
	t.Helper()
	var found []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(d.Name(), ".boxrun-tmp") {
			found = append(found, p)
		}
		return nil
	})
	return found
}

func checkFile(t *testing.T, p, content string, mode os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != mode {
		t.Errorf("%s: mode %v, want %v", p, fi.Mode(), mode)
	}
	if b, _ := os.ReadFile(p); string(b) != content {
		t.Errorf("%s: content %q, want %q", p, b, content)
	}
}

func TestWriteFileNestedDirs(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	ctx := context.Background()
	if err := c.WriteFile(ctx, "/a/b/c/file.txt", 0o640, strings.NewReader("hello\n")); err != nil {
		t.Fatal(err)
	}
	checkFile(t, box+"/a/b/c/file.txt", "hello\n", 0o640)
	for _, d := range []string{"a", "a/b", "a/b/c"} {
		fi, err := os.Stat(filepath.Join(box, d))
		if err != nil || !fi.IsDir() {
			t.Errorf("%s: %v %v", d, fi, err)
		}
	}
	// An empty stream makes an empty file; the mode defaults to 0644 and
	// loses setuid/setgid/sticky bits.
	for _, tc := range []struct {
		p    string
		mode os.FileMode
		want os.FileMode
	}{
		{"/empty", 0, 0o644},
		{"/suid", os.ModeSetuid | os.ModeSetgid | os.ModeSticky | 0o755, 0o755},
		{"/octal-suid", 0o4755, 0o755},
		{"/exec", 0o700, 0o700},
		{"/trailing/./x/../y", 0o600, 0o600},
	} {
		if err := c.WriteFile(ctx, tc.p, tc.mode, strings.NewReader("")); err != nil {
			t.Fatalf("%s: %v", tc.p, err)
		}
		checkFile(t, filepath.Join(box, filepath.Clean(tc.p)), "", tc.want)
	}
	if l := tempLeftovers(t, box); len(l) > 0 {
		t.Errorf("temporary files left: %v", l)
	}
	if fi, err := c.Stat(ctx, "/a/b/c/file.txt"); err != nil || fi.Size != 6 {
		t.Errorf("stat: %+v %v", fi, err)
	}
}

func TestWriteFileValidation(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	for _, p := range []string{"", "relative/file", "/", "/..", "//", "/a/../.."} {
		err := c.WriteFile(context.Background(), p, 0, strings.NewReader("x"))
		if !errdefs.Is(err, errdefs.ValidationError) {
			t.Errorf("%q: got %v, want a ValidationError", p, err)
		}
	}
	// The agent checks too.
	for _, p := range []string{"relative", "/", "/.."} {
		_, err := c.call(context.Background(), &request{Op: "writefile", Path: p})
		if !errdefs.Is(err, errdefs.ValidationError) {
			t.Errorf("agent, %q: got %v, want a ValidationError", p, err)
		}
	}
	if ents, _ := os.ReadDir(box); len(ents) != 0 {
		t.Errorf("box not empty: %v", ents)
	}
}

func TestWriteFileOverwrite(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	ctx := context.Background()
	os.MkdirAll(box+"/etc", 0o755)
	os.WriteFile(box+"/etc/conf", []byte(strings.Repeat("old content ", 100)), 0o600)
	if err := c.WriteFile(ctx, "/etc/conf", 0o644, strings.NewReader("new")); err != nil {
		t.Fatal(err)
	}
	checkFile(t, box+"/etc/conf", "new", 0o644)

	// A symlink at p is replaced, not followed.
	os.WriteFile(box+"/etc/target", []byte("target"), 0o644)
	os.Symlink("target", box+"/etc/link")
	if err := c.WriteFile(ctx, "/etc/link", 0o600, strings.NewReader("replaced")); err != nil {
		t.Fatal(err)
	}
	checkFile(t, box+"/etc/link", "replaced", 0o600)
	checkFile(t, box+"/etc/target", "target", 0o644)
	if l := tempLeftovers(t, box); len(l) > 0 {
		t.Errorf("temporary files left: %v", l)
	}
}

func TestWriteFileOverDirectory(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	os.MkdirAll(box+"/data/dir", 0o755)
	os.WriteFile(box+"/data/dir/child", []byte("child"), 0o644)
	// The directory itself, and through a symlink to it.
	os.Symlink("data", box+"/data-link")
	for _, p := range []string{"/data/dir", "/data/dir/", "/data-link/dir"} {
		err := c.WriteFile(context.Background(), p, 0, strings.NewReader(strings.Repeat("x", 1<<20)))
		if !errdefs.Is(err, errdefs.RuntimeError) || !strings.Contains(err.Error(), "is a directory") {
			t.Errorf("%s: got %v, want is a directory", p, err)
		}
	}
	checkFile(t, box+"/data/dir/child", "child", 0o644)
	if fi, err := os.Lstat(box + "/data/dir"); err != nil || !fi.IsDir() {
		t.Errorf("directory replaced: %v %v", fi, err)
	}
	if l := tempLeftovers(t, box); len(l) > 0 {
		t.Errorf("temporary files left: %v", l)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Errorf("connection broken: %v", err)
	}
}

// failingReader returns n bytes, then err.
type failingReader struct {
	n   int
	err error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		return 0, r.err
	}
	n := min(len(p), r.n)
	clear(p[:n])
	r.n -= n
	return n, nil
}

func TestWriteFileReaderFails(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	ctx := context.Background()
	boom := errors.New("boom")
	os.WriteFile(box+"/existing", []byte("keep me"), 0o640)
	for _, p := range []string{"/new/file", "/existing"} {
		// More than a window, so the agent has written part of it.
		err := c.WriteFile(ctx, p, 0o644, &failingReader{n: 3 * window, err: boom})
		if !errors.Is(err, boom) || !errdefs.Is(err, errdefs.RuntimeError) {
			t.Errorf("%s: got %v, want boom", p, err)
		}
		// Cleaned up by the time WriteFile returns.
		if l := tempLeftovers(t, box); len(l) > 0 {
			t.Errorf("%s: temporary files left: %v", p, l)
		}
	}
	if _, err := os.Lstat(box + "/new/file"); !os.IsNotExist(err) {
		t.Errorf("file created: %v", err)
	}
	checkFile(t, box+"/existing", "keep me", 0o640)

	// The same for CopyIn, which shares the send loop.
	err := c.CopyIn(ctx, "/copy", &failingReader{n: 3 * window, err: boom})
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "reading archive") {
		t.Errorf("copy in: got %v", err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Errorf("connection broken: %v", err)
	}
}

// blockingReader returns n bytes, then blocks until release is closed and
// fails.
type blockingReader struct {
	n       int
	blocked chan struct{} // closed when it starts blocking
	release chan struct{}
}

func (r *blockingReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		close(r.blocked)
		<-r.release
		return 0, io.ErrClosedPipe
	}
	n := min(len(p), r.n)
	clear(p[:n])
	r.n -= n
	return n, nil
}

func TestWriteFileCancel(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	os.WriteFile(box+"/existing", []byte("keep me"), 0o640)
	ctx, cancel := context.WithCancel(context.Background())
	r := &blockingReader{n: 100 << 10, blocked: make(chan struct{}), release: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- c.WriteFile(ctx, "/existing", 0o644, r) }()
	<-r.blocked
	// The agent has its temporary file.
	deadline := time.Now().Add(5 * time.Second)
	for len(tempLeftovers(t, box)) == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if len(tempLeftovers(t, box)) == 0 {
		t.Fatal("no temporary file while writing")
	}
	cancel()
	// The agent stops and cleans up even while the Read blocks.
	deadline = time.Now().Add(5 * time.Second)
	for len(tempLeftovers(t, box)) > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if l := tempLeftovers(t, box); len(l) > 0 {
		t.Errorf("temporary files left: %v", l)
	}
	close(r.release)
	if err := <-done; !errdefs.Is(err, errdefs.Canceled) {
		t.Errorf("got %v, want Canceled", err)
	}
	checkFile(t, box+"/existing", "keep me", 0o640)

	// Cancelled before it starts: nothing is sent.
	if err := c.WriteFile(ctx, "/other", 0, strings.NewReader("x")); !errdefs.Is(err, errdefs.Canceled) {
		t.Errorf("cancelled ctx: %v", err)
	}
	if _, err := os.Lstat(box + "/other"); !os.IsNotExist(err) {
		t.Errorf("file created with a cancelled ctx: %v", err)
	}
	if err := c.Ping(context.Background()); err != nil {
		t.Errorf("connection broken: %v", err)
	}
}

// Symlinks in the box, absolute or relative, resolve inside the box root.
func TestWriteFileContainment(t *testing.T) {
	withFallback(t, testWriteFileContainment)
}

func testWriteFileContainment(t *testing.T) {
	tmp := t.TempDir()
	box, outside := tmp+"/box", tmp+"/outside"
	os.MkdirAll(box+"/root", 0o755)
	os.MkdirAll(outside, 0o755)
	os.WriteFile(outside+"/secret", []byte("secret"), 0o600)
	os.Symlink(outside, box+"/root/escape")                    // absolute
	os.Symlink("../../../../../../.."+outside, box+"/root/up") // relative, climbing
	os.Symlink(outside+"/secret", box+"/root/secret-link")     // a file outside
	os.Symlink("../..", box+"/root/dotdot")
	c := startServer(t, ServerOptions{Root: box})
	ctx := context.Background()

	before := snapshot(t, tmp, box)
	// The links dangle in the box: the parents cannot be created through
	// them (as with mkdir -p).
	for _, p := range []string{"/root/escape/file", "/root/up/file", "/root/escape/new/dir/file"} {
		if err := c.WriteFile(ctx, p, 0o644, strings.NewReader("evil")); !errdefs.Is(err, errdefs.RuntimeError) {
			t.Errorf("%s through a dangling link: %v", p, err)
		}
	}
	if _, err := os.Lstat(box + outside); !os.IsNotExist(err) {
		t.Errorf("created %s in the box: %v", outside, err)
	}
	// With the targets present in the box, the files land there.
	os.MkdirAll(box+outside, 0o755)
	for _, p := range []string{
		"/root/escape/file",
		"/root/escape/new/dir/file",
		"/root/up/file",
		"/root/up/secret",
		"/root/dotdot/dotdot-file",
		"/../../../file-above",
		"/root/secret-link",
		"/root/escape", // the link itself is replaced
		outside + "/secret",
	} {
		if err := c.WriteFile(ctx, p, 0o644, strings.NewReader("evil")); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	after := snapshot(t, tmp, box)
	for p, v := range after {
		if before[p] != v {
			t.Errorf("outside the box changed: %s", p)
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("outside the box removed: %s", p)
		}
	}
	if b, _ := os.ReadFile(outside + "/secret"); string(b) != "secret" {
		t.Errorf("secret overwritten: %q", b)
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 1 {
		t.Errorf("written outside the box: %v", ents)
	}
	// Where the files did land: the link targets, taken inside the box.
	for _, p := range []string{
		outside + "/file", outside + "/new/dir/file", outside + "/secret",
		"/dotdot-file", "/file-above", "/root/secret-link", "/root/escape",
	} {
		checkFile(t, box+p, "evil", 0o644)
	}
}

// genReader generates n bytes of a pattern without holding them.
type genReader struct {
	n, off int64
}

func (g *genReader) Read(p []byte) (int, error) {
	if g.off >= g.n {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), g.n-g.off)]
	for i := range p {
		x := g.off + int64(i)
		p[i] = byte(x ^ x>>8 ^ x>>16)
	}
	g.off += int64(len(p))
	return len(p), nil
}

func TestWriteFileLarge(t *testing.T) {
	box := t.TempDir()
	c := startServer(t, ServerOptions{Root: box})
	const size = 64 << 20
	h := sha256.New()
	if _, err := io.Copy(h, &genReader{n: size}); err != nil {
		t.Fatal(err)
	}
	want := h.Sum(nil)
	start := time.Now()
	if err := c.WriteFile(context.Background(), "/big/file.bin", 0o600, &genReader{n: size}); err != nil {
		t.Fatal(err)
	}
	t.Logf("64 MiB in %v", time.Since(start))
	fi, err := os.Stat(box + "/big/file.bin")
	if err != nil || fi.Size() != size || fi.Mode() != 0o600 {
		t.Fatalf("got %v %v", fi, err)
	}
	f, _ := os.Open(box + "/big/file.bin")
	defer f.Close()
	h.Reset()
	io.Copy(h, f)
	if !bytes.Equal(h.Sum(nil), want) {
		t.Error("content differs")
	}
}
