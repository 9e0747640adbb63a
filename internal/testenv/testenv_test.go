package testenv

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containers/image/v5/oci/layout"
	"github.com/containers/image/v5/types"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// readLayout opens a layout with containers/image, as the image package
// will, and returns its config and its layer's tar headers and files.
func readLayout(t *testing.T, dir string) (*ocispec.Image, map[string]*tar.Header, map[string]string) {
	t.Helper()
	ctx := context.Background()
	ref, err := layout.ParseReference(dir + ":latest")
	if err != nil {
		t.Fatal(err)
	}
	img, err := ref.NewImage(ctx, &types.SystemContext{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	config, err := img.OCIConfig(ctx)
	if err != nil {
		t.Fatal(err)
	}
	layers := img.LayerInfos()
	if len(layers) != 1 || layers[0].MediaType != ocispec.MediaTypeImageLayerGzip {
		t.Fatalf("layers = %+v, want one gzip layer", layers)
	}

	f, err := os.Open(filepath.Join(dir, "blobs", "sha256", layers[0].Digest.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	headers, files := map[string]*tar.Header{}, map[string]string{}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		headers[h.Name] = h
		if h.Typeflag == tar.TypeReg && h.Size < 4096 {
			b, _ := io.ReadAll(tr)
			files[h.Name] = string(b)
		}
	}
	return config, headers, files
}

func TestBusyboxLayout(t *testing.T) {
	dir := BusyboxLayout(t)
	for _, f := range []string{"oci-layout", "index.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	config, headers, files := readLayout(t, dir)

	if !slices.Equal(config.Config.Env, DefaultEnv) || !slices.Equal(config.Config.Cmd, []string{"sh"}) ||
		config.Config.WorkingDir != "/" || config.Config.User != "" || config.OS != "linux" {
		t.Errorf("config = %+v", config.Config)
	}

	bb := headers["bin/busybox"]
	if bb == nil || bb.Typeflag != tar.TypeReg || bb.Mode != 0o755 || bb.Size < 100_000 {
		t.Fatalf("bin/busybox = %+v", bb)
	}
	for _, applet := range []string{"bin/sh", "bin/ls", "sbin/ifconfig", "usr/bin/env"} {
		if h := headers[applet]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "/bin/busybox" {
			t.Errorf("%s = %+v, want symlink to /bin/busybox", applet, h)
		}
	}
	for name, want := range map[string]struct {
		mode int64
		uid  int
	}{
		"root/": {0o700, 0}, "tmp/": {0o1777, 0}, "home/app/": {0o755, 1000},
		"proc/": {0o755, 0}, "sys/": {0o755, 0}, "dev/": {0o755, 0}, "run/": {0o755, 0}, "mnt/": {0o755, 0},
	} {
		h := headers[name]
		if h == nil || h.Typeflag != tar.TypeDir || h.Mode != want.mode || h.Uid != want.uid || h.Gid != want.uid {
			t.Errorf("%s = %+v, want dir mode %o owner %d", name, h, want.mode, want.uid)
		}
	}
	if p := files["etc/passwd"]; !containsLine(p, "root:x:0:0:root:/root:/bin/sh") ||
		!containsLine(p, "app:x:1000:1000:app:/home/app:/bin/sh") {
		t.Errorf("etc/passwd = %q", p)
	}
	if g := files["etc/group"]; !containsLine(g, "app:x:1000:") {
		t.Errorf("etc/group = %q", g)
	}
}

func containsLine(s, line string) bool {
	return slices.Contains(strings.Split(s, "\n"), line)
}

func TestBusyboxLayoutOptionsAndDeterminism(t *testing.T) {
	index := func(dir string) ocispec.Index {
		b, err := os.ReadFile(filepath.Join(dir, "index.json"))
		if err != nil {
			t.Fatal(err)
		}
		var idx ocispec.Index
		if err := json.Unmarshal(b, &idx); err != nil {
			t.Fatal(err)
		}
		return idx
	}
	a, b := index(BusyboxLayout(t)), index(BusyboxLayout(t))
	if a.Manifests[0].Digest != b.Manifests[0].Digest {
		t.Errorf("same options, different manifests: %s vs %s", a.Manifests[0].Digest, b.Manifests[0].Digest)
	}

	dir := BusyboxLayout(t, WithUser("app"), WithWorkingDir("/home/app"), WithEnv("EXTRA=1"), WithTag("v2"),
		WithEntrypoint("/bin/sh", "-c"), WithCmd("echo hi"))
	c := index(dir)
	if c.Manifests[0].Digest == a.Manifests[0].Digest {
		t.Error("options did not change the image")
	}
	if got := c.Manifests[0].Annotations[ocispec.AnnotationRefName]; got != "v2" {
		t.Errorf("ref.name = %q, want v2", got)
	}
	ref, err := layout.ParseReference(dir + ":v2")
	if err != nil {
		t.Fatal(err)
	}
	img, err := ref.NewImage(context.Background(), &types.SystemContext{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	config, err := img.OCIConfig(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cc := config.Config
	if cc.User != "app" || cc.WorkingDir != "/home/app" || !slices.Contains(cc.Env, "EXTRA=1") ||
		!slices.Contains(cc.Env, "IMAGE_VAR=from-image") || !slices.Equal(cc.Entrypoint, []string{"/bin/sh", "-c"}) ||
		!slices.Equal(cc.Cmd, []string{"echo hi"}) {
		t.Errorf("config = %+v", cc)
	}
}

func TestRegistryPushAndStop(t *testing.T) {
	r := StartRegistry(t)
	ref := r.Push(t, BusyboxLayout(t), "library/busybox:1.0")
	if want := r.Addr + "/library/busybox:1.0"; ref != want {
		t.Errorf("Push = %q, want %q", ref, want)
	}

	resp, err := http.Get("http://" + r.Addr + "/v2/library/busybox/tags/list")
	if err != nil {
		t.Fatal(err)
	}
	var tags struct{ Tags []string }
	err = json.NewDecoder(resp.Body).Decode(&tags)
	resp.Body.Close()
	if err != nil || !slices.Equal(tags.Tags, []string{"1.0"}) {
		t.Fatalf("tags = %+v, %v", tags, err)
	}

	r.Stop()
	r.Stop() // idempotent
	if resp, err := http.Get("http://" + r.Addr + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatal("registry still answers after Stop")
	}
}

// TestMainStyleAPI uses the functions meant for TestMain.
func TestMainStyleAPI(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "layout")
	if err := WriteBusyboxLayout(dir, LayoutOptions{User: "app", WorkingDir: "/home/app", Tag: "v3"}); err != nil {
		t.Fatal(err)
	}
	// A LayoutOptions value is also an option of BusyboxLayout, and means
	// the same as the With* options.
	same := BusyboxLayout(t, WithUser("app"), WithWorkingDir("/home/app"), WithTag("v3"))
	other := BusyboxLayout(t, LayoutOptions{User: "app", WorkingDir: "/home/app", Tag: "v3"})
	for _, d := range []string{same, other} {
		a, _ := os.ReadFile(filepath.Join(dir, "index.json"))
		b, _ := os.ReadFile(filepath.Join(d, "index.json"))
		if len(a) == 0 || string(a) != string(b) {
			t.Errorf("index.json differs:\n%s\n%s", a, b)
		}
	}

	r, err := NewRegistry()
	if err != nil {
		t.Fatal(err)
	}
	ref, err := r.PushLayout(context.Background(), dir, "app/busybox:v3")
	if err != nil || ref != r.Addr+"/app/busybox:v3" {
		t.Fatalf("PushLayout = %q, %v", ref, err)
	}
	req, _ := http.NewRequest(http.MethodHead, "http://"+r.Addr+"/v2/app/busybox/manifests/v3", nil)
	req.Header.Set("Accept", ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("manifest: %s", resp.Status)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(r.dir); !os.IsNotExist(err) {
		t.Errorf("registry dir left behind: %v", err)
	}
	if r.cmd.ProcessState == nil || syscallAlive(r.cmd.Process.Pid) {
		t.Errorf("registry process still running")
	}
}

// syscallAlive reports whether a process exists (and is not a zombie).
func syscallAlive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	return err == nil && !strings.Contains(string(b), ") Z ")
}
