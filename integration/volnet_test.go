package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

func TestVolumesReadWriteAndReadOnly(t *testing.T) {
	rw, ro := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(rw, "from-host"), []byte("hello box\n"), 0o644)
	os.WriteFile(filepath.Join(ro, "keep"), []byte("original\n"), 0o644)
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1,
		Volumes: []boxrun.Volume{{HostPath: rw, GuestPath: "/mnt/rw"}, {HostPath: ro, GuestPath: "/data/ro", ReadOnly: true}}})
	if len(box.Volumes) != 2 || box.Volumes[1].GuestPath != "/data/ro" || !box.Volumes[1].ReadOnly {
		t.Fatalf("volumes in record: %+v", box.Volumes)
	}
	res := sh(t, box, "cat /mnt/rw/from-host; echo from-box > /mnt/rw/new; cat /data/ro/keep")
	if res.Stdout != "hello box\noriginal\n" {
		t.Fatalf("volumes in box: %q %q", res.Stdout, res.Stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "new")); string(b) != "from-box\n" {
		t.Fatalf("write through rw volume: %q", b)
	}
	res = sh(t, box, "echo changed > /data/ro/keep; echo $?; touch /data/ro/x; echo $?")
	if strings.Fields(res.Stdout)[0] == "0" || strings.Fields(res.Stdout)[1] == "0" || !strings.Contains(res.Stderr, "Read-only") {
		t.Fatalf("write to ro volume: %q %q", res.Stdout, res.Stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(ro, "keep")); string(b) != "original\n" {
		t.Fatalf("ro volume changed on the host: %q", b)
	}
	if _, err := os.Stat(filepath.Join(ro, "x")); !os.IsNotExist(err) {
		t.Fatalf("file created in ro volume")
	}
	// Volumes persist across stop/start.
	ctx := ctxT(t, 2*time.Minute)
	if _, err := fx.eng.Stop(ctx, box.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := fx.eng.Start(ctx, box.ID); err != nil {
		t.Fatal(err)
	}
	if res := sh(t, box, "cat /mnt/rw/new; grep -c ' /data/ro .*ro[,]' /proc/mounts"); res.Stdout != "from-box\n1\n" {
		t.Fatalf("after restart: %q %q", res.Stdout, res.Stderr)
	}
}

func TestVolumeErrors(t *testing.T) {
	ctx := context.Background()
	for _, v := range []boxrun.Volume{
		{HostPath: "/does/not/exist", GuestPath: "/mnt"},
		{HostPath: "relative/dir", GuestPath: "/mnt"},
		{HostPath: t.TempDir(), GuestPath: "relative"},
	} {
		_, err := fx.eng.Create(ctx, boxrun.BoxSpec{Image: fx.ociRef, Volumes: []boxrun.Volume{v}})
		if c := boxrun.CodeOf(err); c != boxrun.RuntimeError && c != boxrun.ValidationError || !strings.Contains(err.Error(), "olume") {
			t.Errorf("volume %+v: %v", v, err)
		}
	}
}

func TestNetworkOffHasOnlyLoopback(t *testing.T) {
	box := sharedBox(t) // created without Network
	if res := sh(t, box, "ls /sys/class/net"); strings.Fields(res.Stdout)[0] != "lo" || len(strings.Fields(res.Stdout)) != 1 {
		t.Fatalf("interfaces without network: %q", res.Stdout)
	}
}
