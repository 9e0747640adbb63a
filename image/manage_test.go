package image

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/internal/testenv"
)

// countingProxy is a reverse proxy in front of a registry that counts the
// requests pulls make through it.
type countingProxy struct {
	Addr string
	mu   sync.Mutex
	reqs []string // "METHOD /v2/..."
}

func newCountingProxy(t *testing.T, registryAddr string) *countingProxy {
	t.Helper()
	p := &countingProxy{}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: registryAddr})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.reqs = append(p.reqs, r.Method+" "+r.URL.Path)
		p.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	p.Addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

// take returns the requests since the last take, less the /v2/ pings.
func (p *countingProxy) take() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, r := range p.reqs {
		if !strings.HasSuffix(r, " /v2/") {
			out = append(out, r)
		}
	}
	p.reqs = nil
	return out
}

// TestPullPolicy re-pushes a tag with new content and pulls it under each
// policy through a proxy that counts what reaches the registry.
func TestPullPolicy(t *testing.T) {
	reg := testenv.StartRegistry(t)
	proxy := newCountingProxy(t, reg.Addr)
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: insecureConf(t, proxy.Addr)})
	ctx := context.Background()
	oldLayout := testenv.BusyboxLayout(t, testenv.WithEnv("VERSION=1"))
	newLayout := testenv.BusyboxLayout(t, testenv.WithEnv("VERSION=2"))
	reg.Push(t, oldLayout, "library/pol:v1")
	ref := proxy.Addr + "/library/pol:v1"
	pull := func(ref string, policy PullPolicy) *Image {
		t.Helper()
		img, err := s.PullWith(ctx, ref, PullOptions{Policy: policy})
		if err != nil {
			t.Fatalf("pull %s (%s): %v", ref, policy, err)
		}
		return img
	}
	noRequests := func(what string) {
		t.Helper()
		if r := proxy.take(); len(r) != 0 {
			t.Errorf("%s reached the registry: %v", what, r)
		}
	}

	_, err := s.PullWith(ctx, ref, PullOptions{Policy: PullNever})
	if !errdefs.Is(err, errdefs.ImagePullFailed) || !strings.Contains(err.Error(), `pull policy "never"`) {
		t.Fatalf("never, absent: %v", err)
	}
	noRequests("never, absent")
	if _, err := s.PullWith(ctx, ref, PullOptions{Policy: "sometimes"}); !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("unknown policy: %v", err)
	}

	old := pull(ref, PullMissing)
	if r := proxy.take(); !slices.ContainsFunc(r, func(s string) bool { return strings.Contains(s, "/blobs/") }) {
		t.Errorf("first pull fetched no blob: %v", r)
	}
	pull(ref, PullMissing)
	noRequests("missing, present")

	// always, tag unchanged: one HEAD of the manifest, nothing fetched.
	if img := pull(ref, PullAlways); img.ID != old.ID {
		t.Errorf("always, unchanged: %s, want %s", img.ID, old.ID)
	}
	if r := proxy.take(); len(r) != 1 || !strings.HasPrefix(r[0], "HEAD ") || !strings.Contains(r[0], "/manifests/v1") {
		t.Errorf("always, unchanged: requests %v, want one HEAD of the manifest", r)
	}

	reg.Push(t, newLayout, "library/pol:v1") // the tag now names other content
	if img := pull(ref, PullMissing); img.ID != old.ID {
		t.Errorf("missing after re-push: %s, want the old %s", img.ID, old.ID)
	}
	if img := pull(ref, PullNever); img.ID != old.ID {
		t.Errorf("never after re-push: %s, want the old %s", img.ID, old.ID)
	}
	noRequests("missing and never, present")
	cur := pull(ref, PullAlways)
	if cur.ID == old.ID || cur.Digest != manifestDigest(t, newLayout) || !slices.Contains(cur.Config.Env, "VERSION=2") {
		t.Fatalf("always after re-push: %+v, want the new image", cur)
	}
	if r := proxy.take(); !slices.ContainsFunc(r, func(s string) bool { return strings.HasPrefix(s, "GET ") && strings.Contains(s, "/blobs/") }) {
		t.Errorf("always after re-push fetched no blob: %v", r)
	}
	if img := pull(ref, PullMissing); img.ID != cur.ID {
		t.Errorf("missing after always: %s, want %s", img.ID, cur.ID)
	}
	noRequests("missing after always")

	// The old image stays, without its name: a box may still use it.
	list, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]Summary{}
	for _, m := range list {
		byID[m.ID] = m
	}
	if m, ok := byID[old.ID]; !ok || len(m.Names) != 0 {
		t.Errorf("old image after always: %+v (present %v), want nameless", m, ok)
	}
	if m := byID[cur.ID]; !slices.Equal(m.Names, []string{ref}) || m.Size == 0 || m.Pulled.IsZero() || m.Created.IsZero() || m.Digest != cur.Digest {
		t.Errorf("new image: %+v", m)
	}

	// Digest-pinned: never fetched again under any policy, even when the
	// content is in the store under no name.
	pinnedOld := proxy.Addr + "/library/pol@" + old.Digest.String()
	for _, p := range []PullPolicy{PullAlways, PullMissing, PullNever, PullAlways} {
		if img := pull(pinnedOld, p); img.ID != old.ID {
			t.Errorf("pinned old (%s): %s, want %s", p, img.ID, old.ID)
		}
	}
	noRequests("digest-pinned pulls of stored content")
	if names, _ := s.Names(old.ID); !slices.Equal(names, []string{pinnedOld}) {
		t.Errorf("old image's names after a pinned pull: %v", names)
	}
	pinnedNew := proxy.Addr + "/library/pol@" + cur.Digest.String()
	if img := pull(pinnedNew, PullAlways); img.ID != cur.ID {
		t.Errorf("pinned new: %s, want %s", img.ID, cur.ID)
	}
	noRequests("digest-pinned pull of the tag's content")
	absent := proxy.Addr + "/library/pol@sha256:" + strings.Repeat("0", 64)
	if _, err := s.PullWith(ctx, absent, PullOptions{Policy: PullNever}); !errdefs.Is(err, errdefs.ImagePullFailed) {
		t.Errorf("never, pinned absent: %v", err)
	}
	noRequests("never, pinned absent")

	// always fails when the registry does not answer: it cannot tell.
	reg.Stop()
	if _, err := s.PullWith(ctx, ref, PullOptions{Policy: PullAlways}); !errdefs.Is(err, errdefs.ImagePullFailed) {
		t.Errorf("always, registry down: %v", err)
	}
	if img := pull(ref, PullMissing); img.ID != cur.ID {
		t.Errorf("missing, registry down: %s", img.ID)
	}
}

// TestLookupUntagRemove finds images by ID, prefix, name and local source,
// untags and removes them.
func TestLookupUntagRemove(t *testing.T) {
	reg := testenv.StartRegistry(t)
	s := testStore(t, Options{Driver: "vfs", RegistriesConf: insecureConf(t, reg.Addr)})
	ctx := context.Background()
	layout := testenv.BusyboxLayout(t, testenv.WithEnv("LOOKUP=1"))
	ref := reg.Push(t, layout, "library/look:v1")
	img, err := s.Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	local := "oci:" + layout + ":latest"
	limg, err := s.Pull(ctx, local) // same content: same image, a second name
	if err != nil {
		t.Fatal(err)
	}
	if limg.ID != img.ID {
		t.Fatalf("oci import of the pushed layout: %s, want %s", limg.ID, img.ID)
	}
	for in, want := range map[string][2]string{
		img.ID:             {img.ID, ""},
		"sha256:" + img.ID: {img.ID, ""},
		img.ID[:12]:        {img.ID, ""},
		ref:                {img.ID, ref},
		"docker://" + ref:  {img.ID, ref},
		local:              {img.ID, local},
		reg.Addr + "/library/look@" + img.Digest.String(): {img.ID, ""},
	} {
		id, name, err := s.Lookup(ctx, in)
		if err != nil || id != want[0] || name != want[1] {
			t.Errorf("Lookup(%s) = %s, %q, %v; want %v", in, id, name, err, want)
		}
	}
	for _, in := range []string{reg.Addr + "/library/look:v2", "oci:/nonexistent:x", strings.Repeat("f", 64)} {
		if _, _, err := s.Lookup(ctx, in); !errdefs.Is(err, errdefs.ImageNotFound) {
			t.Errorf("Lookup(%s) = %v, want IMAGE_NOT_FOUND", in, err)
		}
	}

	if err := s.Untag(img.ID, local); err != nil {
		t.Fatal(err)
	}
	if names, _ := s.Names(img.ID); !slices.Equal(names, []string{ref}) {
		t.Errorf("names after untag: %v", names)
	}
	if _, err := s.Mount(ctx, img.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(img.ID); !errdefs.Is(err, errdefs.ImageInUse) {
		t.Errorf("Remove of a mounted image = %v, want IMAGE_IN_USE", err)
	}
	if err := s.Unmount(img.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(img.ID); err != nil {
		t.Fatal(err)
	}
	if s.Has(img.ID) {
		t.Error("image still there after Remove")
	}
	if layers, _ := s.store.Layers(); len(layers) != 0 {
		t.Errorf("layers left after Remove: %d", len(layers))
	}
	if err := s.Remove(img.ID); !errdefs.Is(err, errdefs.ImageNotFound) {
		t.Errorf("second Remove = %v, want IMAGE_NOT_FOUND", err)
	}
	if list, err := s.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("List after Remove = %v, %v", list, err)
	}
}
