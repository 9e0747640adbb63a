package image

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/containers/image/v5/docker/reference"
	istorage "github.com/containers/image/v5/storage"
	"github.com/containers/storage"
	"github.com/opencontainers/go-digest"

	"github.com/boxrun/boxrun/errdefs"
)

// Summary describes an image in the store, for listings.
type Summary struct {
	ID string
	// Names are the references the image is stored under: registry
	// names ("127.0.0.1:5000/library/busybox:latest", "repo@sha256:..."),
	// and local sources ("oci:/path/layout:latest"). An image whose tag a
	// newer pull took over has none.
	Names   []string
	Digest  digest.Digest // manifest digest
	Size    int64         // uncompressed size of its layers, 0 if unknown
	Created time.Time     // the image config's creation time; zero if unknown
	Pulled  time.Time     // when it entered the store
}

// List describes every image in the store, oldest pull first.
func (s *Store) List(ctx context.Context) ([]Summary, error) {
	if err := s.enter(); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "list images")
	}
	defer s.busy.Done()
	recs, err := s.store.Images()
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "list images")
	}
	out := make([]Summary, 0, len(recs))
	for _, rec := range recs {
		out = append(out, Summary{
			ID:      rec.ID,
			Names:   append([]string(nil), rec.Names...),
			Digest:  rec.Digest,
			Size:    s.layersSize(rec.TopLayer),
			Created: s.configCreated(ctx, rec.ID),
			Pulled:  rec.Created,
		})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Pulled.Before(out[j].Pulled) })
	return out, nil
}

// configCreated reads an image's creation time from its config.
func (s *Store) configCreated(ctx context.Context, id string) time.Time {
	sref, err := istorage.Transport.NewStoreReference(s.store, nil, id)
	if err != nil {
		return time.Time{}
	}
	img, err := sref.NewImage(ctx, s.sys)
	if err != nil {
		return time.Time{}
	}
	defer img.Close()
	cfg, err := img.OCIConfig(ctx)
	if err != nil || cfg.Created == nil {
		return time.Time{}
	}
	return cfg.Created.UTC()
}

// Has reports whether the store holds the image id.
func (s *Store) Has(id string) bool {
	rec, err := s.store.Image(id)
	return err == nil && rec.ID == id
}

// idRef matches what Lookup takes as an image ID: 64 hex digits
// (optionally "sha256:"), or a prefix of at least 12.
var idRef = regexp.MustCompile(`^(sha256:)?[0-9a-f]{12,64}$`)

// Lookup finds the stored image that ref names, without any network
// access, and returns its ID and the name ref matched ("" when ref is an
// ID). ref is an image ID (or a unique prefix of 12+ hex digits), or any
// reference Pull takes, resolved as Pull resolves it. An image that is not
// in the store is an ImageNotFound error.
func (s *Store) Lookup(ctx context.Context, ref string) (id, name string, err error) {
	if err := s.enter(); err != nil {
		return "", "", errdefs.Wrap(errdefs.RuntimeError, err, "look up image %q", ref)
	}
	defer s.busy.Done()
	notFound := errdefs.New(errdefs.ImageNotFound, "image %q is not in the store", ref)
	if idRef.MatchString(ref) {
		if rec, err := s.store.Image(strings.TrimPrefix(ref, "sha256:")); err == nil {
			return rec.ID, "", nil
		}
	}
	if src, ok, err := parseLocal(ref); ok {
		if err != nil {
			return "", "", errdefs.Wrap(errdefs.ValidationError, err, "image reference %q", ref)
		}
		name := localName(src)
		if rec, err := s.store.Image(name); err == nil {
			return rec.ID, name, nil
		}
		// Imported before local images were named: by the source's ID.
		if id, err := s.localImageID(ctx, src); err == nil && s.Has(id) {
			return id, "", nil
		}
		return "", "", notFound
	}
	candidates, err := s.resolve(ref)
	if err != nil {
		if idRef.MatchString(ref) { // a 64-hex "name" is no name: an unknown ID
			return "", "", notFound
		}
		return "", "", errdefs.Wrap(errdefs.ValidationError, err, "image reference %q", ref)
	}
	for _, named := range candidates {
		if rec, err := s.store.Image(named.String()); err == nil {
			return rec.ID, named.String(), nil
		}
		if c, ok := named.(reference.Canonical); ok {
			if recs, err := s.store.ImagesByDigest(c.Digest()); err == nil && len(recs) > 0 {
				return recs[0].ID, "", nil
			}
		}
	}
	return "", "", notFound
}

// Names returns the names the image id is stored under.
func (s *Store) Names(id string) ([]string, error) {
	rec, err := s.store.Image(id)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ImageNotFound, err, "image %s", id)
	}
	return append([]string(nil), rec.Names...), nil
}

// Untag removes names from the image id; its content stays.
func (s *Store) Untag(id string, names ...string) error {
	if err := s.enter(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "untag image %s", id)
	}
	defer s.busy.Done()
	if err := s.store.RemoveNames(id, names); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "untag image %s", id)
	}
	s.log.Info("image untagged", "image", id, "names", names)
	return nil
}

// Remove deletes the image id from the store with the layers no other
// image shares. An image mounted through this Store (a base disk being
// built from it) is refused with ImageInUse.
func (s *Store) Remove(id string) error {
	if err := s.enter(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "remove image %s", id)
	}
	defer s.busy.Done()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mounts[id] > 0 {
		return errdefs.New(errdefs.ImageInUse, "image %s is mounted (a base disk is being built from it)", id)
	}
	if s.store.GraphDriverName() == "vfs" && os.Geteuid() != 0 {
		s.makeRemovable(id)
	}
	if _, err := s.store.DeleteImage(id, true); err != nil {
		if errors.Is(err, storage.ErrImageUnknown) || errors.Is(err, storage.ErrNotAnImage) {
			return errdefs.Wrap(errdefs.ImageNotFound, err, "remove image %s", id)
		}
		return errdefs.Wrap(errdefs.RuntimeError, err, "remove image %s", id)
	}
	s.log.Info("image removed", "image", id)
	return nil
}

// Root is the store's graph root, where layers and image records live.
func (s *Store) Root() string { return s.store.GraphRoot() }

// makeRemovable gives the caller write permission on every directory of
// the image's layers that no other image shares: a layer holding a
// directory its owner cannot write into (an image's 0555 /proc, say)
// cannot be removed by an ordinary user otherwise. Layers other images
// share are left as they are (their modes go into base disks).
func (s *Store) makeRemovable(id string) {
	img, err := s.store.Image(id)
	if err != nil {
		return
	}
	chain := func(top string) []string {
		ids, _ := s.layerChain(top) // what could be read
		return ids
	}
	shared := map[string]bool{}
	if imgs, err := s.store.Images(); err == nil {
		for _, other := range imgs {
			if other.ID != img.ID {
				for _, l := range chain(other.TopLayer) {
					shared[l] = true
				}
			}
		}
	}
	for _, l := range chain(img.TopLayer) {
		if shared[l] {
			continue
		}
		dir := filepath.Join(s.store.GraphRoot(), "vfs", "dir", l)
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				if info, err := d.Info(); err == nil && info.Mode().Perm()&0o700 != 0o700 {
					os.Chmod(p, info.Mode().Perm()|0o700)
				}
			}
			return nil
		})
	}
}
