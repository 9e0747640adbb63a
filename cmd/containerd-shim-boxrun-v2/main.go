// Command containerd-shim-boxrun-v2 is containerd's runtime v2 shim for
// boxrun (runtime io.containerd.boxrun.v2): containers run in micro-VMs.
// Put it on containerd's PATH; see the README for containerd, Kubernetes,
// nerdctl and Docker.
package main

import (
	"github.com/boxrun/boxrun/shim"
	cshim "github.com/containerd/containerd/runtime/v2/shim"
)

func main() {
	// No reaper: the shim library's SIGCHLD reaper would take the exit
	// status of the engine's own children (QEMU, mke2fs) from os/exec.
	cshim.Run(shim.RuntimeName, shim.New(shim.Load()), func(c *cshim.Config) {
		c.NoReaper = true
		c.NoSubreaper = true
	})
}
