package integration

import (
	"os"
	"strings"
	"testing"

	"github.com/boxrun/boxrun"
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
	r, err := fx.eng.Exec(ctxT(t, 60e9), box.ID, boxrun.ExecSpec{User: "app", Cmd: []string{"sh", "-c",
		"touch /home/app/mine && stat -c '%u:%g' /home/app/mine"}})
	if err != nil || strings.TrimSpace(r.Stdout) != "1000:1000" {
		t.Fatalf("file made by app: %q %q %v", r.Stdout, r.Stderr, err)
	}
	if r := sh(t, box, "touch /tmp/x && chown 1234:5678 /tmp/x && stat -c '%u:%g' /tmp/x"); strings.TrimSpace(r.Stdout) != "1234:5678" {
		t.Fatalf("chown in the box: %q %q", r.Stdout, r.Stderr)
	}
}
