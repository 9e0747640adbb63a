package boxrun

import (
	"archive/tar"
	"bytes"
	"io"
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
