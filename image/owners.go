package image

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"path"
	"strings"

	"github.com/containers/storage"
	"github.com/containers/storage/pkg/archive"

	"github.com/boxrun/boxrun/errdefs"
)

// Owner is the owner of a path of an image's root filesystem, as its
// layers' tar headers say; for a device node (which an ordinary user's
// store cannot create) also what it is.
type Owner struct {
	UID, GID int
	Mode     int64 // permission bits, with setuid, setgid and sticky
	// Device is 'c' or 'b' for a character or block device node, with
	// its numbers; 0 otherwise.
	Device       byte
	Major, Minor int64
}

// Owners returns the owner of every path of an image's root filesystem
// ("/etc/passwd"), read from its layers' tar headers, whiteouts applied:
// what the image says, whatever the files extracted on the host are owned
// by. An engine that is not root stores layers without chowning them
// (every file is the caller's), and builds the base disk's ownership from
// this instead.
func (s *Store) Owners(ctx context.Context, imageID string) (map[string]Owner, error) {
	if err := s.enter(); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "owners of image %s", imageID)
	}
	defer s.busy.Done()
	if s.rootless() {
		owners, err := s.ownersInUserNS(ctx, imageID)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "owners of image %s", imageID)
		}
		return owners, nil
	}
	img, err := s.store.Image(imageID)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "owners of image %s", imageID)
	}
	chain, err := s.layerChain(img.TopLayer) // top first
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "owners of image %s", imageID)
	}
	owners := map[string]Owner{}
	uncompressed := archive.Uncompressed
	for i := len(chain) - 1; i >= 0; i-- {
		if err := ctx.Err(); err != nil {
			return nil, errdefs.Wrap(errdefs.Canceled, err, "owners of image %s", imageID)
		}
		rc, err := s.store.Diff("", chain[i], &storage.DiffOptions{Compression: &uncompressed})
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "layer %s of image %s", chain[i], imageID)
		}
		err = applyOwners(owners, rc)
		rc.Close()
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "layer %s of image %s", chain[i], imageID)
		}
	}
	return owners, nil
}

// applyOwners applies one layer's tar stream to owners: its whiteouts
// remove what lower layers put there (opaque directories their contents,
// a non-directory whatever was below it), then its entries are added.
// Each recorded path is checked against the layer's removals by walking
// up its parents: the cost is the paths times their depth, never the
// product of two layers' sizes.
func applyOwners(owners map[string]Owner, r io.Reader) error {
	layer := map[string]Owner{}
	removed := map[string]bool{} // this path and all below it
	below := map[string]bool{}   // all below this path, not itself
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		name := path.Clean("/" + hdr.Name)
		dir, base := path.Split(name)
		dir = path.Clean(dir)
		switch {
		case base == ".wh..wh..opq":
			below[dir] = true
		case strings.HasPrefix(base, ".wh."):
			removed[path.Join(dir, strings.TrimPrefix(base, ".wh."))] = true
		default:
			o := Owner{UID: hdr.Uid, GID: hdr.Gid, Mode: hdr.Mode & 0o7777}
			switch hdr.Typeflag {
			case tar.TypeLink:
				o.Mode = -1 // the target's inode: its own entry says
			case tar.TypeChar:
				o.Device, o.Major, o.Minor = 'c', hdr.Devmajor, hdr.Devminor
			case tar.TypeBlock:
				o.Device, o.Major, o.Minor = 'b', hdr.Devmajor, hdr.Devminor
			}
			layer[name] = o
			if hdr.Typeflag != tar.TypeDir {
				below[name] = true
			}
		}
	}
	if len(removed) > 0 || len(below) > 0 {
		for p := range owners {
			if removed[p] {
				delete(owners, p)
				continue
			}
			for d := path.Dir(p); ; d = path.Dir(d) {
				if removed[d] || below[d] {
					delete(owners, p)
					break
				}
				if d == "/" {
					break
				}
			}
		}
	}
	for p, o := range layer {
		owners[p] = o
	}
	return nil
}
