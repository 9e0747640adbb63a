package integration

import (
	"archive/tar"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/internal/testenv"
)

// The box sees the image's ownership exactly, whoever runs the engine:
// as root the image store chowns the layers' files; as an ordinary user it
// cannot, and the base disk takes the owners from the layers' tar headers
// (scripts/test.sh runs this test as an unprivileged user too).
func TestImageOwnership(t *testing.T) {
	t.Logf("engine runs as uid %d", os.Geteuid())
	box := sharedBox(t)
	res := sh(t, box, "stat -c '%u:%g %a %n' / /bin /bin/busybox /etc/passwd /root /tmp /home /home/app")
	want := []string{
		"0:0 755 /", "0:0 755 /bin", "0:0 755 /bin/busybox", "0:0 644 /etc/passwd",
		"0:0 700 /root", "0:0 1777 /tmp", "0:0 755 /home", "1000:1000 755 /home/app",
	}
	got := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("owners and modes in the box:\n%s\nwant:\n%s\n%s", res.Stdout, strings.Join(want, "\n"), res.Stderr)
	}
	// The image's user owns what it writes; root in the box can chown.
	r, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{User: "app", Cmd: []string{"sh", "-c",
		"touch /home/app/mine && stat -c '%u:%g' /home/app/mine"}})
	if err != nil || strings.TrimSpace(r.Stdout) != "1000:1000" {
		t.Fatalf("file made by app: %q %q %v", r.Stdout, r.Stderr, err)
	}
	if r := sh(t, box, "touch /tmp/x && chown 1234:5678 /tmp/x && stat -c '%u:%g' /tmp/x"); strings.TrimSpace(r.Stdout) != "1234:5678" {
		t.Fatalf("chown in the box: %q %q", r.Stdout, r.Stderr)
	}
}

// An image whose upper layers hold what an ordinary user's store cannot
// make as such: files of other owners, a file nobody may read (in a lower
// layer, which the owners are read from too), a read-only directory, a
// device node, a whiteout of a lower file. The box sees each exactly as
// the image says, as root and as an ordinary user
// (scripts/rootless-test.sh), and the image can then be removed.
func TestImageLayersAsTheImageSays(t *testing.T) {
	dir := func(name string, mode int64) testenv.LayerEntry {
		return testenv.LayerEntry{Header: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}}
	}
	layout := filepath.Join(t.TempDir(), "layers")
	err := testenv.WriteBusyboxLayout(layout, testenv.LayoutOptions{Tag: "layers", Layers: [][]testenv.LayerEntry{{
		dir("srv/", 0o755),
		dir("srv/ro/", 0o555),
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "srv/ro/file", Mode: 0o444}, Data: []byte("read only")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/secret", Mode: 0}, Data: []byte("s3cr3t")},
		dir("old/", 0o755),
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "old/file", Mode: 0o644, Uid: 7}, Data: []byte("old")},
	}, {
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "srv/owned", Mode: 0o640, Uid: 1234, Gid: 5678}, Data: []byte("x")},
		{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "srv/pipe", Mode: 0o600}},
		dir("devices/", 0o755),
		{Header: tar.Header{Typeflag: tar.TypeChar, Name: "devices/null", Mode: 0o666, Devmajor: 1, Devminor: 3}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/.wh.group"}},
		// A file where a lower layer had a directory: its contents go.
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "old", Mode: 0o600, Uid: 9, Gid: 9}, Data: []byte("new")},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	ref := "oci:" + layout + ":layers"
	box := newBox(t, boxrun.BoxSpec{Image: ref, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	res := sh(t, box, "stat -c '%u:%g %a %F %n' /srv/ro /srv/ro/file /srv/owned /srv/pipe /etc/secret /devices/null /old; "+
		"stat -c '%t,%T' /devices/null; cat /srv/ro/file; echo; cat /etc/secret; echo; ls /etc/group 2>&1 || true")
	want := strings.Join([]string{
		"0:0 555 directory /srv/ro",
		"0:0 444 regular file /srv/ro/file",
		"1234:5678 640 regular file /srv/owned",
		"0:0 600 fifo /srv/pipe",
		"0:0 0 regular file /etc/secret",
		"0:0 666 character special file /devices/null",
		"9:9 600 regular file /old",
		"1,3",
		"read only",
		"s3cr3t",
		"ls: /etc/group: No such file or directory",
	}, "\n")
	if got := strings.TrimSpace(res.Stdout); got != want {
		t.Fatalf("the image's second layer in the box (uid %d engine):\n%s\nwant:\n%s\n%s", os.Geteuid(), got, want, res.Stderr)
	}
	// The device is a real one: it reads as /dev/null does.
	if r := sh(t, box, "head -c 5 /devices/null | wc -c"); strings.TrimSpace(r.Stdout) != "0" {
		t.Errorf("/devices/null: %q %q", r.Stdout, r.Stderr)
	}
	if err := fx.eng.Remove(ctxT(t, time.Minute), box.ID, boxrun.Force); err != nil {
		t.Fatal(err)
	}
	if err := fx.eng.RemoveImage(ctxT(t, time.Minute), ref); err != nil {
		t.Fatalf("remove the image: %v", err)
	}
	imgs, err := fx.eng.Images(ctxT(t, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range imgs {
		for _, n := range im.Names {
			if strings.Contains(n, layout) {
				t.Fatalf("image still listed after removal: %+v", im)
			}
		}
	}
}
