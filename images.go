package boxrun

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxrun/boxrun/disk"
	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/image"
)

// PullPolicy says when a Create or a Pull fetches its image: PullMissing
// (the default), PullAlways or PullNever. A digest-pinned reference
// (repo@sha256:...) already in the store is never fetched again, whatever
// the policy.
type PullPolicy = image.PullPolicy

// The pull policies.
const (
	// PullMissing fetches an image only when its reference is not in the
	// store: a tag pulled once stays what it was.
	PullMissing = image.PullMissing
	// PullAlways asks the registry for the tag's current manifest digest
	// (one HEAD request) and fetches only when it changed: a tag pushed
	// again with new content is seen. The registry must answer.
	PullAlways = image.PullAlways
	// PullNever never contacts a registry: an image not in the store fails
	// with IMAGE_PULL_FAILED naming the policy.
	PullNever = image.PullNever
)

// Error codes of image management (see errdefs).
const (
	ImageNotFound = errdefs.ImageNotFound
	ImageInUse    = errdefs.ImageInUse
)

// PullOptions modifies PullWith.
type PullOptions struct {
	Policy PullPolicy // "": Config.PullPolicy
}

// ImageInfo describes an image in the engine's store.
type ImageInfo struct {
	ID string // containers/storage image ID
	// Names are its references: registry names
	// ("127.0.0.1:5000/library/busybox:latest", "repo@sha256:...") and
	// local sources ("oci:/path:latest"). None when a newer pull of its
	// tag took the name over (its boxes keep it) or RemoveImage with
	// Force untagged it.
	Names        []string
	Digest       string    // manifest digest
	Size         int64     // uncompressed size of its layers (0 if unknown)
	Created      time.Time // the image's own creation time (zero if unknown)
	Pulled       time.Time // when it entered the store
	InUse        bool      // a box (any status) uses it, or one is being created from it
	Boxes        []string  // ids of the boxes that use it
	BaseDiskSize int64     // host bytes of its base disk; 0 if not built
}

// PruneReport is what Prune removed.
type PruneReport struct {
	Images     []string // ids of the removed images
	BaseDisks  []string // image ids whose base disks were removed
	CacheFiles []string // file names removed from the cache
	BytesFreed int64    // host space freed (allocated bytes)
	// CacheSkipped says why the cache was left alone ("" when it was
	// pruned): the boot assets in use could not be determined.
	CacheSkipped string
}

// DiskUsage is the host space (allocated bytes, unless said otherwise)
// that the engine's data dir takes, by kind.
type DiskUsage struct {
	Images    int64 // containers/storage: layers and image records
	BaseDisks int64 // one ext4 base disk per image that a box booted from
	BoxDisks  int64 // boxes' directories: their disks (what the boxes wrote), consoles, sockets
	// BoxDisksApparent is the boxes' disks at their full sizes (sparse
	// files: DiskSizeGB each): what they may grow to.
	BoxDisksApparent int64
	Cache            int64 // kernel, initramfs and agent files
	State            int64 // box and exec records, exec output
	Total            int64 // the sum of the allocated figures
}

// imageUse guards image removal against boxes being created: Create pins
// the image it pulled until its box's record names the image, and Prune
// and RemoveImage decide and remove under mu.
type imageUse struct {
	mu   sync.Mutex
	pins map[string]int // image id → Creates holding it
}

// pullPolicy is the policy of a call: its own, else Config.PullPolicy,
// else PullMissing.
func (e *Engine) pullPolicy(p PullPolicy) (PullPolicy, error) {
	if p == "" {
		p = e.cfg.PullPolicy
	}
	return image.ParsePullPolicy(string(p))
}

// PullWith is Pull under opts: the pull policy of this call.
func (e *Engine) PullWith(ctx context.Context, ref string, opts PullOptions) (*image.Image, error) {
	if strings.TrimSpace(ref) == "" {
		return nil, errdefs.New(errdefs.ValidationError, "image is required")
	}
	policy, err := e.pullPolicy(opts.Policy)
	if err != nil {
		return nil, err
	}
	return e.images.PullWith(ctx, ref, image.PullOptions{Policy: policy})
}

// pullPinned pulls ref under policy and pins the image against Prune and
// RemoveImage until unpin is called: an image removed between the pull and
// the pin is pulled again.
func (e *Engine) pullPinned(ctx context.Context, ref string, policy PullPolicy) (img *image.Image, unpin func(), err error) {
	for range 3 {
		if img, err = e.images.PullWith(ctx, ref, image.PullOptions{Policy: policy}); err != nil {
			return nil, nil, err
		}
		u := &e.imgs
		u.mu.Lock()
		if e.images.Has(img.ID) {
			if u.pins == nil {
				u.pins = map[string]int{}
			}
			u.pins[img.ID]++
			u.mu.Unlock()
			id := img.ID
			return img, func() {
				u.mu.Lock()
				if u.pins[id]--; u.pins[id] <= 0 {
					delete(u.pins, id)
				}
				u.mu.Unlock()
			}, nil
		}
		u.mu.Unlock()
	}
	return nil, nil, errdefs.New(errdefs.ImagePullFailed, "pull %q: the image was removed while it was being pulled", ref)
}

// pin pins a stored image against Prune and RemoveImage, as a Create in
// flight does; false if the image is gone.
func (e *Engine) pin(id string) (unpin func(), ok bool) {
	u := &e.imgs
	u.mu.Lock()
	defer u.mu.Unlock()
	if !e.images.Has(id) {
		return nil, false
	}
	if u.pins == nil {
		u.pins = map[string]int{}
	}
	u.pins[id]++
	var once sync.Once
	return func() {
		once.Do(func() {
			u.mu.Lock()
			if u.pins[id]--; u.pins[id] <= 0 {
				delete(u.pins, id)
			}
			u.mu.Unlock()
		})
	}, true
}

// imageUsers maps image ids to the boxes that use them (any status); an
// image pinned by a Create in flight maps to "" among them. Called with
// imgs.mu held.
func (e *Engine) imageUsers() (map[string][]string, error) {
	recs, err := e.store.ListBoxes()
	if err != nil {
		return nil, err
	}
	users := map[string][]string{}
	for _, r := range recs {
		if r.ImageID != "" {
			users[r.ImageID] = append(users[r.ImageID], r.ID)
		}
	}
	for id := range e.imgs.pins {
		users[id] = append(users[id], "")
	}
	return users, nil
}

// Images lists the images in the store, oldest pull first, with the boxes
// that use them and their base disks.
func (e *Engine) Images(ctx context.Context) ([]ImageInfo, error) {
	sums, err := e.images.List(ctx)
	if err != nil {
		return nil, err
	}
	e.imgs.mu.Lock()
	users, err := e.imageUsers()
	e.imgs.mu.Unlock()
	if err != nil {
		return nil, err
	}
	out := make([]ImageInfo, 0, len(sums))
	for _, s := range sums {
		info := ImageInfo{
			ID: s.ID, Names: s.Names, Digest: string(s.Digest), Size: s.Size,
			Created: s.Created, Pulled: s.Pulled,
			InUse: len(users[s.ID]) > 0, BaseDiskSize: e.bases.Size(s.ID),
		}
		for _, b := range users[s.ID] {
			if b != "" {
				info.Boxes = append(info.Boxes, b)
			}
		}
		out = append(out, info)
	}
	return out, nil
}

// RemoveImage removes an image, named by a reference (as Create takes it)
// or by its ID (or a unique prefix of 12+ hex digits), from the store with
// its base disk. A reference that is one of several names of the image
// only loses that name.
//
// An image that a box uses (running, stopped or in error: any box until it
// is removed) is refused with IMAGE_IN_USE. With Force it is untagged
// instead: its names go (a later pull fetches the reference anew), its
// content and base disk stay for its boxes, which keep running, stopping
// and starting as before; Prune removes it once no box uses it. An image
// not in the store is IMAGE_NOT_FOUND.
func (e *Engine) RemoveImage(ctx context.Context, ref string, opts ...RemoveOption) error {
	force := slices.Contains(opts, Force)
	if strings.TrimSpace(ref) == "" {
		return errdefs.New(errdefs.ValidationError, "image is required")
	}
	id, name, err := e.images.Lookup(ctx, ref)
	if err != nil {
		return err
	}
	// The pool's ready boxes of the image are not boxes: they go.
	e.pool.dropImage(e, id)
	e.imgs.mu.Lock()
	defer e.imgs.mu.Unlock()
	names, err := e.images.Names(id)
	if err != nil {
		return err
	}
	if name != "" && len(names) > 1 {
		return e.images.Untag(id, name)
	}
	users, err := e.imageUsers()
	if err != nil {
		return err
	}
	if boxes := users[id]; len(boxes) > 0 {
		if !force {
			return errdefs.New(errdefs.ImageInUse, "image %q (%.12s) is used by %s: remove them first, or force to untag it (its boxes keep it)",
				ref, id, describeUsers(boxes))
		}
		if len(names) == 0 {
			return nil
		}
		return e.images.Untag(id, names...)
	}
	if err := e.images.Remove(id); err != nil {
		return err
	}
	if err := e.bases.Remove(id); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "remove the base disk of image %.12s", id)
	}
	e.log.Info("image removed", "image", id, "ref", ref)
	return nil
}

// describeUsers names the boxes of an image for an error message.
func describeUsers(boxes []string) string {
	var named []string
	creating := false
	for _, b := range boxes {
		if b == "" {
			creating = true
		} else {
			named = append(named, b)
		}
	}
	switch {
	case len(named) == 0:
		return "a box being created"
	case len(named) == 1:
		return "box " + named[0]
	}
	s := "boxes " + strings.Join(named, ", ")
	if creating {
		s += " and a box being created"
	}
	return s
}

// Prune removes what no box uses: images (named or not) and their base
// disks, base disks whose image is gone, and the kernel, initramfs and
// agent files in the cache that this engine does not boot with. Nothing a
// box uses, whatever its status, nor an image a Create is pulling or
// booting, is touched.
func (e *Engine) Prune(ctx context.Context) (PruneReport, error) {
	var rep PruneReport
	// The pool's ready boxes pin their images without using them: they go
	// (Creates refill the pool).
	e.pool.dropImage(e, "")
	if err := e.pruneImages(ctx, &rep); err != nil {
		return rep, err
	}
	if err := e.pruneCache(ctx, &rep); err != nil {
		return rep, err
	}
	e.log.Info("pruned", "images", len(rep.Images), "base_disks", len(rep.BaseDisks),
		"cache_files", len(rep.CacheFiles), "bytes_freed", rep.BytesFreed)
	return rep, nil
}

// pruneImages removes the unused images and base disks.
func (e *Engine) pruneImages(ctx context.Context, rep *PruneReport) error {
	sums, err := e.images.List(ctx)
	if err != nil {
		return err
	}
	e.imgs.mu.Lock()
	defer e.imgs.mu.Unlock()
	users, err := e.imageUsers()
	if err != nil {
		return err
	}
	before, err := disk.Usage(e.images.Root())
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "measure the image store")
	}
	for _, s := range sums {
		if len(users[s.ID]) > 0 {
			continue
		}
		if err := e.images.Remove(s.ID); err != nil {
			if errdefs.Is(err, errdefs.ImageInUse) || errdefs.Is(err, errdefs.ImageNotFound) {
				continue
			}
			return err
		}
		rep.Images = append(rep.Images, s.ID)
	}
	if after, err := disk.Usage(e.images.Root()); err == nil && after.Allocated < before.Allocated {
		rep.BytesFreed += before.Allocated - after.Allocated
	}
	// Base disks (and build leftovers) of images neither in the store nor
	// in use.
	ents, err := os.ReadDir(e.bases.Dir)
	if err != nil && !os.IsNotExist(err) {
		return errdefs.Wrap(errdefs.RuntimeError, err, "list base disks")
	}
	for _, ent := range ents {
		key, _, ok := strings.Cut(ent.Name(), ".ext4")
		if !ok || len(users[key]) > 0 || e.images.Has(key) {
			continue
		}
		// A host tree's base (BoxSpec.Rootfs) on a shared dir may be
		// another engine's.
		if strings.HasPrefix(key, rootfsPrefix) && e.cfg.SharedDir != "" {
			continue
		}
		p := filepath.Join(e.bases.Dir, ent.Name())
		u, _ := disk.Usage(p)
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return errdefs.Wrap(errdefs.RuntimeError, err, "remove base disk %s", ent.Name())
		}
		rep.BytesFreed += u.Allocated
		if ent.Name() == key+".ext4" {
			rep.BaseDisks = append(rep.BaseDisks, key)
		}
	}
	return nil
}

// staleAfter is how old a temporary file of the cache must be before Prune
// takes it for the leftover of an interrupted build.
const staleAfter = time.Hour

// pruneCache removes the cache's kernel, initramfs and agent files other
// than those this engine boots with (preparing them if needed, as a Create
// would), warm-start templates made from other ones, and leftovers of
// interrupted builds. Unknown files stay.
func (e *Engine) pruneCache(ctx context.Context, rep *PruneReport) error {
	assets, err := e.bootAssets(ctx)
	if err != nil {
		rep.CacheSkipped = err.Error()
		e.log.Warn("prune: cache left alone (boot assets unknown)", "err", err)
		return nil
	}
	cache := e.cache
	keep := map[string]bool{assets.kernel.Vmlinux: true, assets.initramfs: true}
	if e.cfg.AgentPath == "" {
		p, err := agentexec.AgentPath(ctx, cache) // known by now: bootAssets asked
		if err != nil {
			rep.CacheSkipped = err.Error()
			return nil
		}
		keep[p] = true
	}
	ents, err := os.ReadDir(cache)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "list the cache")
	}
	for _, ent := range ents {
		name, p := ent.Name(), filepath.Join(cache, ent.Name())
		switch {
		case keep[p]:
			continue
		case strings.HasPrefix(name, "vmlinux-"), strings.HasPrefix(name, "agent-"),
			strings.HasPrefix(name, "initramfs-") && strings.HasSuffix(name, ".cpio"):
		case strings.HasPrefix(name, ".tmp-initramfs-"), strings.HasPrefix(name, ".agent-build-"),
			strings.HasPrefix(name, ".agent-embedded-"):
			info, err := ent.Info()
			if err != nil || time.Since(info.ModTime()) < staleAfter {
				continue
			}
		default:
			continue
		}
		u, _ := disk.Usage(p)
		if err := os.RemoveAll(p); err != nil {
			return errdefs.Wrap(errdefs.RuntimeError, err, "remove cache file %s", name)
		}
		rep.CacheFiles = append(rep.CacheFiles, name)
		rep.BytesFreed += u.Allocated
	}
	// Warm-start templates of other boot files (warm.go).
	names, freed := e.warm.prune(assets)
	rep.CacheFiles = append(rep.CacheFiles, names...)
	rep.BytesFreed += freed
	return nil
}

// DiskUsage reports the host space the engine's data dir takes, by kind.
func (e *Engine) DiskUsage(ctx context.Context) (DiskUsage, error) {
	var du DiskUsage
	for _, part := range []struct {
		dir       string
		allocated *int64
	}{
		{e.images.Root(), &du.Images},
		{e.bases.Dir, &du.BaseDisks},
		{filepath.Join(e.cfg.DataDir, "boxes"), &du.BoxDisks},
		{e.cache, &du.Cache},
		{filepath.Join(e.cfg.DataDir, "state"), &du.State},
	} {
		if err := ctx.Err(); err != nil {
			return du, errdefs.Wrap(errdefs.Canceled, err, "disk usage")
		}
		u, err := disk.Usage(part.dir)
		if err != nil {
			return du, errdefs.Wrap(errdefs.RuntimeError, err, "disk usage of %s", part.dir)
		}
		*part.allocated = u.Allocated
		du.Total += u.Allocated
	}
	disks, _ := filepath.Glob(filepath.Join(e.cfg.DataDir, "boxes", "*", "disk.ext4"))
	for _, d := range disks {
		if st, err := os.Stat(d); err == nil {
			du.BoxDisksApparent += st.Size()
		}
	}
	return du, nil
}
