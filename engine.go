package boxrun

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/boxrun/boxrun/disk"
	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/image"
	"github.com/boxrun/boxrun/network"
	"github.com/boxrun/boxrun/runtime"
	"github.com/boxrun/boxrun/state"
)

// Engine creates and drives boxes. It is safe for concurrent use.
type Engine struct {
	cfg    Config
	log    *slog.Logger
	images *image.Store
	bases  *disk.Bases
	cache  string // kernel, agent, initramfs, templates: DataDir's or Config.SharedDir's
	hv     runtime.Hypervisor
	hvDesc runtime.Description // hv's version and acceleration, for Info
	store  state.Store
	imgs   imageUse // pins images against removal (images.go)

	assetsMu sync.Mutex // guards assets: kernel and initramfs, prepared on first use
	assets   *bootAssets
	warm     *warmStart // templates and boot counters (warm.go)
	pool     *pool      // VMs restored ahead of time (pool.go)

	mu      sync.Mutex
	live    map[string]*liveBox  // running boxes by id
	execs   map[string]*liveExec // running execs by id
	busy    map[string]bool      // boxes being created, started, stopped or removed
	pumps   sync.WaitGroup       // exec pumps still recording
	closed  bool                 // Close has begun: no new boxes
	usedCPU int                  // totals over running boxes
	usedMem int
}

// liveBox is what the engine holds for a running box.
type liveBox struct {
	vm    runtime.VM
	agent *agentexec.Client
	img   *image.Image
	net   *network.Network // nil without Network
}

// close releases what the engine holds for the box: the agent connection
// and the network (published ports, connections). The VM is the caller's.
func (lb *liveBox) close() {
	lb.agent.Close()
	if lb.net != nil {
		lb.net.Close()
	}
}

type bootAssets struct {
	kernel    *runtime.Kernel
	initramfs string
}

// New opens an engine on cfg.DataDir.
func New(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.DataDir == "" {
		cfg.DataDir = os.Getenv("BOXRUN_DATA_DIR")
	}
	if cfg.DataDir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "no data dir")
		}
		cfg.DataDir = filepath.Join(home, ".boxrun")
	}
	if cfg.BootTimeout <= 0 {
		cfg.BootTimeout = 2 * time.Minute
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 10 * time.Second
	}
	hostCPU, hostMem := hostLimits()
	if cfg.MaxCPU <= 0 {
		cfg.MaxCPU = hostCPU
	}
	if cfg.MaxMemoryMB <= 0 {
		cfg.MaxMemoryMB = hostMem
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	hv, err := pickHypervisor(cfg)
	if err != nil {
		return nil, err
	}
	if cfg.SharedDir != "" && !filepath.IsAbs(cfg.SharedDir) {
		return nil, errdefs.New(errdefs.ValidationError, "shared dir %q must be an absolute path", cfg.SharedDir)
	}
	shared := cfg.SharedDir
	if shared == "" {
		shared = cfg.DataDir
	}
	for _, d := range []string{filepath.Join(cfg.DataDir, "boxes"), filepath.Join(shared, "cache"), filepath.Join(shared, "bases")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "data dir")
		}
	}
	store, err := state.Open(filepath.Join(cfg.DataDir, "state"), state.Options{MaxOutputBytes: cfg.MaxExecOutputBytes, Logger: log})
	if err != nil {
		return nil, err
	}
	images, err := image.Open(image.Options{
		Root:           filepath.Join(cfg.DataDir, "storage"),
		RunRoot:        filepath.Join(cfg.DataDir, "run", "storage"),
		Driver:         cfg.StorageDriver,
		RegistriesConf: cfg.RegistriesConf,
		Progress:       cfg.PullProgress,
		Logger:         log,
	})
	if err != nil {
		store.Close()
		return nil, err
	}
	e := &Engine{
		cfg:    cfg,
		log:    log,
		images: images,
		bases:  &disk.Bases{Dir: filepath.Join(shared, "bases")},
		cache:  filepath.Join(shared, "cache"),
		hv:     hv,
		hvDesc: runtime.Describe(hv),
		store:  store,
		live:   map[string]*liveBox{},
		execs:  map[string]*liveExec{},
		busy:   map[string]bool{},
	}
	if os.Geteuid() != 0 {
		// Not root: the image store could not chown the layers' files
		// (they are all the caller's), so the base disks take their
		// owners from the layers' tar headers.
		e.bases.Owners = func(ctx context.Context, imageID string) (map[string]disk.Owner, error) {
			if strings.HasPrefix(imageID, rootfsPrefix) {
				return nil, nil // a host tree has its real owners
			}
			owners, err := e.images.Owners(ctx, imageID)
			if err != nil {
				return nil, err
			}
			out := make(map[string]disk.Owner, len(owners))
			for p, o := range owners {
				out[p] = disk.Owner{UID: o.UID, GID: o.GID, Device: o.Device, Major: o.Major, Minor: o.Minor, Mode: o.Mode}
			}
			return out, nil
		}
	}
	mb := cfg.TemplateCacheMB
	if mb <= 0 {
		mb = defaultTemplateCacheMB
	}
	e.warm = &warmStart{dir: filepath.Join(e.cache, "templates"), maxBytes: int64(mb) << 20,
		locks: map[string]*sync.Mutex{}}
	if snap, ok := hv.(runtime.Snapshotter); ok && warmEnabled(cfg.WarmStart) {
		e.warm.snap = snap
		e.warm.images = imageTemplates(snap) && toggleOn(cfg.ImageTemplates, "BOXRUN_IMAGE_TEMPLATES")
		e.warm.ctx, e.warm.cancel = context.WithCancel(context.Background())
		e.warm.wants, e.warm.inflight = map[string]int{}, map[string]bool{}
		e.warm.bgSlot = make(chan struct{}, 1)
	}
	e.pool = newPool(max(cfg.Pool, 0))
	if err := e.reconcile(ctx); err != nil {
		images.Close()
		store.Close()
		return nil, err
	}
	return e, nil
}

// pickHypervisor returns the driver Config names (see Config.Hypervisor).
func pickHypervisor(cfg Config) (runtime.Hypervisor, error) {
	return runtime.Select(cfg.Hypervisor, cfg.CloudHypervisor)
}

// attachVM finds the VM of a box left by an earlier engine. A running box
// is attached by the driver that started it (its RuntimeID names it,
// "qemu:PID"), which need not be today's: auto may pick another driver
// once cloud-hypervisor is installed. Without a RuntimeID (a box being
// created or stopped), every driver looks.
func (e *Engine) attachVM(ctx context.Context, rec state.Box) (runtime.VM, error) {
	drivers := runtime.Drivers(e.hv, e.cfg.CloudHypervisor)
	if name, _, ok := strings.Cut(rec.RuntimeID, ":"); ok {
		for _, d := range drivers {
			if d.Name() == name {
				return d.Attach(ctx, e.boxDir(rec.ID), rec.ID)
			}
		}
	}
	var errs []error
	for _, d := range drivers {
		vm, err := d.Attach(ctx, e.boxDir(rec.ID), rec.ID)
		if err == nil {
			return vm, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// Create pulls the image if needed, boots a box from it and returns once its
// agent answers. A Create that fails leaves no box, disk or process behind.
func (e *Engine) Create(ctx context.Context, spec BoxSpec) (*Box, error) {
	if err := spec.normalize(); err != nil {
		return nil, err
	}
	policy, err := e.pullPolicy(spec.PullPolicy)
	if err != nil {
		return nil, err
	}
	if err := e.open(); err != nil {
		return nil, err
	}
	// A box made ahead of time for this image and shape (Config.Pool)
	// decides the box's id: it was set up as that box.
	var id string
	if pb := e.pool.take(e, &spec); spec.Rootfs == nil && pb != nil {
		id = pb.id
	} else {
		id = newID("box_")
	}
	defer e.pool.release(e, id)       // discards it unless the box booted on it
	release, err := e.claim(id, true) // a new id: busy only if closed
	if err != nil {
		return nil, err
	}
	defer release()
	now := time.Now().UTC()
	rec := state.Box{
		ID: id, Name: spec.Name, Status: state.Creating, Image: spec.Image,
		CPU: spec.CPU, MemoryMB: spec.MemoryMB, DiskSizeGB: spec.DiskSizeGB,
		Network: spec.Network, Workdir: spec.Workdir, Env: spec.Env, CreatedAt: now,
		NetworkPolicy: spec.NetworkPolicy, Ports: spec.Ports,
	}
	for _, v := range spec.Volumes {
		rec.Volumes = append(rec.Volumes, state.Volume{HostPath: v.HostPath, GuestPath: v.GuestPath, ReadOnly: v.ReadOnly})
	}
	// The record reserves the name; it is removed again if anything fails.
	if err := e.store.PutBox(rec); err != nil {
		return nil, err
	}
	dir := e.boxDir(id)
	if err := e.reserve(rec.CPU, rec.MemoryMB); err != nil {
		e.store.DeleteBox(id)
		return nil, err
	}
	if spec.Rootfs != nil {
		rec.RootfsDir, rec.ImageID, rec.RootfsPrivate = spec.Rootfs.Dir, rootfsKey(spec.Rootfs.Key), spec.Rootfs.Private
	} else {
		// The image, under the pull policy, pinned against Prune and
		// RemoveImage until the box's record names it.
		img, unpin, err := e.pullPinned(ctx, spec.Image, policy)
		if err != nil {
			e.release(rec.CPU, rec.MemoryMB)
			e.store.DeleteBox(id)
			return nil, err
		}
		defer unpin()
		rec.ImageID = img.ID
	}
	lb, err := e.bootBox(ctx, &rec, true)
	if err != nil {
		e.release(rec.CPU, rec.MemoryMB)
		os.RemoveAll(dir)
		e.dropPrivateBase(&rec)
		e.store.DeleteBox(id)
		return nil, err
	}
	if err := e.markRunning(&rec, lb); err != nil {
		e.release(rec.CPU, rec.MemoryMB)
		e.destroy(lb, dir)
		e.dropPrivateBase(&rec)
		e.store.DeleteBox(id)
		return nil, err
	}
	e.log.Info("box created", "box", id, "image", spec.Image, "pid", lb.vm.PID())
	if spec.Rootfs != nil {
		// Noted once its base disk exists (PruneRootfs).
		e.noteSources(rec.ImageID, spec.Rootfs.Sources)
	} else {
		e.pool.refill(e, &rec)
	}
	return boxOf(rec), nil
}

// markRunning records a booted box as running and makes it live.
func (e *Engine) markRunning(rec *state.Box, lb *liveBox) error {
	started := time.Now().UTC()
	rec.Status, rec.StartedAt, rec.StoppedAt = state.Running, &started, nil
	rec.RuntimeID = fmt.Sprintf("%s:%d", e.hv.Name(), lb.vm.PID())
	e.mu.Lock()
	e.live[rec.ID] = lb
	e.mu.Unlock()
	if err := e.store.PutBox(*rec); err != nil {
		e.mu.Lock()
		delete(e.live, rec.ID)
		e.mu.Unlock()
		return err
	}
	go e.watch(rec.ID, lb)
	return nil
}

func (e *Engine) boxDir(id string) string { return filepath.Join(e.cfg.DataDir, "boxes", id) }

// open fails once Close has begun, so that no box boots behind it.
func (e *Engine) open() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return errdefs.New(errdefs.RuntimeError, "engine is closed")
	}
	return nil
}

// claim gives one lifecycle operation (create, start, stop, remove) sole
// use of a box until the returned release is called: two of them at once
// on one box could boot two VMs on one disk, or resurrect a removed box.
// An operation that boots (boots) is refused once Close has begun, in
// the same critical section: Close waits for the claims it finds, so a
// boot claimed after that wait would leave a VM behind a closed engine.
func (e *Engine) claim(id string, boots bool) (release func(), err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if boots && e.closed {
		return nil, errdefs.New(errdefs.RuntimeError, "engine is closed")
	}
	if e.busy[id] {
		return nil, errdefs.New(errdefs.RuntimeError, "Box '%s' is busy (being created, started, stopped or removed)", id)
	}
	e.busy[id] = true
	return func() {
		e.mu.Lock()
		delete(e.busy, id)
		e.mu.Unlock()
	}, nil
}

// claimBox looks a box up by id or name and claims it (see claim),
// returning its record as it is once claimed.
func (e *Engine) claimBox(idOrName string, boots bool) (state.Box, func(), error) {
	rec, err := e.store.GetBox(idOrName)
	if err != nil {
		return rec, nil, err
	}
	release, err := e.claim(rec.ID, boots)
	if err != nil {
		return rec, nil, err
	}
	if rec, err = e.store.GetBox(rec.ID); err != nil {
		release()
		return rec, nil, err
	}
	return rec, release, nil
}

// watch marks a box stopped when its VM goes away on its own (guest
// poweroff or panic, VMM killed): it must not stay "running" for ever.
func (e *Engine) watch(id string, lb *liveBox) {
	<-lb.vm.Done()
	e.mu.Lock()
	mine := e.live[id] == lb
	if mine {
		delete(e.live, id)
	}
	e.mu.Unlock()
	if !mine {
		return // stopped or removed on purpose
	}
	lb.close()
	lb.vm.Kill() // reaps and removes its sockets
	rec, err := e.store.GetBox(id)
	if err != nil {
		return
	}
	e.release(rec.CPU, rec.MemoryMB)
	now := time.Now().UTC()
	rec.Status, rec.StoppedAt, rec.RuntimeID = state.Stopped, &now, ""
	e.store.PutBox(rec)
	e.log.Warn("box VM exited on its own; box marked stopped", "box", id, "console", lb.vm.Console())
}

// bootBox boots a box's VM: the image (rec.ImageID, which Create pulled;
// pulled here only for a record without one), its base disk, the box disk
// (made when fresh, else reused with everything the box wrote) and the
// boot assets. A fresh box that a Create took from the pool (pool.go) is
// only given its network.
func (e *Engine) bootBox(ctx context.Context, rec *state.Box, fresh bool) (*liveBox, error) {
	if fresh {
		// A box made ahead of time for this Create (Config.Pool).
		if pb := e.pool.claimed(rec.ID); pb != nil {
			lb, err := e.pool.assign(ctx, e, rec, pb)
			if err == nil {
				return lb, nil
			}
			e.log.Warn("pooled box not usable; booting one", "box", rec.ID, "err", err)
		}
	}
	var img *image.Image
	var err error
	if rec.RootfsDir != "" {
		return e.bootRootfs(ctx, rec, fresh)
	}
	if rec.ImageID == "" {
		img, err = e.images.Pull(ctx, rec.Image)
	} else {
		// The box's disk sits on this exact image: never another one its
		// reference may name by now.
		img, err = e.images.Get(ctx, rec.ImageID)
	}
	if err != nil {
		return nil, err
	}
	rec.ImageID = img.ID
	base, err := e.bases.Ensure(ctx, img.ID, func() (string, func(), error) {
		root, err := e.images.Mount(ctx, img.ID)
		if err != nil {
			return "", nil, err
		}
		return root, func() { e.images.Unmount(img.ID) }, nil
	})
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "base disk for %s", rec.Image)
	}
	return e.bootOn(ctx, rec, fresh, img, base)
}

// bootOn boots a box on its base disk, with the box disk (made when fresh)
// and the boot assets.
func (e *Engine) bootOn(ctx context.Context, rec *state.Box, fresh bool, img *image.Image, base string) (*liveBox, error) {
	dir := e.boxDir(rec.ID)
	boot, err := e.bootAssets(ctx)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "box dir")
	}
	data := filepath.Join(dir, "disk.ext4")
	var fd *freshDisk
	if fresh {
		fd = &freshDisk{path: data, sizeGB: rec.DiskSizeGB}
		// Made at the boot when it may be a clone of the image template's
		// (warm.go): not for a private tree's base, which goes with its box.
		if !e.warm.images || rec.RootfsPrivate {
			if err := fd.make(ctx); err != nil {
				return nil, err
			}
			fd = nil
		}
	} else if _, err := os.Stat(data); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "box disk")
	}
	lb, err := e.boot(ctx, rec, dir, base, data, boot, fd)
	if err != nil {
		return nil, err
	}
	lb.img = img
	return lb, nil
}

// boot starts the VM and waits for its agent's hello. fresh (a new box)
// is its box disk, not made yet when it may be cloned (startVM).
func (e *Engine) boot(ctx context.Context, rec *state.Box, dir, base, data string, boot *bootAssets, fresh *freshDisk) (*liveBox, error) {
	cfg := e.vmConfig(rec, dir, boot)
	cfg.Disks[0].Path, cfg.Disks[1].Path = base, data
	// Restored from the image's or the shape's template
	// (Config.WarmStart), else booted cold; a restored VM that does not
	// come up costs a cold boot.
	lb, err := e.bootVM(ctx, rec, cfg, boot, e.warm.snap != nil, fresh)
	for {
		wf, ok := err.(*warmFailure)
		if !ok {
			return lb, err
		}
		e.warm.restoreFailed(wf.tpl.key, wf.tpl.ino)
		e.warm.fallbacks.Add(1)
		// From an image's template: its disk is the clone the restored
		// guest had mounted. A new empty one, and the shape's template
		// next (a cold boot after that).
		warm := wf.tpl.image && fresh != nil
		if warm {
			fresh.made = false
			if err := fresh.make(ctx); err != nil {
				return nil, err
			}
		}
		next := "booting cold"
		if warm {
			next = "trying the shape's template"
		}
		e.log.Warn("restored box did not come up; "+next, "box", rec.ID, "template", wf.tpl.key, "err", wf.err)
		lb, err = e.bootVM(ctx, rec, cfg, boot, warm, nil)
	}
}

// vmConfig is the VM of a box, with its disks' paths left empty.
func (e *Engine) vmConfig(rec *state.Box, dir string, boot *bootAssets) runtime.VMConfig {
	return runtime.VMConfig{
		ID: rec.ID, Dir: dir, CPUs: rec.CPU, MemoryMB: rec.MemoryMB,
		Kernel: boot.kernel.Vmlinux, Initramfs: boot.initramfs,
		Cmdline: "boxrun.base=/dev/vda boxrun.data=/dev/vdb",
		Disks:   []runtime.Disk{{ReadOnly: true}, {}},
		Volumes: vmVolumes(rec.Volumes),
		Network: rec.Network,
		MAC:     macOf(rec.ID),
		Logger:  e.log,
	}
}

// warmFailure is a restored VM that did not answer its Hello.
type warmFailure struct {
	tpl template
	err error
}

func (w *warmFailure) Error() string { return w.err.Error() }

// bootVM starts the box's network and VM, restored from its template when
// warm (warm.go), else booted cold, and says Hello to its agent, which
// sets the box up.
func (e *Engine) bootVM(ctx context.Context, rec *state.Box, cfg runtime.VMConfig, boot *bootAssets, warm bool, fresh *freshDisk) (*liveBox, error) {
	// The network first: a published port already in use fails the box
	// before any VM starts.
	var nw *network.Network
	if rec.Network {
		var err error
		if nw, err = e.newNetwork(rec); err != nil {
			return nil, err
		}
	}
	closeNet := func() {
		if nw != nil {
			nw.Close()
		}
	}
	var vm runtime.VM
	var tpl template
	var err error
	t0 := time.Now()
	if warm {
		vm, tpl, err = e.startVM(ctx, cfg, boot, fresh)
	} else {
		vm, err = e.hv.Start(ctx, cfg)
	}
	if err != nil {
		closeNet()
		return nil, err
	}
	fail := func(err error) (*liveBox, error) {
		vm.Kill()
		closeNet()
		return nil, err
	}
	t1 := time.Now()
	timeout := e.cfg.BootTimeout
	if tpl.key != "" {
		timeout = min(timeout, warmHelloTimeout)
	}
	bctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// A restored VM that cannot be reached (its guest died at once: QEMU
	// exits) is the template's fault, as one that does not answer.
	dialFailed := func(err error, what string) (*liveBox, error) {
		fail(err)
		if tpl.key != "" && ctx.Err() == nil {
			return nil, &warmFailure{tpl: tpl, err: errdefs.Wrap(errdefs.RuntimeError, err, "%s", what)}
		}
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "%s", what)
	}
	if nw != nil {
		conn, err := vm.DialNetwork(bctx)
		if err != nil {
			return dialFailed(err, "connect the box's network")
		}
		nw.Attach(conn)
	}
	conn, err := vm.DialAgent(bctx)
	if err != nil {
		return dialFailed(err, "connect to box agent")
	}
	agent := agentexec.NewClient(conn, e.log.With("box", rec.ID))
	hello := helloRequest(rec)
	hello.Disks = diskSizes(cfg.Disks)
	if info, err := agent.Hello(bctx, hello); err != nil {
		agent.Close()
		// A restored guest that does not answer may be the template's
		// fault: boot cold. An agent that answers with an error (a disk
		// it cannot mount, a bad configuration: info set) would fail a
		// cold boot too, except TIMEOUT: it waited for what the restore
		// should have given it (a disk's capacity), which a cold boot
		// gives at once.
		templateFault := !agentexec.AgentAnswered(err) && errdefs.CodeOf(err) != errdefs.ValidationError ||
			agentexec.AgentAnswered(err) && errdefs.CodeOf(err) == errdefs.Timeout
		if tpl.key != "" && ctx.Err() == nil && info == nil && templateFault {
			fail(err)
			return nil, &warmFailure{tpl: tpl, err: err}
		}
		code := errdefs.RuntimeError
		if ctx.Err() != nil {
			code = errdefs.Canceled
		} else if bctx.Err() != nil {
			code = errdefs.Timeout
		}
		return fail(errdefs.Wrap(code, err, "box %s did not come up; console:\n%s", rec.ID, vm.Console()))
	}
	e.log.Debug("box booted", "box", rec.ID, "vm", t1.Sub(t0).Round(time.Millisecond), "hello", time.Since(t1).Round(time.Millisecond))
	if tpl.key != "" {
		e.warm.warm.Add(1)
		if tpl.image {
			e.warm.premounted.Add(1)
		}
		e.warm.restoreWorked(tpl.key)
	} else {
		e.warm.cold.Add(1)
	}
	return &liveBox{vm: vm, agent: agent, net: nw}, nil
}

func (e *Engine) newNetwork(rec *state.Box) (*network.Network, error) {
	f, err := network.NewFilter(rec.NetworkPolicy)
	if err != nil {
		return nil, err
	}
	return network.New(network.Config{Filter: f, Ports: rec.Ports, Logger: e.log.With("box", rec.ID)})
}

// macOf is a box's own MAC address: locally administered, from its id.
func macOf(id string) string {
	h := sha256.Sum256([]byte(id))
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", h[0], h[1], h[2])
}

// helloRequest is the box configuration the agent applies on every
// (re)connection: clock, volumes, network.
func helloRequest(rec *state.Box) agentexec.HelloRequest {
	req := agentexec.HelloRequest{Time: time.Now(), Hostname: rec.ID, Entropy: entropy()}
	for i, v := range vmVolumes(rec.Volumes) {
		req.Mounts = append(req.Mounts, agentexec.Mount{Tag: v.Tag, Path: rec.Volumes[i].GuestPath, ReadOnly: v.ReadOnly})
	}
	if rec.Network {
		req.Network = &agentexec.Network{
			Address: netip.PrefixFrom(network.Guest, network.Subnet.Bits()).String(),
			Gateway: network.Gateway.String(), DNS: []string{network.DNS.String()}, MTU: network.MTU,
			MAC: macOf(rec.ID),
		}
	}
	return req
}

// diskSizes are the sizes of a VM's writable disks by guest device (the
// Nth disk is /dev/vd and the Nth letter), for the Hello: the agent mounts
// them only once the guest sees these sizes (a restored VM learns them
// late). A read-only disk's size is in the template's key; a size that is
// not whole sectors (which VMMs round differently) is left out.
func diskSizes(disks []runtime.Disk) map[string]int64 {
	m := map[string]int64{}
	for i, d := range disks {
		if d.ReadOnly || i >= 26 {
			continue
		}
		if st, err := os.Stat(d.Path); err == nil && st.Size() > 0 && st.Size()%512 == 0 {
			m["/dev/vd"+string(rune('a'+i))] = st.Size()
		}
	}
	return m
}

// vmVolumes names a box's volumes for the VM: tag volN for the Nth.
func vmVolumes(vols []state.Volume) []runtime.Volume {
	var out []runtime.Volume
	for i, v := range vols {
		out = append(out, runtime.Volume{Tag: fmt.Sprintf("vol%d", i), HostPath: v.HostPath, ReadOnly: v.ReadOnly})
	}
	return out
}

// bootAssets prepares the kernel and the initramfs once per engine. A
// failure is not cached: the next Create tries again.
func (e *Engine) bootAssets(ctx context.Context) (*bootAssets, error) {
	e.assetsMu.Lock()
	defer e.assetsMu.Unlock()
	if e.assets != nil {
		return e.assets, nil
	}
	cache := e.cache
	k, err := runtime.PrepareKernel(e.cfg.Kernel, e.cfg.KernelModules, cache)
	if err != nil {
		return nil, err
	}
	agentPath := e.cfg.AgentPath
	if agentPath == "" {
		if agentPath, err = agentexec.AgentPath(ctx, cache); err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "guest agent")
		}
	}
	initramfs, err := runtime.BuildInitramfs(k, agentPath, cache)
	if err != nil {
		return nil, err
	}
	e.assets = &bootAssets{kernel: k, initramfs: initramfs}
	return e.assets, nil
}

// Pull fetches an image into the engine's store under Config.PullPolicy
// (by default a reference already there is not fetched again; PullWith
// chooses per call) and describes it. Progress goes to
// Config.PullProgress and to a callback set with WithPullProgress.
func (e *Engine) Pull(ctx context.Context, ref string) (*image.Image, error) {
	return e.PullWith(ctx, ref, PullOptions{})
}

// WithPullProgress returns a context under which the engine's pulls (Pull,
// and Create's) also report their progress to fn.
func WithPullProgress(ctx context.Context, fn func(image.Progress)) context.Context {
	return image.WithProgress(ctx, fn)
}

// Info reports the engine's limits and what running boxes use of them.
func (e *Engine) Info() Info {
	pooled := e.pool.count() // not under e.mu: see the lock order in pool.go
	e.mu.Lock()
	defer e.mu.Unlock()
	return Info{
		MaxCPU: e.cfg.MaxCPU, MaxMemoryMB: e.cfg.MaxMemoryMB,
		UsedCPU: e.usedCPU, UsedMemoryMB: e.usedMem,
		Hypervisor: e.hv.Name(), Boxes: len(e.live),
		HypervisorVersion: e.hvDesc.Version, Acceleration: e.hvDesc.Acceleration,
		Boots: e.warm.stats(), PoolVMs: pooled,
	}
}

// ReleaseRoot unmounts what the box's agent mounted in root (/proc, /sys,
// /dev) for commands run in it (ExecSpec.Root), once they are all gone.
func (e *Engine) ReleaseRoot(ctx context.Context, idOrName, root string) error {
	_, lb, err := e.running(idOrName)
	if err != nil {
		return err
	}
	return lb.agent.ReleaseRoot(ctx, root)
}

// Usage reads what a running box uses of its VM, from its guest kernel.
// Errors: BOX_NOT_FOUND, BOX_NOT_RUNNING.
func (e *Engine) Usage(ctx context.Context, idOrName string) (Usage, error) {
	_, lb, err := e.running(idOrName)
	if err != nil {
		return Usage{}, err
	}
	return lb.agent.Usage(ctx)
}

// Get returns a box by id or name.
func (e *Engine) Get(ctx context.Context, idOrName string) (*Box, error) {
	rec, err := e.store.GetBox(idOrName)
	if err != nil {
		return nil, err
	}
	return boxOf(rec), nil
}

// List returns the boxes, newest first, filtered by opts.
func (e *Engine) List(ctx context.Context, opts ...ListOptions) ([]*Box, error) {
	recs, err := e.store.ListBoxes()
	if err != nil {
		return nil, err
	}
	out := make([]*Box, 0, len(recs))
	for _, r := range recs {
		keep := true
		for _, o := range opts {
			keep = keep && (o.Status == "" || o.Status == "all" || o.Status == r.Status)
		}
		if keep {
			out = append(out, boxOf(r))
		}
	}
	return out, nil
}

// running returns a running box's record and live handle.
func (e *Engine) running(idOrName string) (state.Box, *liveBox, error) {
	rec, err := e.store.GetBox(idOrName)
	if err != nil {
		return rec, nil, err
	}
	e.mu.Lock()
	lb := e.live[rec.ID]
	e.mu.Unlock()
	if lb == nil || rec.Status != state.Running {
		return rec, nil, errdefs.New(errdefs.BoxNotRunning, "Box '%s' is not running (status: %s)", idOrName, rec.Status)
	}
	return rec, lb, nil
}

// command builds the guest command for spec: argv, env layered image < box
// < exec, workdir exec > box > image > /, and the image's user.
func (e *Engine) command(rec state.Box, lb *liveBox, spec ExecSpec) agentexec.Command {
	cfg := lb.img.Config
	args := spec.Cmd
	if spec.Entrypoint && len(cfg.Entrypoint) > 0 {
		args = append(append([]string{}, cfg.Entrypoint...), spec.Cmd...)
	}
	env := mergeEnv(cfg.Env, rec.Env, spec.Env)
	dir := spec.Workdir
	if dir == "" {
		dir = rec.Workdir
	}
	if dir == "" {
		dir = cfg.WorkingDir
	}
	if dir == "" {
		dir = "/"
	}
	user := spec.User
	if user == "" {
		user = cfg.User
	}
	return agentexec.Command{Args: args, Env: env, Dir: dir, User: user, Timeout: spec.Timeout, Stdin: spec.Stdin, Root: spec.Root}
}

// mergeEnv layers KEY=VALUE lists and maps; later layers win, order of
// first appearance is kept.
func mergeEnv(base []string, layers ...map[string]string) []string {
	idx := map[string]int{}
	var out []string
	set := func(k, v string) {
		if i, ok := idx[k]; ok {
			out[i] = k + "=" + v
			return
		}
		idx[k] = len(out)
		out = append(out, k+"="+v)
	}
	for _, kv := range base {
		k, v, _ := strings.Cut(kv, "=")
		set(k, v)
	}
	for _, m := range layers {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			set(k, m[k])
		}
	}
	return out
}

// Remove deletes a box: its VM, its disk and its record. A running box is
// only removed with Force.
func (e *Engine) Remove(ctx context.Context, idOrName string, opts ...RemoveOption) error {
	force := false
	for _, o := range opts {
		force = force || o == Force
	}
	rec, release, err := e.claimBox(idOrName, false)
	if err != nil {
		return err
	}
	defer release()
	e.mu.Lock()
	lb := e.live[rec.ID]
	if lb != nil && !force {
		e.mu.Unlock()
		return errdefs.New(errdefs.BoxAlreadyRunning, "Box is running. Use force=true to remove.")
	}
	delete(e.live, rec.ID)
	e.mu.Unlock()
	if lb != nil {
		e.release(rec.CPU, rec.MemoryMB)
	}
	if err := e.destroy(lb, e.boxDir(rec.ID)); err != nil {
		return err
	}
	e.dropPrivateBase(&rec)
	e.log.Info("box removed", "box", rec.ID)
	return e.store.DeleteBox(rec.ID)
}

// destroy kills a box's VM (if lb is non-nil) and deletes its directory.
func (e *Engine) destroy(lb *liveBox, dir string) error {
	if err := e.destroyVM(lb); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "remove box files")
	}
	return nil
}

// destroyVM kills a box's VM, if lb is non-nil.
func (e *Engine) destroyVM(lb *liveBox) error {
	if lb == nil {
		return nil
	}
	lb.close()
	if err := lb.vm.Kill(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "kill vm")
	}
	return nil
}

// Close stops every running box gracefully (their disks are kept: a later
// Engine on the same DataDir can Start them) and releases the engine.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	e.mu.Unlock()
	e.warm.close() // background template builds first: pool refills may wait on one
	e.pool.close(e)
	e.mu.Lock()
	// Wait for creates and starts in flight: their boxes must be stopped too.
	for len(e.busy) > 0 {
		e.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
		e.mu.Lock()
	}
	ids := make([]string, 0, len(e.live))
	for id := range e.live {
		ids = append(ids, id)
	}
	e.mu.Unlock()
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := e.Stop(context.Background(), id); err != nil {
				e.log.Error("stop box on close", "box", id, "err", err)
			}
		}()
	}
	wg.Wait()
	// The boxes are down, so every exec is ending: let their pumps record
	// the end before the store closes (bounded: an owner that stopped
	// reading a Stream without canceling it would hold its pump).
	pumped := make(chan struct{})
	go func() { e.pumps.Wait(); close(pumped) }()
	select {
	case <-pumped:
	case <-time.After(5 * time.Second):
		e.log.Warn("exec streams still undrained at close")
	}
	return errors.Join(e.images.Close(), e.store.Close())
}

func (s *BoxSpec) normalize() error {
	if r := s.Rootfs; r != nil {
		if s.Image != "" {
			return errdefs.New(errdefs.ValidationError, "image and rootfs: give one")
		}
		if !filepath.IsAbs(r.Dir) {
			return errdefs.New(errdefs.ValidationError, "rootfs dir %q must be an absolute path", r.Dir)
		}
		if st, err := os.Stat(r.Dir); err != nil || !st.IsDir() {
			return errdefs.New(errdefs.ValidationError, "rootfs dir %s is not a directory", r.Dir)
		}
		if !validKey(r.Key) {
			return errdefs.New(errdefs.ValidationError, "rootfs key %q: letters, digits and ._- only, at most 128", r.Key)
		}
		s.Image = "rootfs:" + r.Dir
	}
	if strings.TrimSpace(s.Image) == "" {
		return errdefs.New(errdefs.ValidationError, "image is required")
	}
	for _, f := range []struct {
		v    *int
		def  int
		name string
	}{{&s.CPU, 2, "cpu"}, {&s.MemoryMB, 1024, "memory_mb"}, {&s.DiskSizeGB, 8, "disk_size_gb"}} {
		if *f.v < 0 {
			return errdefs.New(errdefs.ValidationError, "%s must be greater than 0", f.name)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if s.Workdir != "" && !strings.HasPrefix(s.Workdir, "/") {
		return errdefs.New(errdefs.ValidationError, "workdir must be an absolute path (starting with /)")
	}
	if !s.Network && (len(s.Ports) > 0 || len(s.NetworkPolicy.Allow) > 0 || len(s.NetworkPolicy.Deny) > 0 || len(s.NetworkPolicy.AllowHostPorts) > 0) {
		return errdefs.New(errdefs.ValidationError, "ports and a network policy need network: true")
	}
	if _, err := network.NewFilter(s.NetworkPolicy); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, p := range s.Ports {
		if p.HostPort < 1 || p.HostPort > 65535 || p.GuestPort < 1 || p.GuestPort > 65535 {
			return errdefs.New(errdefs.ValidationError, "port %d:%d: ports are 1-65535", p.HostPort, p.GuestPort)
		}
		if p.Protocol != "" && p.Protocol != "tcp" {
			return errdefs.New(errdefs.ValidationError, "port %d: protocol %q (only tcp)", p.HostPort, p.Protocol)
		}
		if p.HostIP != "" && net.ParseIP(p.HostIP) == nil {
			return errdefs.New(errdefs.ValidationError, "port %d: host_ip %q is not an address", p.HostPort, p.HostIP)
		}
		// One host port, one box port: whatever the addresses (0.0.0.0
		// overlaps every other one).
		k := strconv.Itoa(p.HostPort)
		if seen[k] {
			return errdefs.New(errdefs.ValidationError, "host port %d published twice", p.HostPort)
		}
		seen[k] = true
	}
	for _, v := range s.Volumes {
		if !filepath.IsAbs(v.HostPath) || !strings.HasPrefix(v.GuestPath, "/") {
			return errdefs.New(errdefs.ValidationError, "volume paths must be absolute: %q:%q", v.HostPath, v.GuestPath)
		}
		if st, err := os.Stat(v.HostPath); err != nil || !st.IsDir() {
			return errdefs.New(errdefs.RuntimeError, "Volume host path does not exist (or is not a directory): %s", v.HostPath)
		}
	}
	return nil
}

func (s *ExecSpec) validate() error {
	if len(s.Cmd) == 0 || s.Cmd[0] == "" {
		return errdefs.New(errdefs.ValidationError, "cmd must be a non-empty list")
	}
	if s.Workdir != "" && !strings.HasPrefix(s.Workdir, "/") {
		return errdefs.New(errdefs.ValidationError, "workdir must be an absolute path (starting with /)")
	}
	if s.Timeout < 0 {
		return errdefs.New(errdefs.ValidationError, "timeout must be positive")
	}
	if s.Root != "" && !strings.HasPrefix(s.Root, "/") {
		return errdefs.New(errdefs.ValidationError, "root must be an absolute path (starting with /)")
	}
	return nil
}

func boxOf(r state.Box) *Box {
	return &Box{
		ID: r.ID, Name: r.Name, Status: r.Status, Image: r.Image, CPU: r.CPU, MemoryMB: r.MemoryMB,
		DiskSizeGB: r.DiskSizeGB, Network: r.Network, Workdir: r.Workdir, Env: r.Env, Volumes: volumesOf(r.Volumes),
		NetworkPolicy: r.NetworkPolicy, Ports: r.Ports,
		RuntimeID: r.RuntimeID, ErrorCode: r.ErrorCode, ErrorMessage: r.ErrorMessage, CreatedAt: r.CreatedAt, StartedAt: r.StartedAt, StoppedAt: r.StoppedAt,
	}
}

// newID returns prefix + 12 random characters of the nanoid alphabet.
func newID(prefix string) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
	b := make([]byte, 12)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[b[i]&63]
	}
	return prefix + string(b)
}

func volumesOf(vs []state.Volume) []Volume {
	var out []Volume
	for _, v := range vs {
		out = append(out, Volume{HostPath: v.HostPath, GuestPath: v.GuestPath, ReadOnly: v.ReadOnly})
	}
	return out
}
