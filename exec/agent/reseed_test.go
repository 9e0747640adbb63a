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

func TestModuleNames(t *testing.T) {
	for path, want := range map[string]string{
		"kernel/drivers/block/virtio_blk.ko.xz": "virtio_blk",
		"kernel/net/9p/9pnet_virtio.ko":         "9pnet_virtio",
		"kernel/fs/ext4/ext4.ko.zst":            "ext4",
		"kernel/drivers/net/virtio-net.ko":      "virtio_net",
	} {
		if got := moduleName(path); got != want {
			t.Errorf("moduleName(%q) = %q, want %q", path, got, want)
		}
	}
	for _, m := range []string{"virtio_blk", "virtio_net", "9pnet_virtio", "virtiofs"} {
		if !lateModules[m] {
			t.Errorf("%s must wait for the Hello (it probes per-box devices)", m)
		}
	}
	for _, m := range []string{"virtio_pci", "virtio_console", "virtio_rng", "vmw_vsock_virtio_transport"} {
		if lateModules[m] {
			t.Errorf("%s must load at boot (the agent's channel needs it)", m)
		}
	}
}
