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
	// Device is 'c' or 'b' for a character or block device node, with
	// its numbers and permission bits; 0 otherwise.
	Device       byte
	Major, Minor int64
	Mode         int64
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
	img, err := s.store.Image(imageID)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "owners of image %s", imageID)
	}
	var chain []string // top first
	for id := img.TopLayer; id != ""; {
		l, err := s.store.Layer(id)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "owners of image %s", imageID)
		}
		chain = append(chain, l.ID)
		id = l.Parent
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
// remove what lower layers put there, then its entries are added.
func applyOwners(owners map[string]Owner, r io.Reader) error {
	layer := map[string]Owner{}
	var removed, opaque, replaced []string
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
			opaque = append(opaque, dir)
		case strings.HasPrefix(base, ".wh."):
			removed = append(removed, path.Join(dir, strings.TrimPrefix(base, ".wh.")))
		default:
			o := Owner{UID: hdr.Uid, GID: hdr.Gid}
			switch hdr.Typeflag {
			case tar.TypeChar:
				o.Device, o.Major, o.Minor, o.Mode = 'c', hdr.Devmajor, hdr.Devminor, hdr.Mode&0o7777
			case tar.TypeBlock:
				o.Device, o.Major, o.Minor, o.Mode = 'b', hdr.Devmajor, hdr.Devminor, hdr.Mode&0o7777
			}
			layer[name] = o
			if hdr.Typeflag != tar.TypeDir {
				replaced = append(replaced, name)
			}
		}
	}
	for p := range owners {
		for _, r := range removed {
			if p == r || strings.HasPrefix(p, r+"/") {
				delete(owners, p)
			}
		}
		for _, d := range opaque {
			if strings.HasPrefix(p, strings.TrimSuffix(d, "/")+"/") {
				delete(owners, p)
			}
		}
	}
	// An entry that is not a directory replaces whatever a lower layer
	// had there, a directory's contents included.
	for p := range owners {
		for _, r := range replaced {
			if strings.HasPrefix(p, r+"/") {
				delete(owners, p)
			}
		}
	}
	for p, o := range layer {
		owners[p] = o
	}
	return nil
}
