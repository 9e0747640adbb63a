package boxrun

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/boxrun/boxrun/image"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/state"
)

// reconcile makes the records true again after the engine that wrote them
// died (kill -9, power loss): boxes whose VMM still runs are re-attached,
// other "running" boxes are marked stopped, half-created boxes are removed,
// and execs left "running" are finished as failed.
func (e *Engine) reconcile(ctx context.Context) error {
	recs, err := e.store.ListBoxes()
	if err != nil {
		return err
	}
	for _, rec := range recs {
		switch rec.Status {
		case state.Creating:
			// Create never finished: nothing of it may survive.
			if vm, err := e.attachVM(ctx, rec); err == nil {
				vm.Kill()
			}
			os.RemoveAll(e.boxDir(rec.ID))
			e.store.DeleteBox(rec.ID)
			e.log.Warn("removed a box whose creation was interrupted", "box", rec.ID)
			continue
		case state.Stopped, state.Error:
			// A Start interrupted by the crash may have left its VM running
			// on the box disk; the record says stopped, so make it true.
			if vm, err := e.attachVM(ctx, rec); err == nil {
				vm.Kill()
				e.log.Warn("killed the VM of a stopped box (interrupted start)", "box", rec.ID)
			}
		case state.Running:
			if err := e.reattach(ctx, rec); err != nil {
				e.log.Warn("box could not be re-attached; marking it stopped", "box", rec.ID, "err", err)
				now := time.Now().UTC()
				rec.Status, rec.StoppedAt, rec.RuntimeID = state.Stopped, &now, ""
				if err := e.store.PutBox(rec); err != nil {
					return err
				}
			}
		}
		if err := e.failOrphanExecs(rec.ID); err != nil {
			return err
		}
	}
	// A box dir without a record is a pooled VM's (pool.go) that the dead
	// engine left: its VM goes, and the dir.
	known := map[string]bool{}
	for _, rec := range recs {
		known[rec.ID] = true
	}
	ents, _ := os.ReadDir(filepath.Join(e.cfg.DataDir, "boxes"))
	for _, en := range ents {
		if !en.IsDir() || known[en.Name()] {
			continue
		}
		dir := e.boxDir(en.Name())
		if vm, err := e.hv.Attach(ctx, dir, en.Name()); err == nil {
			vm.Kill()
		}
		os.RemoveAll(dir)
		e.log.Warn("removed a pooled VM left by an earlier engine", "id", en.Name())
	}
	// A template being made when the engine died: its VM goes, and the
	// half-made template.
	builds, _ := filepath.Glob(filepath.Join(e.cache, "templates", ".build-*"))
	for _, dir := range builds {
		if building(dir) {
			continue // another engine's, on a shared cache (Config.SharedDir)
		}
		killVMIn(dir)
		os.RemoveAll(dir)
		e.log.Warn("removed a template build left by an earlier engine", "dir", dir)
	}
	return nil
}

// killVMIn kills the VMM (and a Cloud Hypervisor VM's virtiofsd) whose
// pid files are in dir, if those processes still run there (their working
// directory is dir: the pid was not reused).
func killVMIn(dir string) {
	want, err := os.Stat(dir)
	if err != nil {
		return
	}
	files, _ := filepath.Glob(filepath.Join(dir, "virtiofsd-*.pid"))
	for _, f := range append([]string{filepath.Join(dir, "qemu.pid"), filepath.Join(dir, "ch.pid")}, files...) {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		// The same dir, not the same string: the data dir's path may
		// run through a symlink that the process's cwd resolves.
		if cwd, err := os.Stat(fmt.Sprintf("/proc/%d/cwd", pid)); err == nil && os.SameFile(cwd, want) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// reattach adopts a running box's VM left by an earlier engine.
func (e *Engine) reattach(ctx context.Context, rec state.Box) error {
	vm, err := e.attachVM(ctx, rec)
	if err != nil {
		return err
	}
	lb, err := func() (*liveBox, error) {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		img := &image.Image{ID: rec.ImageID, Ref: rec.Image} // a host tree's: no config
		if rec.RootfsDir == "" {
			var err error
			if img, err = e.images.Get(actx, rec.ImageID); err != nil {
				return nil, err
			}
		}
		conn, err := vm.DialAgent(actx)
		if err != nil {
			return nil, err
		}
		agent := agentexec.NewClient(conn, e.log.With("box", rec.ID))
		if _, err := agent.Hello(actx, helloRequest(&rec)); err != nil {
			agent.Close()
			return nil, err
		}
		lb := &liveBox{vm: vm, agent: agent, img: img}
		if rec.Network {
			// The network lived in the dead engine: a new one, with the
			// same policy and published ports, on the VM's NIC.
			if lb.net, err = e.newNetwork(&rec); err != nil && len(rec.Ports) > 0 {
				// A published port taken meanwhile must not cost the box:
				// it comes back without its ports, and says so.
				e.log.Warn("re-attached box: its published ports could not be bound again", "box", rec.ID, "err", err)
				bare := rec
				bare.Ports = nil
				lb.net, err = e.newNetwork(&bare)
			}
			if err != nil {
				agent.Close()
				return nil, err
			}
			nconn, err := vm.DialNetwork(actx)
			if err != nil {
				lb.close()
				return nil, err
			}
			lb.net.Attach(nconn)
		}
		return lb, nil
	}()
	if err != nil {
		vm.Kill()
		return err
	}
	if err := e.reserve(rec.CPU, rec.MemoryMB); err != nil {
		e.log.Warn("re-attached box exceeds the resource limits", "box", rec.ID, "err", err)
		e.mu.Lock()
		e.usedCPU += rec.CPU
		e.usedMem += rec.MemoryMB
		e.mu.Unlock()
	}
	e.mu.Lock()
	e.live[rec.ID] = lb
	e.mu.Unlock()
	go e.watch(rec.ID, lb)
	e.log.Info("box re-attached", "box", rec.ID, "pid", vm.PID())
	return nil
}

// failOrphanExecs finishes the box's execs still marked running: their
// process (if any) belonged to a dead engine's session with the agent.
func (e *Engine) failOrphanExecs(boxID string) error {
	xs, err := e.store.ListExecs(boxID)
	if err != nil {
		return err
	}
	for _, x := range xs {
		if x.Status != state.ExecRunning {
			continue
		}
		evs, err := e.store.Events(x.ID, 0)
		if err != nil {
			return err
		}
		seq := 0
		if len(evs) > 0 {
			seq = evs[len(evs)-1].Seq + 1
		}
		msg := "the engine stopped while the command was running; its end was not observed"
		data, _ := json.Marshal(exitData{ExitCode: -1, Error: msg})
		if err := e.store.AppendEvent(x.ID, state.Event{Seq: seq, Type: state.EventExit, Data: string(data)}); err != nil &&
			!errdefs.Is(err, errdefs.ExecAlreadyFinished) {
			return err
		}
		now := time.Now().UTC()
		code := -1
		x.Status, x.ExitCode, x.ErrorMessage, x.FinishedAt = state.ExecFailed, &code, msg, &now
		if err := e.store.PutExec(x); err != nil {
			return err
		}
	}
	return nil
}
