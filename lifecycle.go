package boxrun

import (
	"context"
	"os"
	goruntime "runtime"
	"strconv"
	"strings"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/state"
)

// Stop shuts a running box down gracefully (the agent stops its processes,
// syncs and unmounts, then the VM powers off), killing the VM if it has not
// gone within Config.StopTimeout. The box disk is kept for Start.
func (e *Engine) Stop(ctx context.Context, idOrName string) (*Box, error) {
	rec, release, err := e.claimBox(idOrName, false)
	if err != nil {
		return nil, err
	}
	defer release()
	e.mu.Lock()
	lb := e.live[rec.ID]
	if lb == nil || rec.Status != state.Running {
		e.mu.Unlock()
		return nil, errdefs.New(errdefs.BoxNotRunning, "Box '%s' is not running (status: %s)", idOrName, rec.Status)
	}
	delete(e.live, rec.ID)
	e.mu.Unlock()
	if err := e.shutdown(ctx, rec.ID, lb); err != nil {
		// The VMM outlived SIGKILL (stuck in the kernel): it may still
		// hold the disk and the memory. Say so; keep its reservation.
		rec.Status, rec.ErrorCode, rec.ErrorMessage = state.Error, string(errdefs.CodeOf(err)), err.Error()
		e.store.PutBox(rec)
		return nil, err
	}
	e.release(rec.CPU, rec.MemoryMB)
	now := time.Now().UTC()
	rec.Status, rec.StoppedAt, rec.RuntimeID = state.Stopped, &now, ""
	if err := e.store.PutBox(rec); err != nil {
		return nil, err
	}
	e.log.Info("box stopped", "box", rec.ID)
	return boxOf(rec), nil
}

// shutdown asks the agent to power the VM off and waits for it, then makes
// sure the VMM is gone.
func (e *Engine) shutdown(ctx context.Context, id string, lb *liveBox) error {
	sctx, cancel := context.WithTimeout(ctx, e.cfg.StopTimeout)
	defer cancel()
	if err := lb.agent.Shutdown(sctx); err != nil {
		e.log.Warn("graceful shutdown failed; killing the VM", "box", id, "err", err)
	} else {
		select {
		case <-lb.vm.Done():
		case <-sctx.Done():
			e.log.Warn("VM did not power off in time; killing it", "box", id)
		}
	}
	lb.close()
	if err := lb.vm.Kill(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "stop box %s", id)
	}
	return nil
}

// Start boots a stopped box again, with everything it had written.
func (e *Engine) Start(ctx context.Context, idOrName string) (*Box, error) {
	rec, release, err := e.claimBox(idOrName, true)
	if err != nil {
		return nil, err
	}
	defer release()
	switch rec.Status {
	case state.Running:
		return nil, errdefs.New(errdefs.BoxAlreadyRunning, "Box '%s' is already running", idOrName)
	case state.Stopped:
	default:
		return nil, errdefs.New(errdefs.RuntimeError, "Box '%s' cannot be started (status: %s)", idOrName, rec.Status)
	}
	if err := e.reserve(rec.CPU, rec.MemoryMB); err != nil {
		return nil, err
	}
	lb, err := e.bootBox(ctx, &rec, false)
	if err == nil {
		err = e.markRunning(&rec, lb)
		if err != nil {
			e.destroyVM(lb)
		}
	}
	if err != nil {
		e.release(rec.CPU, rec.MemoryMB)
		return nil, err
	}
	e.log.Info("box started", "box", rec.ID, "pid", lb.vm.PID())
	return boxOf(rec), nil
}

// ListOptions filters List.
type ListOptions struct {
	Status string // "" or "all": every box
}

// GC removes stopped boxes stopped before now-olderThan and errored boxes
// created before it, and returns how many it removed.
func (e *Engine) GC(ctx context.Context, olderThan time.Duration) (int, error) {
	cutoff := time.Now().Add(-olderThan)
	recs, err := e.store.ListBoxes()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		old := (r.Status == state.Stopped && r.StoppedAt != nil && r.StoppedAt.Before(cutoff)) ||
			(r.Status == state.Error && r.CreatedAt.Before(cutoff))
		if !old {
			continue
		}
		// Without Force: a box started since the listing is skipped, not killed.
		err := e.Remove(ctx, r.ID)
		switch {
		case err == nil:
			n++
		case errdefs.Is(err, errdefs.BoxNotFound), errdefs.Is(err, errdefs.BoxAlreadyRunning):
		default:
			return n, err
		}
	}
	return n, nil
}

// Run creates a box, runs one command in it and removes the box, also when
// the command fails or ctx is canceled. With an empty Cmd it runs the
// image's Entrypoint and Cmd.
func (e *Engine) Run(ctx context.Context, box BoxSpec, cmd ExecSpec) (*ExecResult, error) {
	b, err := e.Create(ctx, box)
	if err != nil {
		return nil, err
	}
	defer func() {
		// The caller's ctx may be canceled: removal must happen regardless.
		if err := e.Remove(context.WithoutCancel(ctx), b.ID, Force); err != nil {
			e.log.Error("remove ephemeral box", "box", b.ID, "err", err)
		}
	}()
	if len(cmd.Cmd) == 0 {
		_, lb, err := e.running(b.ID)
		if err != nil {
			return nil, err
		}
		cfg := lb.img.Config
		cmd.Cmd = append(append([]string{}, cfg.Entrypoint...), cfg.Cmd...)
		cmd.Entrypoint = false // already in Cmd
		if len(cmd.Cmd) == 0 {
			return nil, errdefs.New(errdefs.ValidationError, "cmd must be a non-empty list (the image has no default command)")
		}
	}
	return e.Exec(ctx, b.ID, cmd)
}

// reserve takes cpu and memory from the engine's totals, or fails with
// RESOURCE_EXCEEDED.
func (e *Engine) reserve(cpu, mem int) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	// Compared as "more than what is left": a huge request cannot overflow
	// the sum into a small one.
	if cpu > e.cfg.MaxCPU-e.usedCPU {
		return errdefs.New(errdefs.ResourceExceeded, "Total CPU limit (%d) would be exceeded", e.cfg.MaxCPU)
	}
	if mem > e.cfg.MaxMemoryMB-e.usedMem {
		return errdefs.New(errdefs.ResourceExceeded, "Total memory limit (%dMB) would be exceeded", e.cfg.MaxMemoryMB)
	}
	e.usedCPU += cpu
	e.usedMem += mem
	return nil
}

func (e *Engine) release(cpu, mem int) {
	e.mu.Lock()
	e.usedCPU -= cpu
	e.usedMem -= mem
	e.mu.Unlock()
}

// hostLimits are the defaults of Config.MaxCPU and MaxMemoryMB: the host's
// CPUs and memory.
func hostLimits() (cpu, memMB int) {
	cpu = goruntime.NumCPU()
	memMB = 8192
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				if kb, err := strconv.Atoi(f[1]); err == nil {
					memMB = kb / 1024
				}
			}
		}
	}
	return cpu, memMB
}
