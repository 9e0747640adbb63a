//go:build linux

package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// cgroupDir is where the agent mounts cgroup v2: outside the box root, so
// execs (chrooted into it) do not see it.
const cgroupDir = "/run/boxrun/cgroup"

// setupCgroups mounts cgroup v2 and enables the pids and cpu controllers
// for the execs' cgroups (see exec.ServerOptions.Cgroup). It returns ""
// when the kernel cannot confine execs that way (before 5.7, no
// CLONE_INTO_CGROUP; no pids controller): execs then run unconfined.
func setupCgroups(log *slog.Logger) (dir string, pidsMax int) {
	if !kernelAtLeast(kernelRelease(), 5, 7) {
		log.Info("kernel too old for exec cgroups (5.7+): execs run without task limits")
		return "", 0
	}
	if err := os.MkdirAll(cgroupDir, 0o755); err != nil {
		log.Warn("exec cgroups", "err", err)
		return "", 0
	}
	err := unix.Mount("cgroup2", cgroupDir, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	if err != nil && err != unix.EBUSY {
		log.Warn("exec cgroups: mount cgroup2", "err", err)
		return "", 0
	}
	ctl := filepath.Join(cgroupDir, "cgroup.subtree_control")
	if err := os.WriteFile(ctl, []byte("+pids"), 0); err != nil {
		log.Warn("exec cgroups: pids controller", "err", err)
		return "", 0
	}
	if err := os.WriteFile(ctl, []byte("+cpu"), 0); err != nil {
		log.Warn("exec cgroups: cpu controller", "err", err) // pids still apply
	}
	return cgroupDir, pidsLimit(readMemTotalKB(), readPidMax())
}

// pidsLimit is each exec's task limit: one task per 128 KiB of guest
// memory (well above what a small process costs, so a fork bomb stops
// before it exhausts the box's memory), at least 512, at most half the
// kernel's pid_max (so one exec never takes every pid).
func pidsLimit(memKB, pidMax int) int {
	return min(max(memKB/128, 512), pidMax/2)
}

func readMemTotalKB() int {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}

func readPidMax() int {
	b, _ := os.ReadFile("/proc/sys/kernel/pid_max")
	if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
		return n
	}
	return 32768
}

// kernelAtLeast reports whether a release such as "6.1.0-57-amd64" is at
// least major.minor.
func kernelAtLeast(release string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}
