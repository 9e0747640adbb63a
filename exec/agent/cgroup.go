//go:build linux

package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// cgroupDir is where the agent mounts cgroup v2: outside the box root, so
// execs (chrooted into it) do not see it.
const cgroupDir = "/run/boxrun/cgroup"

// setupCgroups mounts cgroup v2, makes the parent of the execs' cgroups
// (execs) with the pids controller on for it and its children, and
// returns it (see exec.ServerOptions.Cgroup) with each exec's task limit,
// and whether the kernel has the cpu controller, which the exec server
// turns on while execs compete for the CPU (exec.ServerOptions.FairCPU).
// It returns "" when the kernel cannot confine execs that way (before
// 5.7, no CLONE_INTO_CGROUP; no pids controller): execs then run
// unconfined.
//
// The parent bounds all execs together below the kernel's own task limit
// (threads-max, about 1500 for 256 MiB) and below what the guest's memory
// holds: fork bombs left behind by execs then can neither take every task
// the kernel has nor run the guest out of memory, and the agent can always
// fork the next command. While the cpu controller is on, its cpu weight
// also gives the agent at least an even share of the CPU against all
// execs together.
func setupCgroups(log *slog.Logger) (dir string, pidsMax int, fairCPU bool) {
	if !kernelAtLeast(kernelRelease(), 5, 7) {
		log.Info("kernel too old for exec cgroups (5.7+): execs run without task limits")
		return "", 0, false
	}
	if err := os.MkdirAll(cgroupDir, 0o755); err != nil {
		log.Warn("exec cgroups", "err", err)
		return "", 0, false
	}
	err := unix.Mount("cgroup2", cgroupDir, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	if err != nil && err != unix.EBUSY {
		log.Warn("exec cgroups: mount cgroup2", "err", err)
		return "", 0, false
	}
	execs := filepath.Join(cgroupDir, "execs")
	if err := enableControllers(log, cgroupDir); err != nil {
		return "", 0, false
	}
	if err := os.Mkdir(execs, 0o755); err != nil && !os.IsExist(err) {
		log.Warn("exec cgroups", "err", err)
		return "", 0, false
	}
	total := execsLimit(readIntFile("/proc/sys/kernel/threads-max", 32768), readIntFile("/proc/sys/kernel/pid_max", 32768), readMemTotalKB())
	if err := os.WriteFile(filepath.Join(execs, "pids.max"), []byte(strconv.Itoa(total)), 0); err != nil {
		log.Warn("exec cgroups: pids.max of all execs", "err", err)
		return "", 0, false
	}
	if err := enableControllers(log, execs); err != nil {
		return "", 0, false
	}
	ctls, _ := os.ReadFile(filepath.Join(cgroupDir, "cgroup.controllers"))
	fairCPU = slices.Contains(strings.Fields(string(ctls)), "cpu")
	if !fairCPU {
		log.Warn("exec cgroups: no cpu controller: execs do not share the CPU fairly")
	}
	return execs, pidsLimit(total), fairCPU
}

// enableControllers turns pids on for the children of cgroup dir.
func enableControllers(log *slog.Logger, dir string) error {
	ctl := filepath.Join(dir, "cgroup.subtree_control")
	if err := os.WriteFile(ctl, []byte("+pids"), 0); err != nil {
		log.Warn("exec cgroups: pids controller", "cgroup", dir, "err", err)
		return err
	}
	return nil
}

// execsReserve is what the kernel's task limits keep back from all execs
// together: the agent's threads and the kernel's own.
const execsReserve = 256

// taskMemoryKB is the guest memory per task that the limit of all execs
// together allows for. A task costs more than its own pages (kernel stack,
// page tables, task structures): busybox sh subshells of a fork bomb took
// about 100 KiB each (1188 tasks, 114 MiB of a 256 MiB guest). At 256 KiB
// per task, execs reach their task limit before they run the guest out of
// memory, and bombs left at their limits are killed by the next exec
// (exec.ServerOptions.Cgroup) instead of holding the box near OOM, where
// every new command starves.
const taskMemoryKB = 256

// execsLimit is the task limit of all execs together: the kernel's
// threads-max or pid_max, whichever is lower, less execsReserve, and at
// most one task per taskMemoryKB of memory (memKB 0: unknown); at least 64.
func execsLimit(threadsMax, pidMax, memKB int) int {
	total := min(threadsMax, pidMax) - execsReserve
	if memKB > 0 {
		total = min(total, memKB/taskMemoryKB)
	}
	return max(total, 64)
}

// pidsLimit is each exec's task limit: half of what all execs together may
// have, so that no single exec takes every task (and two bombs left behind
// at their limits take them all, which the next exec notices).
func pidsLimit(total int) int {
	return total / 2
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

// readIntFile reads a number from a proc file, or returns def.
func readIntFile(path string, def int) int {
	b, _ := os.ReadFile(path)
	if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
		return n
	}
	return def
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
