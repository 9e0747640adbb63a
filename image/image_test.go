package image

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/internal/testenv"
)

// testStore opens a Store in fresh temp dirs and closes it when the test
// ends, failing the test if Close fails or leaves a mount behind.
func testStore(t *testing.T, opts Options) *Store {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("containers/storage needs root")
	}
	opts.Root, opts.RunRoot = t.TempDir(), t.TempDir()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if m := mountsUnder(t, opts.Root, opts.RunRoot); len(m) > 0 {
			t.Errorf("mounts left after Close: %v", m)
		}
	})
	return s
}

// mountsUnder lists this process's mount points under the given dirs.
func mountsUnder(t *testing.T, dirs ...string) []string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var found []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		for _, d := range dirs {
			if fields[4] == d || strings.HasPrefix(fields[4], d+"/") {
				found = append(found, fields[4])
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return found
}

// writeConf writes a registries.conf into a temp dir and returns its path.
func writeConf(t *testing.T, format string, args ...any) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "registries.conf")
	if err := os.WriteFile(p, fmt.Appendf(nil, format, args...), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// insecureConf marks the test registries as plain-HTTP registries.
func insecureConf(t *testing.T, addrs ...string) string {
	var b strings.Builder
	for _, a := range addrs {
		fmt.Fprintf(&b, "[[registry]]\nlocation = %q\ninsecure = true\n\n", a)
	}
	return writeConf(t, "%s", b.String())
}

// manifestDigest returns the digest of the only manifest of an OCI layout.
func manifestDigest(t *testing.T, layoutDir string) digest.Digest {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(layoutDir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	return idx.Manifests[0].Digest
}

// checkBusybox checks an Image pulled from a testenv.BusyboxLayout.
func checkBusybox(t *testing.T, img *Image) {
	t.Helper()
	if len(img.ID) != 64 {
		t.Errorf("ID = %q", img.ID)
	}
	if !slices.Contains(img.Config.Env, "IMAGE_VAR=from-image") {
		t.Errorf("Env = %q, want IMAGE_VAR=from-image", img.Config.Env)
	}
	if !slices.Equal(img.Config.Cmd, []string{"sh"}) {
		t.Errorf("Cmd = %q, want [sh]", img.Config.Cmd)
	}
	// The layer holds busybox (about 2 MB) and little else.
	if img.Size < 1<<20 || img.Size > 16<<20 {
		t.Errorf("Size = %d", img.Size)
	}
}

// checkRootfs mounts an image and looks for busybox files in it.
func checkRootfs(t *testing.T, s *Store, id string) {
	t.Helper()
	rootfs, err := s.Mount(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(rootfs, "bin", "busybox")); err != nil || fi.Size() < 1<<20 {
		t.Errorf("bin/busybox: %v, %v", fi, err)
	}
	if l, err := os.Readlink(filepath.Join(rootfs, "bin", "sh")); err != nil || l != "/bin/busybox" {
		t.Errorf("bin/sh -> %q, %v", l, err)
	}
	if b, err := os.ReadFile(filepath.Join(rootfs, "etc", "passwd")); err != nil || !strings.Contains(string(b), "app:x:1000:1000:") {
		t.Errorf("etc/passwd = %q, %v", b, err)
	}
	if err := s.Unmount(id); err != nil {
		t.Fatal(err)
	}
	if err := s.Unmount(id); !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("second Unmount = %v, want VALIDATION_ERROR", err)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// recorder collects progress events.
type recorder struct {
	mu     sync.Mutex
	events []Progress
}

func (r *recorder) record(p Progress) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, p)
}

func (r *recorder) take() []Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	ev := r.events
	r.events = nil
	return ev
}

// count returns how many events of a kind were seen for a blob.
func count(events []Progress, layer, event string) int {
	n := 0
	for _, e := range events {
		if e.Layer == layer && e.Event == event {
			n++
		}
	}
	return n
}

// layerDigest returns the digest of the only layer of an OCI layout.
func layerDigest(t *testing.T, layoutDir string) digest.Digest {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(layoutDir, "blobs", "sha256", manifestDigest(t, layoutDir).Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m.Layers[0].Digest
}

// TestPullRegistry pulls over real HTTP into the default driver, mounts the
// result, and pulls again with the registry stopped.
func TestPullRegistry(t *testing.T) {
	reg := testenv.StartRegistry(t)
	layout := testenv.BusyboxLayout(t)
	ref := reg.Push(t, layout, "library/busybox:latest")
	rec := &recorder{}
	s := testStore(t, Options{RegistriesConf: insecureConf(t, reg.Addr), Progress: rec.record})
	t.Logf("driver: %s", s.Driver())
	ctx := context.Background()

	img, err := s.Pull(ctx, "docker://"+ref)
	if err != nil {
		t.Fatal(err)
	}
	checkBusybox(t, img)
	if img.Ref != "docker://"+ref {
		t.Errorf("Ref = %q", img.Ref)
	}
	if want := manifestDigest(t, layout); img.Digest != want {
		t.Errorf("Digest = %s, want %s", img.Digest, want)
	}

	events := rec.take()
	layer := layerDigest(t, layout).String()
	if count(events, layer, "start") != 1 || count(events, layer, "done") != 1 {
		t.Errorf("layer %s: events %+v, want one start and one done", layer, events)
	}
	for _, e := range events {
		if e.Ref != "docker://"+ref || e.Total <= 0 || e.Offset < 0 || e.Offset > e.Total {
			t.Errorf("bad event %+v", e)
		}
	}

	rootfs, err := s.Mount(ctx, img.ID)
	if err != nil {
		t.Fatal(err)
	}
	if s.Driver() == "overlay" {
		if err := os.WriteFile(filepath.Join(rootfs, "new"), nil, 0o644); err == nil {
			t.Error("overlay rootfs is writable")
		}
		if len(mountsUnder(t, rootfs)) != 1 {
			t.Errorf("%s is not a mount point", rootfs)
		}
	}
	if err := s.Unmount(img.ID); err != nil {
		t.Fatal(err)
	}
	checkRootfs(t, s, img.ID)

	// With the registry gone, pulls of names already in the store still
	// work: they must not have contacted it.
	reg.Stop()
	for _, again := range []string{"docker://" + ref, ref, strings.TrimSuffix(ref, ":latest")} {
		img2, err := s.Pull(ctx, again)
		if err != nil {
			t.Fatalf("pull %s after registry stop: %v", again, err)
		}
		if img2.ID != img.ID || img2.Digest != img.Digest || img2.Ref != "docker://"+ref {
			t.Errorf("pull %s = %+v, want %+v", again, img2, img)
		}
	}
	if ev := rec.take(); len(ev) != 0 {
		t.Errorf("cached pulls reported progress: %+v", ev)
	}
}

// TestPullBareNameAndDigest pulls a bare name and a digest reference.
func TestPullBareNameAndDigest(t *testing.T) {
	reg := testenv.StartRegistry(t)
	layout := testenv.BusyboxLayout(t, testenv.WithUser("app"), testenv.WithWorkingDir("/home/app"))
	ref := reg.Push(t, layout, "library/busybox:1.0")
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: insecureConf(t, reg.Addr)})
	ctx := context.Background()

	img, err := s.Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	checkBusybox(t, img)
	if img.Ref != "docker://"+ref || img.Config.User != "app" || img.Config.WorkingDir != "/home/app" {
		t.Errorf("img = %+v", img)
	}
	checkRootfs(t, s, img.ID)

	byDigest := reg.Addr + "/library/busybox@" + manifestDigest(t, layout).String()
	img2, err := s.Pull(ctx, byDigest)
	if err != nil {
		t.Fatal(err)
	}
	if img2.ID != img.ID || img2.Ref != "docker://"+byDigest {
		t.Errorf("by digest: %+v, want ID %s", img2, img.ID)
	}
	reg.Stop()
	if _, err := s.Pull(ctx, byDigest); err != nil {
		t.Errorf("digest pull after registry stop: %v", err)
	}
}

// TestPullInsecureNeedsConf shows that registries.conf is what allows plain
// HTTP: the same pull without it fails.
func TestPullInsecureNeedsConf(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxLayout(t), "library/busybox:latest")
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: writeConf(t, "# nothing\n")})
	_, err := s.Pull(context.Background(), ref)
	if !errdefs.Is(err, errdefs.ImagePullFailed) || !strings.Contains(err.Error(), ref) {
		t.Fatalf("pull without insecure registry = %v, want IMAGE_PULL_FAILED", err)
	}
}

func TestPullMirror(t *testing.T) {
	reg := testenv.StartRegistry(t)
	reg.Push(t, testenv.BusyboxLayout(t), "library/busybox:latest")
	conf := writeConf(t, `
[[registry]]
location = "docker.example.invalid/library"

[[registry.mirror]]
location = "%s/library"
insecure = true
`, reg.Addr)
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: conf})

	img, err := s.Pull(context.Background(), "docker.example.invalid/library/busybox:latest")
	if err != nil {
		t.Fatal(err)
	}
	checkBusybox(t, img)
	if img.Ref != "docker://docker.example.invalid/library/busybox:latest" {
		t.Errorf("Ref = %q", img.Ref)
	}
}

func TestPullShortNameAlias(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxLayout(t), "library/busybox:latest")
	conf := writeConf(t, `
[aliases]
"mybox" = "%s/library/busybox"

[[registry]]
location = %q
insecure = true
`, reg.Addr, reg.Addr)
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: conf})

	for _, name := range []string{"mybox", "mybox:latest"} {
		img, err := s.Pull(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		checkBusybox(t, img)
		if img.Ref != "docker://"+ref {
			t.Errorf("%s: Ref = %q, want docker://%s", name, img.Ref, ref)
		}
	}
}

// TestPullUnqualifiedSearch tries the search registries in order: the
// first one is down, the second has the image.
func TestPullUnqualifiedSearch(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxLayout(t), "tools/busybox:latest")
	conf := writeConf(t, `
unqualified-search-registries = ["127.0.0.1:1", %q]

[[registry]]
location = "127.0.0.1:1"
insecure = true

[[registry]]
location = %q
insecure = true
`, reg.Addr, reg.Addr)
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: conf})

	img, err := s.Pull(context.Background(), "tools/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if img.Ref != "docker://"+ref {
		t.Errorf("Ref = %q, want docker://%s", img.Ref, ref)
	}

	_, err = s.Pull(context.Background(), "tools/missing:1")
	if !errdefs.Is(err, errdefs.ImagePullFailed) || !strings.Contains(err.Error(), "2 candidates failed") ||
		!strings.Contains(err.Error(), "127.0.0.1:1/tools/missing:1") || !strings.Contains(err.Error(), reg.Addr+"/tools/missing:1") {
		t.Errorf("missing image: %v", err)
	}
}

// TestRegistriesConfDropIn reads registries.conf.d next to the given file.
func TestRegistriesConfDropIn(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxLayout(t), "library/busybox:latest")
	conf := writeConf(t, "# see registries.conf.d\n")
	if err := os.Mkdir(conf+".d", 0o755); err != nil {
		t.Fatal(err)
	}
	dropIn := fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n", reg.Addr)
	if err := os.WriteFile(filepath.Join(conf+".d", "test.conf"), []byte(dropIn), 0o644); err != nil {
		t.Fatal(err)
	}
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: conf})
	if _, err := s.Pull(context.Background(), ref); err != nil {
		t.Fatal(err)
	}
}

func TestPullBlocked(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxLayout(t), "library/busybox:latest")
	conf := writeConf(t, "[[registry]]\nlocation = %q\ninsecure = true\nblocked = true\n", reg.Addr)
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: conf})
	_, err := s.Pull(context.Background(), ref)
	if !errdefs.Is(err, errdefs.ImagePullFailed) || !strings.Contains(err.Error(), "blocked") {
		t.Fatalf("pull from blocked registry = %v", err)
	}
}

func TestPullUnreachable(t *testing.T) {
	s := testStore(t, Options{Driver: "vfs"})
	const ref = "127.0.0.1:1/nope:latest"
	_, err := s.Pull(context.Background(), ref)
	var e *errdefs.Error
	if !errors.As(err, &e) || e.Code != errdefs.ImagePullFailed {
		t.Fatalf("err = %#v, want *errdefs.Error IMAGE_PULL_FAILED", err)
	}
	if msg := err.Error(); !strings.Contains(msg, `pull "`+ref+`"`) || !strings.Contains(msg, "connection refused") {
		t.Errorf("message %q should name the ref and the cause", msg)
	}

	for _, bad := range []string{"", "Not/A/Valid:Name:x", "oci:", "docker-archive:/nonexistent.tar"} {
		if _, err := s.Pull(context.Background(), bad); !errdefs.Is(err, errdefs.ImagePullFailed) {
			t.Errorf("pull %q = %v, want IMAGE_PULL_FAILED", bad, err)
		}
	}
}

// TestPullCanceled aborts a pull from a registry that never answers.
func TestPullCanceled(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // hold it open, say nothing
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: insecureConf(t, l.Addr().String())})

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = s.Pull(ctx, l.Addr().String()+"/library/busybox:latest")
	if !errdefs.Is(err, errdefs.ImagePullFailed) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want IMAGE_PULL_FAILED wrapping context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("pull took %v after its context expired", d)
	}
}

// TestPullLocalTransports imports oci:, oci-archive: and docker-archive:
// images, each into its own store, and re-imports without copying.
func TestPullLocalTransports(t *testing.T) {
	layout := testenv.BusyboxLayout(t, testenv.WithTag("v1"), testenv.WithUser("app"))
	dir := t.TempDir()
	ctx := context.Background()
	ociArchive := "oci-archive:" + filepath.Join(dir, "busybox-oci.tar") + ":v1"
	dockerArchive := "docker-archive:" + filepath.Join(dir, "busybox-docker.tar") + ":busybox:v1"
	for _, dst := range []string{ociArchive, dockerArchive} {
		if err := testenv.CopyImage(ctx, "oci:"+layout+":v1", dst); err != nil {
			t.Fatal(err)
		}
	}

	var ids []string
	for ref, wantRef := range map[string]string{
		"oci:" + layout + ":v1": "oci:" + layout + ":v1",
		"oci:" + layout:         "oci:" + layout,
		ociArchive:              ociArchive,
		dockerArchive:           strings.Replace(dockerArchive, ":busybox:", ":docker.io/library/busybox:", 1),
	} {
		t.Run(ref, func(t *testing.T) {
			rec := &recorder{}
			s := testStore(t, Options{Driver: "vfs", Progress: rec.record})
			img, err := s.Pull(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			checkBusybox(t, img)
			if img.Ref != wantRef || img.Config.User != "app" || img.Digest == "" {
				t.Errorf("img = %+v", img)
			}
			checkRootfs(t, s, img.ID)
			ids = append(ids, img.ID)
			if len(rec.take()) == 0 {
				t.Error("no progress events for the first import")
			}

			layers, err := s.store.Layers()
			if err != nil {
				t.Fatal(err)
			}
			again, err := s.Pull(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			if again.ID != img.ID {
				t.Errorf("re-import ID %s, want %s", again.ID, img.ID)
			}
			if ev := rec.take(); len(ev) != 0 {
				t.Errorf("re-import copied blobs: %+v", ev)
			}
			if layers2, _ := s.store.Layers(); len(layers2) != len(layers) {
				t.Errorf("re-import: %d layers, had %d", len(layers2), len(layers))
			}
		})
	}
	// All transports carry the same config, hence the same storage ID.
	for _, id := range ids {
		if id != ids[0] {
			t.Errorf("IDs differ across transports: %v", ids)
		}
	}
}

// TestConcurrentPulls pulls one image from several goroutines: all get it,
// and it is downloaded once.
func TestConcurrentPulls(t *testing.T) {
	reg := testenv.StartRegistry(t)
	layout := testenv.BusyboxLayout(t)
	ref := reg.Push(t, layout, "library/busybox:latest")
	rec := &recorder{}
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: insecureConf(t, reg.Addr), Progress: rec.record})

	const n = 4
	imgs := make([]*Image, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { imgs[i], errs[i] = s.Pull(context.Background(), ref) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if imgs[i].ID != imgs[0].ID {
			t.Errorf("pull %d: ID %s, want %s", i, imgs[i].ID, imgs[0].ID)
		}
	}
	if got := count(rec.take(), layerDigest(t, layout).String(), "start"); got != 1 {
		t.Errorf("layer downloaded %d times, want 1", got)
	}
}

// TestCloseUnmounts leaves mounts to Close, which testStore checks.
func TestCloseUnmounts(t *testing.T) {
	layout := testenv.BusyboxLayout(t)
	var logs syncBuffer
	s := testStore(t, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	ctx := context.Background()
	img, err := s.Pull(ctx, "oci:"+layout)
	if err != nil {
		t.Fatal(err)
	}
	a, err := s.Mount(ctx, img.ID)
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Mount(ctx, img.ID)
	if err != nil {
		t.Fatal(err)
	}
	if a != b {
		t.Errorf("two mounts of one image: %s, %s", a, b)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	// Close must undo our mounts itself, not leave them to a forced
	// storage shutdown.
	if strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("Close logged warnings:\n%s", logs.String())
	}
	if _, err := s.Pull(ctx, "oci:"+layout); !errdefs.Is(err, errdefs.ImagePullFailed) {
		t.Errorf("Pull after Close = %v", err)
	}
	if _, err := s.Mount(ctx, img.ID); err == nil {
		t.Error("Mount after Close succeeded")
	}
}

// TestOpenReusesStore reopens a store: pulled images persist.
func TestOpenReusesStore(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("containers/storage needs root")
	}
	layout := testenv.BusyboxLayout(t)
	opts := Options{Root: t.TempDir(), RunRoot: t.TempDir(), Driver: "vfs"}
	ctx := context.Background()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	img, err := s.Pull(ctx, "oci:"+layout)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	rec := &recorder{}
	opts.Progress = rec.record
	s, err = Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	again, err := s.Pull(ctx, "oci:"+layout)
	if err != nil {
		t.Fatal(err)
	}
	if again.ID != img.ID || len(rec.take()) != 0 {
		t.Errorf("reopened store re-imported the image")
	}

	if _, err := Open(Options{Root: opts.Root}); !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("Open without RunRoot = %v", err)
	}
}

// TestResolve checks short-name resolution, which needs no network.
func TestResolve(t *testing.T) {
	for _, tc := range []struct {
		conf, ref string
		want      []string
	}{
		// No aliases nor search registries: Docker Hub, as Docker does.
		{"", "busybox", []string{"docker.io/library/busybox:latest"}},
		{"", "alpine:3.20", []string{"docker.io/library/alpine:3.20"}},
		{"", "docker://busybox", []string{"docker.io/library/busybox:latest"}},
		{"", "quay.io/x/y", []string{"quay.io/x/y:latest"}},
		{`unqualified-search-registries = ["a.example", "b.example"]`, "x/y:1",
			[]string{"a.example/x/y:1", "b.example/x/y:1"}},
		{"[aliases]\n\"box\" = \"c.example/tools/box\"\n", "box:2", []string{"c.example/tools/box:2"}},
	} {
		s := &Store{sys: sysContext(writeConf(t, "%s\n", tc.conf), t.TempDir()), log: slog.New(slog.DiscardHandler)}
		got, err := s.resolve(tc.ref)
		if err != nil {
			t.Errorf("resolve(%q) with %q: %v", tc.ref, tc.conf, err)
			continue
		}
		var names []string
		for _, n := range got {
			names = append(names, n.String())
		}
		if !slices.Equal(names, tc.want) {
			t.Errorf("resolve(%q) with %q = %q, want %q", tc.ref, tc.conf, names, tc.want)
		}
	}
}

// TestPullProgressPerCall: a pull's own context receives its progress (on
// top of the store's callback), and another pull's context does not.
func TestPullProgressPerCall(t *testing.T) {
	reg := testenv.StartRegistry(t)
	ref := reg.Push(t, testenv.BusyboxLayout(t), "library/busybox:latest")
	other := reg.Push(t, testenv.BusyboxLayout(t, testenv.WithUser("app")), "library/other:latest")
	all, mine, theirs := &recorder{}, &recorder{}, &recorder{}
	s := testStore(t, Options{RegistriesConf: insecureConf(t, reg.Addr), Progress: all.record})
	if _, err := s.Pull(WithProgress(context.Background(), mine.record), "docker://"+ref); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pull(WithProgress(context.Background(), theirs.record), "docker://"+other); err != nil {
		t.Fatal(err)
	}
	m, o, a := mine.take(), theirs.take(), all.take()
	if len(m) == 0 || len(o) == 0 || len(a) != len(m)+len(o) {
		t.Fatalf("events: mine %d, theirs %d, store %d", len(m), len(o), len(a))
	}
	for _, e := range m {
		if e.Ref != "docker://"+ref {
			t.Errorf("my callback got %+v", e)
		}
	}
	for _, e := range o {
		if e.Ref != "docker://"+other {
			t.Errorf("their callback got %+v", e)
		}
	}
}
