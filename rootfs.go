package boxrun

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"

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
