package shim

import (
	"context"

	boxrun "github.com/boxrun/boxrun"
	"github.com/containerd/cgroups/v3/cgroup2/stats"
)

// guestMetrics is the box's use of its VM as cgroup v2 metrics, the shape
// kubelet and `ctr task metrics` read: the VM is the container's cgroup.
func guestMetrics(ctx context.Context, eng *boxrun.Engine, box string) (*stats.Metrics, error) {
	u, err := eng.Usage(ctx, box)
	if err != nil {
		return nil, err
	}
	return &stats.Metrics{
		Pids:   &stats.PidsStat{Current: u.Processes},
		CPU:    &stats.CPUStat{UsageUsec: u.CPUUsec, UserUsec: u.UserUsec, SystemUsec: u.SystemUsec},
		Memory: &stats.MemoryStat{Usage: u.MemUsed, UsageLimit: u.MemTotal},
	}, nil
}
