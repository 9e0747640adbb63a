//go:build linux

package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun/exec"
	"golang.org/x/sys/unix"
)

func TestParseCmdlineVolumes(t *testing.T) {
	c, err := parseCmdline("boxrun.base=/dev/vda boxrun.vsock=1024 boxrun.halt=poweroff boxrun.volumes=virtiofs")
	if err != nil || !c.virtiofs || !c.useVsock || c.vsock != 1024 || c.halt != unix.LINUX_REBOOT_CMD_POWER_OFF {
		t.Errorf("got %+v, %v", c, err)
	}
	if c, _ := parseCmdline("boxrun.base=/dev/vda"); c.virtiofs {
		t.Error("virtio-fs without boxrun.volumes")
	}
	if _, err := parseCmdline("boxrun.base=/dev/vda boxrun.volumes=nfs"); err == nil {
		t.Error("boxrun.volumes=nfs accepted")
	}
}

// TestConfigureVirtiofs: with boxrun.volumes=virtiofs, volumes are
// virtio-fs mounts by tag (read-only ones MS_RDONLY), idempotent, and a
// tag the kernel does not find (EINVAL while the device probes) is
// retried until volumeTimeout, then named.
func TestConfigureVirtiofs(t *testing.T) {
	tmp := t.TempDir()
	drv := filepath.Join(tmp, "virtiofs")
	os.MkdirAll(drv, 0o755)
	info := filepath.Join(tmp, "mountinfo")
	os.WriteFile(info, nil, 0o644)
	defer func(d, m string, v time.Duration) { virtiofsDriver, mountinfoPath, volumeTimeout = d, m, v }(virtiofsDriver, mountinfoPath, volumeTimeout)
	virtiofsDriver, mountinfoPath, volumeTimeout = drv, info, 200*time.Millisecond

	root := filepath.Join(tmp, "root")
	os.MkdirAll(root, 0o755)
	fm := &fakeMounts{t: t, info: info}
	probing := 2 // the first mounts of vol1 fail as while its device probes
	mount := func(src, target, fstype string, flags uintptr, data string) error {
		if src == "vol1" && probing > 0 {
			probing--
			return unix.EINVAL
		}
		if src == "nope" {
			return unix.EINVAL
		}
		return fm.mount(src, target, fstype, flags, data)
	}
	a := &agent{root: root, log: slog.New(slog.DiscardHandler), mountFunc: mount, cfg: config{virtiofs: true}}
	ctx := context.Background()
	mounts := []exec.Mount{{Tag: "vol0", Path: "/mnt/ro", ReadOnly: true}, {Tag: "vol1", Path: "/mnt/rw"}}
	if err := a.configure(ctx, mounts, nil); err != nil {
		t.Fatal(err)
	}
	want := []string{"vol0 " + root + "/mnt/ro virtiofs ro ", "vol1 " + root + "/mnt/rw virtiofs rw "}
	if fmt.Sprint(fm.calls) != fmt.Sprint(want) {
		t.Errorf("mounts:\n got %q\nwant %q", fm.calls, want)
	}
	// Again (a host that re-attaches): nothing to do.
	if err := a.configure(ctx, mounts, nil); err != nil || len(fm.calls) != 2 {
		t.Errorf("second configure: %v, calls %q", err, fm.calls)
	}
	start := time.Now()
	err := a.configure(ctx, []exec.Mount{{Tag: "nope", Path: "/x"}}, nil)
	if err == nil || !strings.Contains(err.Error(), `volume "nope" at /x: no virtio-fs device with tag "nope"`) {
		t.Errorf("unknown tag: %v", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Errorf("unknown tag retried for %v", d)
	}
	// No driver in the guest kernel: said at once.
	virtiofsDriver = filepath.Join(tmp, "none")
	if err := a.configure(ctx, []exec.Mount{{Tag: "vol2", Path: "/y"}}, nil); err == nil || !strings.Contains(err.Error(), "no virtio-fs driver") {
		t.Errorf("no driver: %v", err)
	}
}
