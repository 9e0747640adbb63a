package boxrun

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/boxrun/boxrun/runtime"
	"github.com/boxrun/boxrun/state"
)

// The pool (Config.Pool): VMs restored from a template ahead of time, with
// stand-in disks, waiting for a box. A Create whose box has the shape of
// one (and no volumes: a virtio-9p share cannot be changed in a running
// VM) takes it: the box gets the VM's id, its dir is the VM's, its disks
// are put under the VM's disk devices (runtime.DiskSwapper) before the
// guest ever probed them, and the Hello does the rest. Each box taken,
// and each warm create of a shape, refills that shape in the background.
//
// Pooled VMs are not boxes: they count against no cap (MaxCPU,
// MaxMemoryMB), have no record, and Close kills them; one an engine left
// behind when it died is killed when the next engine opens the data dir.

type pooledVM struct {
	id  string // the box id the VM was started for
	key string // its template
	vm  runtime.VM
}

type pool struct {
	size int // VMs kept per shape; 0: no pool

	mu      sync.Mutex
	idle    map[string][]*pooledVM // by pool shape (poolShape)
	taken   map[string]*pooledVM   // by box id: claimed by a Create, not yet booted
	filling map[string]bool
	closed  bool
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

func newPool(size int) *pool {
	ctx, cancel := context.WithCancel(context.Background())
	return &pool{size: size, idle: map[string][]*pooledVM{}, taken: map[string]*pooledVM{},
		filling: map[string]bool{}, ctx: ctx, cancel: cancel}
}

// poolShape is what a pooled VM must match besides its template: a box
// with volumes never comes from the pool.
func poolShape(cpu, memMB int, network bool) string {
	return fmt.Sprintf("%d/%d/%v", cpu, memMB, network)
}

// take hands out an idle VM for a box of spec, or nil. The caller uses its
// id for the box; boot finds it with claimed, and release kills it if the
// Create fails before.
func (p *pool) take(e *Engine, spec *BoxSpec) *pooledVM {
	if p.size == 0 || len(spec.Volumes) > 0 || e.warm.snap == nil {
		return nil
	}
	shape := poolShape(spec.CPU, spec.MemoryMB, spec.Network)
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.idle[shape]) > 0 {
		pv := p.idle[shape][0]
		p.idle[shape] = p.idle[shape][1:]
		select {
		case <-pv.vm.Done(): // died while waiting
			os.RemoveAll(e.boxDir(pv.id))
			continue
		default:
		}
		p.taken[pv.id] = pv
		return pv
	}
	return nil
}

// claimed returns the pooled VM taken for box id, once.
func (p *pool) claimed(id string) *pooledVM {
	p.mu.Lock()
	defer p.mu.Unlock()
	pv := p.taken[id]
	delete(p.taken, id)
	return pv
}

// release kills the VM taken for box id if boot did not claim it.
func (p *pool) release(id string) {
	if pv := p.claimed(id); pv != nil {
		pv.vm.Kill()
	}
}

// assign gives a pooled VM the box's disks.
func (p *pool) assign(ctx context.Context, pv *pooledVM, cfg runtime.VMConfig) error {
	sw, ok := pv.vm.(runtime.DiskSwapper)
	if !ok {
		return fmt.Errorf("the VM cannot take disks")
	}
	if err := sw.SwapDisks(ctx, cfg.Disks); err != nil {
		return err
	}
	for i := range cfg.Disks {
		os.Remove(filepath.Join(cfg.Dir, fmt.Sprintf("standin%d", i)))
	}
	return nil
}

// refill restores VMs for rec's shape in the background until the pool
// holds size of them.
func (p *pool) refill(e *Engine, rec *state.Box) {
	if p.size == 0 || len(rec.Volumes) > 0 || e.warm.snap == nil {
		return
	}
	shape := poolShape(rec.CPU, rec.MemoryMB, rec.Network)
	p.mu.Lock()
	if p.closed || p.filling[shape] || len(p.idle[shape]) >= p.size {
		p.mu.Unlock()
		return
	}
	p.filling[shape] = true
	p.wg.Add(1)
	p.mu.Unlock()
	shapeRec := state.Box{CPU: rec.CPU, MemoryMB: rec.MemoryMB, Network: rec.Network}
	go func() {
		defer p.wg.Done()
		defer func() {
			p.mu.Lock()
			delete(p.filling, shape)
			p.mu.Unlock()
		}()
		for {
			p.mu.Lock()
			n := len(p.idle[shape])
			p.mu.Unlock()
			if n >= p.size || p.ctx.Err() != nil {
				return
			}
			pv, err := p.restore(e, shapeRec)
			if err != nil {
				if p.ctx.Err() == nil {
					e.log.Warn("pool: restoring a VM failed", "err", err)
				}
				return
			}
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				pv.vm.Kill()
				os.RemoveAll(e.boxDir(pv.id))
				return
			}
			p.idle[shape] = append(p.idle[shape], pv)
			p.mu.Unlock()
		}
	}()
}

// restore starts one pooled VM of shape rec from its template, in the dir
// of a box id of its own, with stand-in disks.
func (p *pool) restore(e *Engine, rec state.Box) (*pooledVM, error) {
	boot, err := e.bootAssets(p.ctx)
	if err != nil {
		return nil, err
	}
	rec.ID = newID("box_")
	dir := e.boxDir(rec.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cfg := e.vmConfig(&rec, dir, boot)
	for i := range cfg.Disks {
		path := filepath.Join(dir, fmt.Sprintf("standin%d", i))
		if err := os.WriteFile(path, nil, 0o600); err == nil {
			err = os.Truncate(path, 1<<20)
		}
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		cfg.Disks[i].Path = path
	}
	key, family, err := e.warm.key(cfg, boot)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	tdir, err := e.warm.ensure(p.ctx, e, key, family, cfg)
	if err == nil {
		var vm runtime.VM
		if vm, err = e.warm.snap.Restore(p.ctx, cfg, tdir); err == nil {
			return &pooledVM{id: rec.ID, key: key, vm: vm}, nil
		}
	}
	os.RemoveAll(dir)
	return nil, err
}

// count returns the idle VMs.
func (p *pool) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.idle {
		n += len(l)
	}
	return n
}

// close stops refilling and kills every idle VM.
func (p *pool) close(e *Engine) {
	p.mu.Lock()
	p.closed = true
	p.cancel()
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.idle {
		for _, pv := range l {
			pv.vm.Kill()
			os.RemoveAll(e.boxDir(pv.id))
		}
	}
	p.idle = map[string][]*pooledVM{}
}
