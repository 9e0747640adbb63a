package boxrun

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxrun/boxrun/disk"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/runtime"
)

// The warm start. The first box of a shape (driver and its version,
// acceleration, kernel, initramfs with its agent, CPUs, memory, device
// layout) boots a template VM with stand-in disks and shares, up to where
// its agent waits for the host's Hello, having mounted none of them (on
// QEMU its guest has probed the disks: see holdBack in exec/agent); the
// driver saves it (runtime.Snapshotter). That box and every later box of
// the shape are restored from the template and get their own disks,
// shares, NIC backend, clock, entropy, hostname and MAC: the agent does
// the rest of its boot when the Hello comes. Anything wrong with a
// template (it cannot be built, loaded, or its guest does not answer)
// costs a cold boot, logged, never the box.

// Toggle is a feature switch whose zero value is the feature's default.
type Toggle int

const (
	Default Toggle = iota
	Enabled
	Disabled
)

// BootStats counts how boxes started since the engine was opened.
type BootStats struct {
	Cold      int64 // booted from scratch
	Warm      int64 // restored from a template
	Pooled    int64 // taken ready from the pool (Config.Pool)
	Templates int64 // templates made
	Fallbacks int64 // warm starts that failed (the box then restored from its shape's template, or booted cold)

	Premounted     int64 // of Warm: restored from an image's template, the box root already mounted
	ImageTemplates int64 // image templates made (not counted in Templates)
}

// warmHelloTimeout bounds the Hello of a restored VM, which answers in
// well under a second: a template whose guest does not is broken, and the
// box boots cold instead of waiting out BootTimeout.
const warmHelloTimeout = 30 * time.Second

// defaultTemplateCacheMB bounds the templates' disk use.
const defaultTemplateCacheMB = 2048

type warmStart struct {
	dir      string // DataDir/cache/templates
	maxBytes int64
	snap     runtime.Snapshotter // nil: warm start off

	mu           sync.Mutex
	locks        map[string]*sync.Mutex // per template key: one build at a time
	failures     map[string]time.Time   // when a template of the key last failed
	restoreFails map[string]int         // restores of the key that failed in a row

	// Image templates (QEMU): per image and shape, the box root mounted
	// (startFromImage). Built in the background once an image and shape
	// is created a second time without one.
	images   bool
	ctx      context.Context // ends with the engine: background builds
	cancel   context.CancelFunc
	bg       sync.WaitGroup
	wants    map[string]int  // creates of an image template's key that found none
	inflight map[string]bool // image templates being built in the background
	bgSlot   chan struct{}   // one background build at a time

	cold, warm, pooled, templates, fallbacks atomic.Int64
	premounted, imageTemplates               atomic.Int64
}

func (w *warmStart) stats() BootStats {
	return BootStats{Cold: w.cold.Load(), Warm: w.warm.Load(), Pooled: w.pooled.Load(),
		Templates: w.templates.Load(), Fallbacks: w.fallbacks.Load(),
		Premounted: w.premounted.Load(), ImageTemplates: w.imageTemplates.Load()}
}

// warmEnabled reads Config.WarmStart and $BOXRUN_WARM_START.
func warmEnabled(t Toggle) bool { return toggleOn(t, "BOXRUN_WARM_START") }

// toggleOn reads a Toggle that defaults to on, and the environment
// variable that turns it off when the Toggle is Default.
func toggleOn(t Toggle, env string) bool {
	switch t {
	case Enabled:
		return true
	case Disabled:
		return false
	}
	switch os.Getenv(env) {
	case "0", "false", "off", "no":
		return false
	}
	return true
}

// templateMeta is a template's meta.json.
type templateMeta struct {
	Key     string    `json:"key"`
	Family  string    `json:"family"` // the shape without versions: a newer template of it replaces this one
	Boot    string    `json:"boot"`   // the kernel's and initramfs's ids (fileID): Prune drops templates of others
	Created time.Time `json:"created"`
	BootMS  int64     `json:"boot_ms"` // cold boot of the template to its agent's first answer
	SaveMS  int64     `json:"save_ms"`
	Base    string    `json:"base,omitempty"`    // an image template's base disk: Prune drops it with the base
	BaseID  string    `json:"base_id,omitempty"` // and the base's fileID when it was made: or with a new base
}

// startVM starts the VM of a box: restored from its image's template or
// else its shape's when the warm start is on and works, else booted cold.
// tpl is the template used (key "" for a cold boot). fresh is the box
// disk of a new box, made here: cloned from the image's template, or
// made empty for the others.
func (e *Engine) startVM(ctx context.Context, cfg runtime.VMConfig, boot *bootAssets, fresh *freshDisk) (vm runtime.VM, tpl template, err error) {
	if fresh != nil {
		if vm, tpl, ok := e.startFromImage(ctx, cfg, boot, fresh); ok {
			return vm, tpl, nil
		}
		if err := fresh.make(ctx); err != nil {
			return nil, template{}, err
		}
	}
	if w := e.warm; w.snap != nil {
		key, family, kerr := w.key(cfg, boot)
		if kerr == nil && w.backingOff(key) {
			kerr = fmt.Errorf("template %s failed less than %v ago", key, failBackoff)
		}
		if kerr == nil {
			var dir string
			var ino uint64
			var unlock func()
			// ensure returns with no lock held: the template can be
			// evicted (by a build of another shape, here or in another
			// engine on the cache) before the shared lock below is taken.
			// Once that lock is held, it cannot be; a template that went
			// in between is made again, once.
			for try := 0; ; try++ {
				if dir, err = w.ensure(ctx, e, key, family, cfg, boot, 0); err != nil {
					break
				}
				// Shared: no engine evicts it while QEMU opens its files.
				var ok bool
				if unlock, ok = w.flockMode(key, syscall.LOCK_SH); !ok {
					unlock = func() {}
				}
				if ino = w.stateIno(dir); (ino != 0 && w.complete(dir)) || try == 1 {
					break
				}
				unlock()
			}
			if err == nil {
				vm, err = w.snap.Restore(ctx, cfg, dir)
				unlock()
				if err == nil {
					now := time.Now()
					os.Chtimes(filepath.Join(dir, "meta.json"), now, now) // LRU
					return vm, template{key: key, ino: ino}, nil
				}
				if ctx.Err() != nil {
					return nil, template{}, ctx.Err()
				}
				e.log.Warn("restoring from the template failed; booting cold", "box", cfg.ID, "template", key, "err", err)
				w.restoreFailed(key, ino)
			} else if ctx.Err() == nil {
				e.log.Warn("no template; booting cold", "box", cfg.ID, "err", err)
				w.failed(key)
			}
			if ctx.Err() != nil {
				return nil, template{}, ctx.Err()
			}
			w.fallbacks.Add(1)
		} else {
			e.log.Debug("booting cold", "box", cfg.ID, "why", kerr)
		}
	}
	vm, err = e.hv.Start(ctx, cfg)
	return vm, template{}, err
}

// template names the template a VM was restored from.
type template struct {
	key   string
	ino   uint64 // its state file's inode: which build of key
	image bool   // an image's template: the box disk is a clone of its own
}

// freshDisk is the box disk of a new box, made at its boot: a clone of
// its image template's data disk when the box is restored from one (the
// guest has it mounted already), else an empty file system.
type freshDisk struct {
	path   string
	sizeGB int
	made   bool // path holds an empty file system (not a clone)
}

// make gives the box an empty file system of its own (removing a clone).
func (f *freshDisk) make(ctx context.Context) error {
	if f.made {
		return nil
	}
	os.Remove(f.path)
	if err := disk.CreateBoxDisk(ctx, f.path, f.sizeGB); err != nil {
		return err
	}
	f.made = true
	return nil
}

// imageDataDisk is an image template's data disk, which each box restored
// from it gets a clone of.
const imageDataDisk = "data.ext4"

// imageTemplates says whether the driver restores image templates: QEMU,
// which opens the box's disks by path at the restore. (Cloud Hypervisor
// keeps the disks in its snapshot's config; an image template there is
// untried: no CH on the machines this was made on.)
func imageTemplates(snap runtime.Snapshotter) bool {
	_, ok := snap.(*runtime.QEMU)
	return ok
}

// imageConfig is cfg as an image template's VM: its agent mounts the box
// root at boot (boxrun.premount; the disks are bound at boot on QEMU).
func imageConfig(cfg runtime.VMConfig) runtime.VMConfig {
	cfg.Cmdline = strings.TrimSpace(cfg.Cmdline + " boxrun.premount=1")
	return cfg
}

// imageKey is the key of cfg's image template (cfg from imageConfig): the
// shape's inputs, the base disk's identity and the data disk's size. Its
// family is the shape's with the base's path and the size: each image
// and size has a template of its own, which does not replace another's.
func (w *warmStart) imageKey(cfg runtime.VMConfig, boot *bootAssets, sizeGB int) (key, family string, err error) {
	key, family, err = w.key(cfg, boot)
	if err != nil {
		return "", "", err
	}
	base, err := fileID(cfg.Disks[0].Path)
	if err != nil {
		return "", "", err
	}
	h := sha256.Sum256([]byte(fmt.Sprintf("%s\x00image\x00%s\x00%d", key, base, sizeGB)))
	return hex.EncodeToString(h[:12]), fmt.Sprintf("%s image %s %d", family, cfg.Disks[0].Path, sizeGB), nil
}

// startFromImage restores a new box from its image's template, with a
// clone of the template's data disk as its box disk: the guest's mounts
// and caches are those of the template, which were made on these very
// bytes. ok is false when there is no such template (the second create
// that finds none starts building one, in the background), or it failed
// (logged; the box disk is then gone and the caller makes it).
func (e *Engine) startFromImage(ctx context.Context, cfg runtime.VMConfig, boot *bootAssets, fresh *freshDisk) (vm runtime.VM, tpl template, ok bool) {
	w := e.warm
	if w.snap == nil || !w.images || len(cfg.Disks) != 2 || !cfg.Disks[0].ReadOnly || cfg.Disks[1].ReadOnly {
		return nil, template{}, false
	}
	icfg := imageConfig(cfg)
	key, family, err := w.imageKey(icfg, boot, fresh.sizeGB)
	if err != nil || w.backingOff(key) {
		return nil, template{}, false
	}
	dir := filepath.Join(w.dir, key)
	// Shared: no engine evicts it while its disk is cloned and QEMU opens
	// its files. Not waited for: one being built (or evicted) is not
	// there yet, and the box does without.
	unlock, locked := w.flockMode(key, syscall.LOCK_SH|syscall.LOCK_NB)
	if !locked {
		return nil, template{}, false
	}
	ino := w.stateIno(dir)
	if ino == 0 || !w.complete(dir) {
		unlock()
		if ctx.Value(poolBoot{}) == nil { // a pool's refills are not the caller's creates
			w.wantImage(e, key, family, icfg, boot, fresh.sizeGB)
		}
		return nil, template{}, false
	}
	if _, err := os.Stat(filepath.Join(dir, imageDataDisk)); err != nil {
		unlock()
		e.log.Warn("the image template has no disk", "template", key, "err", err)
		w.restoreFailed(key, ino)
		return nil, template{}, false
	}
	if err := disk.CloneDisk(filepath.Join(dir, imageDataDisk), fresh.path); err != nil {
		// Not held against the template: most likely the box dir's file
		// system (full), where the caller's own disk fails too, and says so.
		unlock()
		e.log.Warn("cloning the image template's disk failed", "box", cfg.ID, "template", key, "err", err)
		return nil, template{}, false
	}
	vm, err = w.snap.Restore(ctx, icfg, dir)
	unlock()
	if err != nil {
		os.Remove(fresh.path)
		if ctx.Err() == nil {
			e.log.Warn("restoring from the image template failed", "box", cfg.ID, "template", key, "err", err)
			w.restoreFailed(key, ino)
		}
		return nil, template{}, false
	}
	now := time.Now()
	os.Chtimes(filepath.Join(dir, "meta.json"), now, now) // LRU
	return vm, template{key: key, ino: ino, image: true}, true
}

// wantImage notes a create that found no image template of key; the
// second one starts building it in the background (one build per key at
// a time; none once the engine closes). A box of an image created once
// pays for no template: only repeated creates do.
func (w *warmStart) wantImage(e *Engine, key, family string, cfg runtime.VMConfig, boot *bootAssets, sizeGB int) {
	w.mu.Lock()
	if w.ctx == nil || w.ctx.Err() != nil || w.inflight[key] {
		w.mu.Unlock()
		return
	}
	w.wants[key]++
	if w.wants[key] < 2 {
		w.mu.Unlock()
		return
	}
	delete(w.wants, key)
	w.inflight[key] = true
	w.bg.Add(1)
	w.mu.Unlock()
	go func() {
		defer w.bg.Done()
		defer func() {
			w.mu.Lock()
			delete(w.inflight, key)
			w.mu.Unlock()
		}()
		// One at a time: a template's boot is a VM's, outside the caps.
		select {
		case w.bgSlot <- struct{}{}:
			defer func() { <-w.bgSlot }()
		case <-w.ctx.Done():
			return
		}
		had := w.complete(filepath.Join(w.dir, key))
		if _, err := w.ensure(w.ctx, e, key, family, cfg, boot, sizeGB); err != nil {
			if w.ctx.Err() == nil {
				e.log.Warn("making an image template failed", "template", key, "err", err)
				w.failed(key)
			}
		} else if !had {
			w.imageTemplates.Add(1) // counted once its lock is free: usable
		}
	}()
}

// poolBoot marks the context of a pool's boot (pool.make): its box is
// not a create of the caller's, and does not count towards an image
// template.
type poolBoot struct{}

// close stops background template builds and waits for them.
func (w *warmStart) close() {
	w.mu.Lock()
	if w.cancel != nil {
		w.cancel()
	}
	w.mu.Unlock()
	w.bg.Wait()
}

// key returns the template key of cfg (everything the template depends
// on) and its family (the shape alone: the driver's, without versions or
// boot files).
func (w *warmStart) key(cfg runtime.VMConfig, boot *bootAssets) (key, family string, err error) {
	dk, family, err := w.snap.TemplateKey(cfg)
	if err != nil {
		return "", "", err
	}
	kid, err := fileID(boot.kernel.Vmlinux)
	if err != nil {
		return "", "", err
	}
	iid, err := fileID(boot.initramfs)
	if err != nil {
		return "", "", err
	}
	h := sha256.Sum256([]byte(dk + "\x00" + bootID(kid, iid)))
	return hex.EncodeToString(h[:12]), family, nil
}

func bootID(kernelID, initramfsID string) string { return kernelID + "\x00" + initramfsID }

// fileID identifies a boot file's content: cached boot files are named by
// their content hash already; any other is named by path, size and time.
func fileID(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s %d %d", path, st.Size(), st.ModTime().UnixNano()), nil
}

func (w *warmStart) lock(key string) *sync.Mutex {
	w.mu.Lock()
	defer w.mu.Unlock()
	l := w.locks[key]
	if l == nil {
		l = new(sync.Mutex)
		w.locks[key] = l
	}
	return l
}

// ensure returns the dir of the template key, building it first if there
// is none. Concurrent creates of one shape build it once: the others wait.
//
// dataGB > 0 makes an image template (startFromImage) with a data disk of
// that size.
func (w *warmStart) ensure(ctx context.Context, e *Engine, key, family string, cfg runtime.VMConfig, boot *bootAssets, dataGB int) (string, error) {
	dir := filepath.Join(w.dir, key)
	l := w.lock(key)
	l.Lock()
	defer l.Unlock()
	if w.complete(dir) {
		return dir, nil
	}
	// Engines on one shared cache (Config.SharedDir) build it once too.
	unlock, ok := w.flock(key, true)
	if !ok {
		return "", fmt.Errorf("template %s: cannot lock", key)
	}
	defer unlock()
	if w.complete(dir) {
		return dir, nil
	}
	if w.backingOff(key) { // the build that held the lock just failed
		return "", fmt.Errorf("making template %s failed less than %v ago", key, failBackoff)
	}
	os.RemoveAll(dir) // a build that was interrupted
	if err := w.build(ctx, e, key, family, cfg, boot, dataGB); err != nil {
		return "", err
	}
	w.evict(key)
	return dir, nil
}

func (w *warmStart) complete(dir string) bool {
	for _, f := range append(w.snap.TemplateFiles(), "meta.json") {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return false
		}
	}
	return true
}

// build boots a template VM of cfg's shape in a fresh dir, waits until its
// agent answers, saves it and moves the dir into place.
//
// An image template (dataGB > 0) has the box's base disk itself and a new
// data disk of dataGB, which its agent mounts at boot (imageConfig) and
// which stays in the template, for the boxes restored from it to clone.
func (w *warmStart) build(ctx context.Context, e *Engine, key, family string, cfg runtime.VMConfig, boot *bootAssets, dataGB int) error {
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		return err
	}
	tmp, unlockBuild, err := w.newBuildDir()
	if err != nil {
		return err
	}
	defer unlockBuild()
	defer os.RemoveAll(tmp)
	// Stand-ins with the box's device layout and its disks' sizes
	// (sparse). The guest mounts none of them; it binds the NIC and the
	// shares at the Hello, and the disks too on Cloud Hypervisor, which
	// keeps a disk's capacity in the snapshot: its key counts every
	// disk's size. On QEMU the guest probes them at boot: its key counts
	// the read-only disks' sizes, and Restore signals each writable
	// disk's own capacity.
	t := cfg
	t.ID, t.Dir, t.MAC = "tpl-"+key[:12], tmp, "52:54:00:00:00:01"
	t.Disks = append([]runtime.Disk(nil), cfg.Disks...)
	for i := range t.Disks {
		if dataGB > 0 {
			if !t.Disks[i].ReadOnly {
				p := filepath.Join(tmp, imageDataDisk)
				if err := disk.CreateBoxDisk(ctx, p, dataGB); err != nil {
					return err
				}
				t.Disks[i].Path = p
			}
			continue // the base disk itself
		}
		p := filepath.Join(tmp, fmt.Sprintf("disk%d", i))
		size := int64(1 << 20)
		if st, err := os.Stat(cfg.Disks[i].Path); err == nil {
			size = st.Size()
		}
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			return err
		}
		if err := os.Truncate(p, size); err != nil {
			return err
		}
		t.Disks[i].Path = p
	}
	t.Volumes = append([]runtime.Volume(nil), cfg.Volumes...)
	for i := range t.Volumes {
		p := filepath.Join(tmp, fmt.Sprintf("vol%d", i))
		if err := os.Mkdir(p, 0o700); err != nil {
			return err
		}
		t.Volumes[i].HostPath = p
	}
	start := time.Now()
	vm, err := w.snap.StartTemplate(ctx, t)
	if err != nil {
		return err
	}
	defer vm.Kill()
	bctx, cancel := context.WithTimeout(ctx, e.cfg.BootTimeout)
	defer cancel()
	conn, err := vm.DialAgent(bctx)
	if err != nil {
		return err
	}
	agent := agentexec.NewClient(conn, e.log.With("template", key))
	err = agent.Probe(bctx)
	agent.Close()
	if err != nil {
		return fmt.Errorf("template VM did not come up: %w; console:\n%s", err, vm.Console())
	}
	booted := time.Since(start)
	if err := w.snap.SaveTemplate(ctx, vm); err != nil {
		return fmt.Errorf("saving the template: %w", err)
	}
	kid, _ := fileID(boot.kernel.Vmlinux)
	iid, _ := fileID(boot.initramfs)
	meta := templateMeta{Key: key, Family: family, Boot: bootID(kid, iid), Created: time.Now().UTC(),
		BootMS: booted.Milliseconds(), SaveMS: (time.Since(start) - booted).Milliseconds()}
	if dataGB > 0 {
		meta.Base = cfg.Disks[0].Path
		meta.BaseID, _ = fileID(meta.Base)
	}
	b, _ := json.Marshal(meta)
	if err := os.WriteFile(filepath.Join(tmp, "meta.json"), b, 0o600); err != nil {
		return err
	}
	// Only the template's files stay: the stand-ins, logs and sockets go.
	keep := map[string]bool{"meta.json": true, imageDataDisk: dataGB > 0}
	for _, f := range w.snap.TemplateFiles() {
		keep[f] = true
	}
	ents, _ := os.ReadDir(tmp)
	for _, en := range ents {
		if !keep[en.Name()] {
			os.RemoveAll(filepath.Join(tmp, en.Name()))
		}
	}
	if err := os.Rename(tmp, filepath.Join(w.dir, key)); err != nil {
		return err
	}
	os.Remove(filepath.Join(w.dir, ".failed-"+key))
	if dataGB == 0 {
		w.templates.Add(1) // an image template is counted once usable (wantImage)
	}
	e.log.Info("warm-start template made", "template", key, "image", meta.Base, "boot", booted.Round(time.Millisecond),
		"save", time.Duration(meta.SaveMS)*time.Millisecond)
	return nil
}

// invalidate removes the template that failed: the one whose state file
// is the inode ino (0: whichever is there), not one rebuilt since.
// It reports whether it removed one: false when that build is gone
// already (another box that failed on it removed it).
func (w *warmStart) invalidate(key string, ino uint64) bool {
	l := w.lock(key)
	l.Lock()
	defer l.Unlock()
	unlock, ok := w.flock(key, true)
	if !ok {
		return false
	}
	defer unlock()
	dir := filepath.Join(w.dir, key)
	cur := w.stateIno(dir)
	if cur == 0 || ino != 0 && cur != ino {
		return false
	}
	return os.RemoveAll(dir) == nil
}

// restoreFailed removes a template that failed to restore, or whose
// guest did not come up (the one whose state file is the inode ino), so
// that the next box makes it again: it may have been corrupt. A second
// failure in a row backs the shape off (failed): a VMM that cannot restore
// at all must not cost every box a template build and a cold boot.
//
// Failures are counted per build: boxes restoring from one corrupt
// template at once all fail, and count once (the first removes it); the
// next box makes it again.
func (w *warmStart) restoreFailed(key string, ino uint64) {
	if !w.invalidate(key, ino) {
		return
	}
	w.mu.Lock()
	if w.restoreFails == nil {
		w.restoreFails = map[string]int{}
	}
	w.restoreFails[key]++
	n := w.restoreFails[key]
	w.mu.Unlock()
	if n >= 2 {
		w.failed(key)
	}
}

// restoreWorked notes a box restored from key that came up.
func (w *warmStart) restoreWorked(key string) {
	w.mu.Lock()
	delete(w.restoreFails, key)
	w.mu.Unlock()
}

// stateIno is the inode of a template's last-written file (0 if none).
func (w *warmStart) stateIno(dir string) uint64 {
	files := w.snap.TemplateFiles()
	st, err := os.Stat(filepath.Join(dir, files[len(files)-1]))
	if err != nil {
		return 0
	}
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Ino
	}
	return 0
}

// failed notes that a template of key could not be made: for
// failBackoff, boxes of its shape boot cold without trying again, instead
// of each paying a template boot first. (A template that was made but
// fails to load or come up is removed and made again by the next box.)
// The failure is noted in the cache dir too: engines sharing it
// (Config.SharedDir: a shim process per container) back off together.
func (w *warmStart) failed(key string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.failures == nil {
		w.failures = map[string]time.Time{}
	}
	w.failures[key] = time.Now()
	os.WriteFile(filepath.Join(w.dir, ".failed-"+key), nil, 0o600)
}

func (w *warmStart) backingOff(key string) bool {
	w.mu.Lock()
	t, ok := w.failures[key]
	w.mu.Unlock()
	if ok && time.Since(t) < failBackoff {
		return true
	}
	st, err := os.Stat(filepath.Join(w.dir, ".failed-"+key))
	return err == nil && time.Since(st.ModTime()) < failBackoff
}

// failBackoff is how long a shape whose template failed boots cold.
const failBackoff = 10 * time.Minute

// evict removes the templates that the one just made replaces (same
// family, other inputs: a new kernel, agent or QEMU), then the least
// recently used ones until the rest fit in maxBytes. Boxes running from
// a removed template are unaffected: their VMM keeps its mapping.
func (w *warmStart) evict(current string) {
	ents, err := os.ReadDir(w.dir)
	if err != nil {
		return
	}
	type tpl struct {
		key   string
		meta  templateMeta
		used  time.Time
		bytes int64
	}
	var cur templateMeta
	if b, err := os.ReadFile(filepath.Join(w.dir, current, "meta.json")); err == nil {
		json.Unmarshal(b, &cur)
	}
	var all []tpl
	var total int64
	for _, en := range ents {
		if !en.IsDir() || en.Name() == current || en.Name()[0] == '.' {
			continue
		}
		dir := filepath.Join(w.dir, en.Name())
		var t tpl
		t.key = en.Name()
		if b, err := os.ReadFile(filepath.Join(dir, "meta.json")); err == nil && json.Unmarshal(b, &t.meta) == nil {
			if st, err := os.Stat(filepath.Join(dir, "meta.json")); err == nil {
				t.used = st.ModTime()
			}
		}
		if t.meta.Family == cur.Family && cur.Family != "" {
			w.remove(t.key)
			continue
		}
		t.bytes = diskUse(dir)
		total += t.bytes
		all = append(all, t)
	}
	total += diskUse(filepath.Join(w.dir, current))
	// Image templates go first: a shape's serves every image (and every
	// Start), an image's only the boxes of that image.
	sort.Slice(all, func(i, j int) bool {
		if ii, ij := all[i].meta.Base != "", all[j].meta.Base != ""; ii != ij {
			return ii
		}
		return all[i].used.Before(all[j].used)
	})
	for _, t := range all {
		if total <= w.maxBytes {
			break
		}
		w.remove(t.key)
		total -= t.bytes
	}
}

func (w *warmStart) remove(key string) {
	l := w.lock(key)
	if l.TryLock() { // being built or used: leave it to a later eviction
		if unlock, ok := w.flock(key, false); ok {
			os.RemoveAll(filepath.Join(w.dir, key))
			unlock()
		}
		l.Unlock()
	}
}

// buildLock is the file a template build holds locked in its dir.
const buildLock = "build.lock"

// newBuildDir makes a template build's dir, .build-*, and locks it for
// the build (unlock ends it): an engine that finds a build dir whose lock
// nobody holds (building) removes it, and kills the VM in it. The dir is
// made and locked under another name (.new-*) and renamed: a .build-* dir
// is locked from the moment it exists, so the lock alone tells a build in
// progress from a dead engine's, at any age.
func (w *warmStart) newBuildDir() (dir string, unlock func(), err error) {
	tmp, err := os.MkdirTemp(w.dir, ".new-")
	if err != nil {
		return "", nil, err
	}
	bl, err := os.OpenFile(filepath.Join(tmp, buildLock), os.O_CREATE|os.O_RDWR, 0o600)
	if err == nil {
		if err = syscall.Flock(int(bl.Fd()), syscall.LOCK_EX); err != nil {
			bl.Close()
		}
	}
	if err != nil {
		os.RemoveAll(tmp)
		return "", nil, err
	}
	dir = filepath.Join(w.dir, ".build-"+strings.TrimPrefix(filepath.Base(tmp), ".new-"))
	if err := os.Rename(tmp, dir); err != nil {
		bl.Close()
		os.RemoveAll(tmp)
		return "", nil, err
	}
	return dir, func() { bl.Close() }, nil
}

// building says whether a template build dir is an engine's build in
// progress (its lock is held) rather than the leftover of a dead one.
// The lock alone decides (newBuildDir): a dir whose lock nobody holds is
// a dead build however young, so an engine killed during a template's
// boot and restarted at once leaves no template VM running.
func building(dir string) bool {
	f, err := os.Open(filepath.Join(dir, buildLock))
	if err != nil {
		return false // a leftover of a build before the lock existed
	}
	defer f.Close()
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return true
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

// flock takes the cross-process lock of template key (a file next to
// the templates), waiting for it when block, else failing at once when
// another process holds it.
func (w *warmStart) flock(key string, block bool) (unlock func(), ok bool) {
	how := syscall.LOCK_EX
	if !block {
		how |= syscall.LOCK_NB
	}
	return w.flockMode(key, how)
}

// flockMode takes the lock of template key as flock(2)'s how says.
func (w *warmStart) flockMode(key string, how int) (unlock func(), ok bool) {
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		return nil, false
	}
	f, err := os.OpenFile(filepath.Join(w.dir, ".lock-"+key), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, false
	}
	if syscall.Flock(int(f.Fd()), how) != nil {
		f.Close()
		return nil, false
	}
	return func() { f.Close() }, true
}

// diskUse is the space a dir's files take on disk (the RAM file is sparse).
func diskUse(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if info, err := d.Info(); err == nil {
				if st, ok := info.Sys().(*syscall.Stat_t); ok {
					n += st.Blocks * 512
				}
			}
		}
		return nil
	})
	return n
}

// prune removes the templates made from other boot files than boot (a
// kernel or agent no longer used) and builds interrupted long ago; it
// returns their names and the bytes freed. Templates in use or being
// built stay.
func (w *warmStart) prune(boot *bootAssets) (names []string, freed int64) {
	kid, err1 := fileID(boot.kernel.Vmlinux)
	iid, err2 := fileID(boot.initramfs)
	if err1 != nil || err2 != nil {
		return nil, 0
	}
	ents, _ := os.ReadDir(w.dir)
	for _, en := range ents {
		dir := filepath.Join(w.dir, en.Name())
		if strings.HasPrefix(en.Name(), ".lock-") {
			continue
		}
		if strings.HasPrefix(en.Name(), ".failed-") {
			if info, err := en.Info(); err == nil && time.Since(info.ModTime()) > failBackoff {
				os.Remove(dir)
			}
			continue
		}
		if strings.HasPrefix(en.Name(), ".new-") { // an engine died making a build dir
			if info, err := en.Info(); err == nil && time.Since(info.ModTime()) > staleAfter {
				os.RemoveAll(dir)
			}
			continue
		}
		if strings.HasPrefix(en.Name(), ".build-") {
			if info, err := en.Info(); err == nil && time.Since(info.ModTime()) > staleAfter && !building(dir) {
				freed += diskUse(dir)
				killVMIn(dir) // a dead engine's template VM: its RAM file stays mapped until it goes
				os.RemoveAll(dir)
				names = append(names, "templates/"+en.Name())
			}
			continue
		}
		var meta templateMeta
		b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
		if err == nil && json.Unmarshal(b, &meta) == nil && meta.Boot == bootID(kid, iid) {
			if id, err := fileID(meta.Base); meta.Base == "" || err == nil && id == meta.BaseID {
				continue
			}
		}
		l := w.lock(en.Name())
		if l.TryLock() {
			if unlock, ok := w.flock(en.Name(), false); ok {
				freed += diskUse(dir)
				os.RemoveAll(dir)
				names = append(names, "templates/"+en.Name())
				unlock()
			}
			l.Unlock()
		}
	}
	return names, freed
}

// entropy is fresh host randomness for a box's Hello.
func entropy() []byte {
	b := make([]byte, 64)
	rand.Read(b)
	return b
}
