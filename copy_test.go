package boxrun

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestOnlyUnderRejectsOtherEntries(t *testing.T) {
	archive := func(names ...string) io.Reader {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		for _, n := range names {
			tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
			tw.Write([]byte("x"))
		}
		tw.Close()
		return &b
	}
	read := func(r io.Reader) ([]string, error) {
		tr := tar.NewReader(r)
		var got []string
		for {
			h, err := tr.Next()
			if err == io.EOF {
				return got, nil
			}
			if err != nil {
				return got, err
			}
			got = append(got, h.Name)
		}
	}
	got, err := read(onlyUnder(archive("dir", "dir/a", "./dir/b/c"), "dir"))
	if err != nil || strings.Join(got, ",") != "dir,dir/a,./dir/b/c" {
		t.Fatalf("legit entries: %v %v", got, err)
	}
	for _, bad := range []string{"other", "dirx/a", "/etc/passwd"} {
		if _, err := read(onlyUnder(archive("dir/a", bad), "dir")); err == nil || !strings.Contains(err.Error(), "outside") {
			t.Errorf("entry %q: %v", bad, err)
		}
	}
	// Names are judged as rooted paths, as Untar resolves them: "../dir/a"
	// is "/dir/a", inside.
	if _, err := read(onlyUnder(archive("../dir/a"), "dir")); err != nil {
		t.Errorf("../dir/a: %v", err)
	}
}

// TestOnlyUnderStrict: the filter of a directory download (ReadTar) leaves
// out what would let a naive extractor write, or point, outside the tree:
// absolute or escaping symlinks, hard links out of the tree or through a
// symlink, and entries at or below an earlier symlink. Names come out
// cleaned, and renamed when the tree was reached through a link.
func TestOnlyUnderStrict(t *testing.T) {
	type ent struct {
		name string
		typ  byte
		link string
	}
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range []ent{
		{"d/", tar.TypeDir, ""},
		{"d/f", tar.TypeReg, ""},
		{"d/ok", tar.TypeSymlink, "f"},
		{"d/sub/", tar.TypeDir, ""},
		{"d/sub/up", tar.TypeSymlink, "../f"},
		{"d/dot", tar.TypeSymlink, "."},
		{"d/abs", tar.TypeSymlink, "/etc"},
		{"d/esc", tar.TypeSymlink, "../../x"},
		{"d/sub/esc", tar.TypeSymlink, "../../x"},
		{"d/sub/climb", tar.TypeSymlink, "dot/../.."}, // lexically d, but dot/.. climbs from the root
		{"d/empty", tar.TypeSymlink, ""},
		{"d/ok/evil", tar.TypeReg, ""},
		{"d/OK/evil", tar.TypeReg, ""},
		{"d/ok", tar.TypeReg, ""},
		{"d/dot/x", tar.TypeReg, ""},
		{"d/hl", tar.TypeLink, "d/f"},
		{"d/hl-out", tar.TypeLink, "etc/passwd"},
		{"d/hl-abs", tar.TypeLink, "/d/f"},
		{"d/hl-through", tar.TypeLink, "d/dot/f"},
		{"d/hl-dotdot", tar.TypeLink, "d/sub/../f"},
		{"../d/g", tar.TypeReg, ""},
		{"/d/h", tar.TypeReg, ""},
	} {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: 0o644}
		if e.typ == tar.TypeReg {
			h.Size = 1
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte("x"))
		}
	}
	tw.Close()
	filter := func(as string) ([]string, error) {
		tr := tar.NewReader(bytes.NewReader(b.Bytes()))
		first, err := tr.Next()
		if err != nil {
			return nil, err
		}
		var out bytes.Buffer
		if err := writeTree(&out, tr, first, &treeFilter{root: "d", as: as, strict: true}); err != nil {
			return nil, err
		}
		var got []string
		r := tar.NewReader(&out)
		for {
			h, err := r.Next()
			if err == io.EOF {
				return got, nil
			}
			if err != nil {
				return got, err
			}
			s := h.Name
			if h.Linkname != "" {
				s += "->" + h.Linkname
			}
			got = append(got, s)
		}
	}
	got, err := filter("")
	want := "d/,d/f,d/ok->f,d/sub/,d/sub/up->../f,d/dot->.,d/hl->d/f,d/g,d/h"
	if err != nil || strings.Join(got, ",") != want {
		t.Errorf("filtered:\n got %v (%v)\nwant %s", strings.Join(got, ","), err, want)
	}
	got, err = filter("link")
	want = "link/,link/f,link/ok->f,link/sub/,link/sub/up->../f,link/dot->.,link/hl->link/f,link/g,link/h"
	if err != nil || strings.Join(got, ",") != want {
		t.Errorf("renamed:\n got %v (%v)\nwant %s", strings.Join(got, ","), err, want)
	}
	// An entry outside the tree still fails the whole stream.
	var bad bytes.Buffer
	tw = tar.NewWriter(&bad)
	tw.WriteHeader(&tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "other", Typeflag: tar.TypeSymlink, Linkname: "d"})
	tw.Close()
	tr := tar.NewReader(&bad)
	first, _ := tr.Next()
	if err := writeTree(io.Discard, tr, first, &treeFilter{root: "d", strict: true}); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("entry outside the tree: %v", err)
	}
}

func TestOnlyUnderLinkTarget(t *testing.T) {
	for _, tc := range []struct{ p, target, want string }{
		{"/etc/os-release", "../usr/lib/os-release", "/usr/lib/os-release"},
		{"/etc/os-release", "/usr/lib/os-release", "/usr/lib/os-release"},
		{"/a/b", "../../../../x", "/x"},
		{"/a/b", "c/./d/", "/a/c/d"},
	} {
		if got := linkTarget(tc.p, tc.target); got != tc.want {
			t.Errorf("linkTarget(%q, %q) = %q, want %q", tc.p, tc.target, got, tc.want)
		}
	}
}

// A sparse entry's few bytes of map expand to as many zeros as it says:
// the agent never writes one (Go's archive/tar cannot), so a stream from
// the box that has one is refused, in GNU's old format and in PAX's.
func TestOnlyUnderRefusesSparseEntries(t *testing.T) {
	tarBin, err := exec.LookPath("tar")
	if err != nil {
		t.Skip("needs GNU tar to write sparse archives")
	}
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "dir", "bomb"))
	if err != nil {
		os.Mkdir(filepath.Join(dir, "dir"), 0o755)
		if f, err = os.Create(filepath.Join(dir, "dir", "bomb")); err != nil {
			t.Fatal(err)
		}
	}
	f.WriteAt([]byte("x"), 1<<40) // 1 TiB, one block of data
	f.Close()
	for _, format := range []string{"gnu", "posix"} {
		out, err := exec.Command(tarBin, "--sparse", "--format="+format, "-cf", "-", "-C", dir, "dir").Output()
		if err != nil {
			t.Fatal(format, err)
		}
		if len(out) > 64<<10 {
			t.Fatalf("%s: the archive is %d bytes: not sparse", format, len(out))
		}
		r := onlyUnder(bytes.NewReader(out), "dir")
		n, err := io.CopyN(io.Discard, r, 64<<20) // 1 TiB of zeros, unchecked
		r.Close()
		if err == nil || !strings.Contains(err.Error(), "sparse") {
			t.Errorf("%s: a sparse entry of 1 TiB passed (%d bytes out, %v)", format, n, err)
		}
	}
}
