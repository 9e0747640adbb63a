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
