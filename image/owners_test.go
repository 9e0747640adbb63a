package image

import (
	"archive/tar"
	"bytes"
	"testing"
)

func layerTar(t *testing.T, entries ...tar.Header) *bytes.Buffer {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, h := range entries {
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
	}
	tw.Close()
	return &b
}

// Owners follow the layers: an upper layer's entry replaces a lower one's,
// a whiteout removes a path and what is below it, an opaque directory
// hides the lower layers' contents but keeps its own layer's, and a
// non-directory replacing a directory takes its contents away.
func TestApplyOwners(t *testing.T) {
	owners := map[string]Owner{}
	steps := []*bytes.Buffer{
		layerTar(t,
			tar.Header{Name: "etc/", Typeflag: tar.TypeDir},
			tar.Header{Name: "etc/passwd"},
			tar.Header{Name: "home/app/", Typeflag: tar.TypeDir, Uid: 1000, Gid: 1000},
			tar.Header{Name: "home/app/.profile", Uid: 1000, Gid: 100},
			tar.Header{Name: "opt/old/", Typeflag: tar.TypeDir, Uid: 5},
			tar.Header{Name: "opt/old/file", Uid: 5},
			tar.Header{Name: "var/cache/", Typeflag: tar.TypeDir},
			tar.Header{Name: "var/cache/a", Uid: 7},
		),
		layerTar(t,
			tar.Header{Name: "etc/passwd", Uid: 0, Gid: 42},
			tar.Header{Name: "opt/.wh.old"},
			tar.Header{Name: "var/cache/.wh..wh..opq"},
			tar.Header{Name: "var/cache/b", Uid: 8},
			tar.Header{Name: "./usr/bin/tool", Uid: 2, Gid: 3},
			tar.Header{Name: "dev/null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3, Mode: 0o666},
			tar.Header{Name: "home/app", Typeflag: tar.TypeSymlink, Linkname: "/tmp"},
		),
	}
	for _, s := range steps {
		if err := applyOwners(owners, s); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]Owner{
		"/etc": {UID: 0, GID: 0}, "/etc/passwd": {UID: 0, GID: 42},
		"/home/app":  {},
		"/var/cache": {UID: 0, GID: 0}, "/var/cache/b": {UID: 8, GID: 0},
		"/usr/bin/tool": {UID: 2, GID: 3},
		"/dev/null":     {Device: 'c', Major: 1, Minor: 3, Mode: 0o666},
	}
	if len(owners) != len(want) {
		t.Errorf("owners %v, want %v", owners, want)
	}
	for p, o := range want {
		if owners[p] != o {
			t.Errorf("%s: %v, want %v", p, owners[p], o)
		}
	}
}
