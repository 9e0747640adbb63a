//go:build linux

package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// reseed's ioctls on the host's own kernel: RNDADDENTROPY rejects a
// malformed rand_pool_info (EINVAL), so this proves the layout, and
// RNDRESEEDCRNG that the kernel reseeds on request (4.17+). Root only
// (CAP_SYS_ADMIN), as the agent is in the guest.
func TestReseed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("RNDADDENTROPY needs root (CAP_SYS_ADMIN)")
	}
	seed := make([]byte, 64)
	for i := range seed {
		seed[i] = byte(i * 31)
	}
	if err := reseed(seed); err != nil {
		t.Fatal(err)
	}
}

func TestPerBoxDevices(t *testing.T) {
	// virtio device IDs: net 1, block 2, console 3, rng 4, 9p 9, vsock 19, fs 26.
	for _, id := range []uint64{1, 2, 9, 26} {
		if !perBoxDevices[id] {
			t.Errorf("virtio device %d must wait for the Hello (it is the box's own)", id)
		}
	}
	for _, id := range []uint64{3, 4, 19} {
		if perBoxDevices[id] {
			t.Errorf("virtio device %d must be bound at boot (the agent needs it)", id)
		}
	}
}

// Disks are held back for the Hello unless the host binds them at boot
// (boxrun.bootdisks); the NIC and the shares always are.
func TestHoldBack(t *testing.T) {
	for _, c := range []struct {
		kind      uint64
		bootDisks bool
		want      bool
	}{
		{virtioBlock, false, true}, {virtioBlock, true, false},
		{1, true, true}, {9, true, true}, {26, true, true},
		{3, false, false}, {4, true, false},
	} {
		if got := holdBack(c.kind, c.bootDisks); got != c.want {
			t.Errorf("holdBack(%d, bootdisks %v) = %v, want %v", c.kind, c.bootDisks, got, c.want)
		}
	}
	if c, err := parseCmdline("boxrun.base=/dev/vda boxrun.bootdisks=1"); err != nil || !c.bootDisks {
		t.Errorf("boxrun.bootdisks=1: %+v, %v", c, err)
	}
	if c, _ := parseCmdline("boxrun.base=/dev/vda"); c.bootDisks || c.premount {
		t.Error("disks bound or mounted at boot without boxrun.bootdisks")
	}
	if c, err := parseCmdline("boxrun.base=/dev/vda boxrun.bootdisks=1 boxrun.premount=1"); err != nil || !c.premount {
		t.Errorf("boxrun.premount=1: %+v, %v", c, err)
	}
	// Mounting at boot disks that are bound only at the Hello cannot work.
	if _, err := parseCmdline("boxrun.base=/dev/vda boxrun.premount=1"); err == nil {
		t.Error("boxrun.premount=1 without boxrun.bootdisks=1 accepted")
	}
}

// waitDiskSizes returns once each disk shows the host's size (a restored
// guest learns a writable disk's capacity some time after the Hello), and
// answers TIMEOUT, which the host takes for its template's fault, when
// one does not.
func TestWaitDiskSizes(t *testing.T) {
	dir := t.TempDir()
	t.Cleanup(func() { sysBlock = "/sys/class/block" })
	sysBlock = dir
	set := func(dev string, sectors int) {
		os.MkdirAll(filepath.Join(dir, dev), 0o755)
		if err := os.WriteFile(filepath.Join(dir, dev, "size"), []byte(strconv.Itoa(sectors)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	set("vdb", 2<<21) // the template's 2 GiB
	go func() {
		time.Sleep(50 * time.Millisecond)
		set("vdb", 3<<21) // the capacity change arrives
	}()
	start := time.Now()
	if err := waitDiskSizes(map[string]int64{"/dev/vdb": 3 << 30}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < 40*time.Millisecond {
		t.Errorf("returned after %v, before the capacity changed", waited)
	}
	if err := waitDiskSizes(nil, time.Second); err != nil {
		t.Errorf("no disks: %v", err)
	}
	err := waitDiskSizes(map[string]int64{"/dev/vdb": 1 << 30}, 100*time.Millisecond)
	if errdefs.CodeOf(err) != errdefs.Timeout || !strings.Contains(err.Error(), "/dev/vdb: not at the host's size of 1073741824 bytes") {
		t.Errorf("capacity never right: %v", err)
	}
	if err := waitDiskSizes(map[string]int64{"/dev/vdz": 1 << 30}, 50*time.Millisecond); errdefs.CodeOf(err) != errdefs.Timeout {
		t.Errorf("no such disk: %v", err)
	}
}
