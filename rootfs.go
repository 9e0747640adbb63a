package boxrun

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/image"
	"github.com/boxrun/boxrun/state"
)

// rootfsPrefix starts the base-disk key of a box on a host tree
// (BoxSpec.Rootfs): never an image ID (those are hex), so Prune and the
// image store tell them apart.
const rootfsPrefix = "rootfs-"

// rootfsKey is the base-disk key of a Rootfs.Key: hashed, so that any
// caller key makes a file name of fixed length.
func rootfsKey(key string) string {
	h := sha256.Sum256([]byte(key))
	return rootfsPrefix + hex.EncodeToString(h[:16])
}

func validKey(k string) bool {
	if k == "" || len(k) > 128 {
		return false
	}
	for _, c := range k {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// bootRootfs boots a box on its host tree: the base disk of the tree's key,
// built from the tree if no box of the key made it yet. The tree is only
// read, and only then.
func (e *Engine) bootRootfs(ctx context.Context, rec *state.Box, fresh bool) (*liveBox, error) {
	base, err := e.bases.Ensure(ctx, rec.ImageID, func() (string, func(), error) {
		if st, err := os.Stat(rec.RootfsDir); err != nil || !st.IsDir() {
			return "", nil, errdefs.New(errdefs.RuntimeError, "rootfs %s is gone", rec.RootfsDir)
		}
		return rec.RootfsDir, func() {}, nil
	})
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "base disk of rootfs %s", rec.RootfsDir)
	}
	// No image config: the box's and the execs' settings say it all.
	return e.bootOn(ctx, rec, fresh, &image.Image{ID: rec.ImageID, Ref: rec.Image}, base)
}

// dropPrivateBase removes the base disk of a box whose tree is its alone
// (Rootfs.Private): built for it, of no use once it is gone or failed.
func (e *Engine) dropPrivateBase(rec *state.Box) {
	if !rec.RootfsPrivate {
		return
	}
	if err := e.bases.Remove(rec.ImageID); err != nil {
		e.log.Warn("remove the box's own base disk", "box", rec.ID, "err", err)
	}
}

// sourcesFile lists, next to a host tree's base disk, the dirs the tree is
// made of (Rootfs.Sources), one per line.
func (e *Engine) sourcesFile(key string) string { return e.bases.Path(key) + ".sources" }

func (e *Engine) noteSources(key string, sources []string) {
	if len(sources) == 0 {
		return
	}
	p := e.sourcesFile(key)
	if _, err := os.Stat(p); err == nil {
		return
	}
	tmp := p + ".tmp-" + strconv.Itoa(os.Getpid())
	if os.WriteFile(tmp, []byte(strings.Join(sources, "\n")+"\n"), 0o600) == nil {
		os.Rename(tmp, p)
	}
}

// PruneRootfs removes the base disks of host trees (BoxSpec.Rootfs) that
// no box can be made of any more: one of their Sources is gone (containerd
// removed the image's layers). Base disks of this engine's boxes stay, and
// those of any other engine on a shared dir stay as long as their sources
// do (a running container keeps its image's layers). It returns the keys
// removed.
func (e *Engine) PruneRootfs(ctx context.Context) ([]string, error) {
	e.imgs.mu.Lock()
	defer e.imgs.mu.Unlock()
	users, err := e.imageUsers()
	if err != nil {
		return nil, err
	}
	files, _ := filepath.Glob(filepath.Join(e.bases.Dir, rootfsPrefix+"*.ext4.sources"))
	var removed []string
	for _, f := range files {
		key := strings.TrimSuffix(filepath.Base(f), ".ext4.sources")
		if len(users[key]) > 0 {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		gone := false
		for _, src := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if _, err := os.Stat(src); src != "" && os.IsNotExist(err) {
				gone = true
			}
		}
		if !gone {
			continue
		}
		if err := e.bases.Remove(key); err != nil {
			return removed, errdefs.Wrap(errdefs.RuntimeError, err, "remove base disk %s", key)
		}
		os.Remove(f)
		removed = append(removed, key)
	}
	if len(removed) > 0 {
		e.log.Info("pruned base disks of host trees whose sources are gone", "keys", removed)
	}
	return removed, nil
}
