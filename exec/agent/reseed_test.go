//go:build linux

package main

import (
	"os"
	"testing"
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
	if c, _ := parseCmdline("boxrun.base=/dev/vda"); c.bootDisks {
		t.Error("disks bound at boot without boxrun.bootdisks")
	}
}
