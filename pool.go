package boxrun

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/boxrun/boxrun/network"
	"github.com/boxrun/boxrun/state"
)

// The pool (Config.Pool): boxes made ahead of time, ready but unassigned.
// After a Create, the pool makes up to Config.Pool more boxes of the same
// image and shape (CPUs, memory, disk size, network on or off) in the
// background, each restored from its template (warm.go), set up by its
// Hello (own id, hostname, entropy, MAC, disks) and warmed by one `true`
// in it: under TCG a VM translates every code path once, so the first
// command of a fresh VM costs several times the next. A later Create of
// that image and shape takes one: the box gets the pooled box's id, its
// record and its network (with its own policy and ports, attached only
// now: until then a pooled box reaches nothing), and its first command
// answers at once. Boxes with volumes never come from the pool (a share cannot be
// added to a running VM), nor does a Create whose image resolves to
// another image than the pooled box's by then.
//
// Pooled boxes are not boxes yet: they have no record, but they count
// against the caps (MaxCPU, MaxMemoryMB: a pool is only filled while
// there is room, and a Create that takes one takes over its share), pin
// their image (RemoveImage and Prune drop the pool's boxes of an image
// first), and Close kills them; one an engine left behind when it died is
// removed when the next engine opens the data dir (reconcile.go).
//
// Lock order: p.mu is never held while the engine's e.mu is taken
// (e.reserve, e.release): Info holds e.mu and asks the pool for its
// count.

type pooledBox struct {
	id       string // the box id it was made for, and its hostname
	dir      string
	key      string // poolKey
	imageID  string
	cpu, mem int
	lb       *liveBox
	unpin    func()
	watched  bool // idleNow's watch runs (under p.mu)
}

type pool struct {
	size int // boxes kept per image and shape; 0: no pool

	mu      sync.Mutex
	idle    map[string][]*pooledBox // by poolKey
	taken   map[string]*pooledBox   // by box id: taken by a Create, not yet claimed by its boot
	filling map[string]bool
	closed  bool
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

func newPool(size int) *pool {
	ctx, cancel := context.WithCancel(context.Background())
	return &pool{size: size, idle: map[string][]*pooledBox{}, taken: map[string]*pooledBox{},
		filling: map[string]bool{}, ctx: ctx, cancel: cancel}
}

// poolKey is what a pooled box must share with a Create to serve it.
func poolKey(image string, cpu, memMB, diskGB int, network bool) string {
	return fmt.Sprintf("%s\x00%d/%d/%d/%v", image, cpu, memMB, diskGB, network)
}

// take hands out an idle box for spec, or nil. The Create uses its id; its
// boot claims it (claimed), and release kills it if the Create failed
// before.
func (p *pool) take(e *Engine, spec *BoxSpec) *pooledBox {
	if p.size == 0 || len(spec.Volumes) > 0 {
		return nil
	}
	key := poolKey(spec.Image, spec.CPU, spec.MemoryMB, spec.DiskSizeGB, spec.Network)
	var dead []*pooledBox
	defer func() {
		for _, pb := range dead {
			go p.discardIdle(e, pb)
		}
	}()
	p.mu.Lock()
	for len(p.idle[key]) > 0 {
		pb := p.idle[key][0]
		p.idle[key] = p.idle[key][1:]
		select {
		case <-pb.lb.vm.Done(): // died while waiting
			dead = append(dead, pb)
			continue
		default:
		}
		p.taken[pb.id] = pb
		p.mu.Unlock()
		// Its share of the caps goes to the Create, which reserves its own.
		e.release(pb.cpu, pb.mem)
		return pb
	}
	p.mu.Unlock()
	return nil
}

// idleNow puts pb in the idle list (under p.mu) and watches it there: a
// VM that dies while idle leaves the pool at once, giving back its share
// of the caps and its image, instead of holding them until a Create
// happens to take it.
func (p *pool) idleNow(e *Engine, pb *pooledBox) {
	p.idle[pb.key] = append(p.idle[pb.key], pb)
	if pb.watched { // idle again (its Create failed): its watch goes on
		return
	}
	pb.watched = true
	go func() {
		select {
		case <-pb.lb.vm.Done():
		case <-p.ctx.Done(): // close discards what is idle
			return
		}
		if p.unidle(pb) {
			e.log.Warn("pool: an idle box's VM died", "box", pb.id)
			p.discardIdle(e, pb)
		}
	}()
}

// unidle takes pb out of the idle list, if it is there: whoever does owns
// it (a Create, close, dropImage or the watch of idleNow).
func (p *pool) unidle(pb *pooledBox) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	l := p.idle[pb.key]
	for i, x := range l {
		if x == pb {
			p.idle[pb.key] = append(l[:i:i], l[i+1:]...)
			return true
		}
	}
	return false
}

// claimed returns the pooled box taken for box id, once.
func (p *pool) claimed(id string) *pooledBox {
	p.mu.Lock()
	defer p.mu.Unlock()
	pb := p.taken[id]
	delete(p.taken, id)
	return pb
}

// release puts the box taken for id back in the pool if its Create did
// not claim it (the Create failed before it booted: a name in use, no
// room, an image it could not pull), or discards it if there is no room
// for it any more or its VM died.
func (p *pool) release(e *Engine, id string) {
	pb := p.claimed(id)
	if pb == nil {
		return
	}
	select {
	case <-pb.lb.vm.Done():
		p.discard(e, pb)
		return
	default:
	}
	if e.reserve(pb.cpu, pb.mem) != nil {
		p.discard(e, pb)
		return
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		e.release(pb.cpu, pb.mem)
		p.discard(e, pb)
		return
	}
	p.idleNow(e, pb)
	p.mu.Unlock()
}

// discard kills a pooled box's VM, removes its dir, gives back its share
// of the caps (when it holds one: idle) and unpins its image.
func (p *pool) discard(e *Engine, pb *pooledBox) {
	pb.lb.close()
	pb.lb.vm.Kill()
	os.RemoveAll(pb.dir)
	pb.unpin()
}

// discardIdle discards an idle box: it holds a share of the caps.
func (p *pool) discardIdle(e *Engine, pb *pooledBox) {
	e.release(pb.cpu, pb.mem)
	p.discard(e, pb)
}

// dropImage discards the idle boxes of an image (all when id is ""), so
// that RemoveImage and Prune see only what boxes use.
func (p *pool) dropImage(e *Engine, id string) {
	p.mu.Lock()
	var drop []*pooledBox
	for key, l := range p.idle {
		keep := l[:0]
		for _, pb := range l {
			if id == "" || pb.imageID == id {
				drop = append(drop, pb)
			} else {
				keep = append(keep, pb)
			}
		}
		p.idle[key] = keep
	}
	p.mu.Unlock()
	for _, pb := range drop {
		p.discardIdle(e, pb)
	}
}

// assign makes the pooled box rec's: its image must be the one rec's
// reference resolved to, and it gets rec's network. On failure the pooled
// box is gone and rec's dir is empty again.
func (p *pool) assign(ctx context.Context, e *Engine, rec *state.Box, pb *pooledBox) (*liveBox, error) {
	err := func() error {
		if pb.imageID != rec.ImageID {
			return fmt.Errorf("pooled box has image %s, the box wants %s", pb.imageID, rec.ImageID)
		}
		if !rec.Network {
			return nil
		}
		// The pooled box's own network (which denies everything) goes;
		// QEMU takes one connection at a time.
		if pb.lb.net != nil {
			pb.lb.net.Close()
			pb.lb.net = nil
		}
		nw, err := e.newNetwork(rec)
		if err != nil {
			return err
		}
		conn, err := pb.lb.vm.DialNetwork(ctx)
		if err != nil {
			nw.Close()
			return err
		}
		nw.Attach(conn)
		pb.lb.net = nw
		return nil
	}()
	if err != nil {
		p.discard(e, pb)
		return nil, err
	}
	pb.unpin()
	e.warm.pooled.Add(1)
	return pb.lb, nil
}

// refill makes boxes of rec's image and shape in the background until the
// pool holds size of them.
func (p *pool) refill(e *Engine, rec *state.Box) {
	if p.size == 0 || len(rec.Volumes) > 0 {
		return
	}
	key := poolKey(rec.Image, rec.CPU, rec.MemoryMB, rec.DiskSizeGB, rec.Network)
	p.mu.Lock()
	if p.closed || p.filling[key] || len(p.idle[key]) >= p.size {
		p.mu.Unlock()
		return
	}
	p.filling[key] = true
	p.wg.Add(1)
	p.mu.Unlock()
	shape := state.Box{Image: rec.Image, ImageID: rec.ImageID, CPU: rec.CPU, MemoryMB: rec.MemoryMB,
		DiskSizeGB: rec.DiskSizeGB, Network: rec.Network}
	go func() {
		defer p.wg.Done()
		defer func() {
			p.mu.Lock()
			delete(p.filling, key)
			p.mu.Unlock()
		}()
		for {
			p.mu.Lock()
			n := len(p.idle[key])
			p.mu.Unlock()
			if n >= p.size || p.ctx.Err() != nil {
				return
			}
			pb, err := p.make(e, key, shape)
			if err != nil {
				if p.ctx.Err() == nil {
					e.log.Warn("pool: making a box failed", "image", shape.Image, "err", err)
				}
				return
			}
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				p.discardIdle(e, pb)
				return
			}
			p.idleNow(e, pb)
			p.mu.Unlock()
		}
	}()
}

// make boots one box of shape for the pool, as Create would but without a
// record, if there is room for it under the caps, then runs `true` in it
// once: the first command of a fresh VM is the slow one.
func (p *pool) make(e *Engine, key string, shape state.Box) (*pooledBox, error) {
	if err := e.reserve(shape.CPU, shape.MemoryMB); err != nil {
		return nil, err
	}
	unpin, ok := e.pin(shape.ImageID)
	if !ok {
		e.release(shape.CPU, shape.MemoryMB)
		return nil, fmt.Errorf("image %s is gone", shape.ImageID)
	}
	rec := shape
	rec.ID = newID("box_")
	// Its NIC's host end until a Create takes it: a network that lets
	// nothing out. (A NIC without one would do, but QEMU then holds the
	// guest's frames back and the link stays wedged once connected.)
	rec.NetworkPolicy = network.Policy{Deny: []string{"0.0.0.0/0", "::/0"}}
	lb, err := e.bootBox(context.WithValue(p.ctx, poolBoot{}, true), &rec, true)
	if err != nil {
		os.RemoveAll(e.boxDir(rec.ID))
		unpin()
		e.release(shape.CPU, shape.MemoryMB)
		return nil, err
	}
	pb := &pooledBox{id: rec.ID, dir: e.boxDir(rec.ID), key: key, imageID: rec.ImageID,
		cpu: shape.CPU, mem: shape.MemoryMB, lb: lb, unpin: unpin}
	ctx, cancel := context.WithTimeout(p.ctx, time.Minute)
	defer cancel()
	// The warm-up's outcome does not matter (an image may have no
	// `true`); a VM that died during it does.
	if proc, err := lb.agent.Start(ctx, e.command(rec, lb, ExecSpec{Cmd: []string{"true"}})); err == nil {
		proc.Wait(io.Discard, io.Discard)
	}
	select {
	case <-lb.vm.Done():
		p.discardIdle(e, pb)
		return nil, fmt.Errorf("pooled box %s died while warming up", pb.id)
	default:
	}
	return pb, nil
}

// count returns the idle pooled boxes.
func (p *pool) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.idle {
		n += len(l)
	}
	return n
}

// close stops refilling and kills every idle pooled box.
func (p *pool) close(e *Engine) {
	p.mu.Lock()
	p.closed = true
	p.cancel()
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	idle := p.idle
	p.idle = map[string][]*pooledBox{}
	p.mu.Unlock()
	for _, l := range idle {
		for _, pb := range l {
			p.discardIdle(e, pb)
		}
	}
}
