// Package testenv holds fixtures for boxrun tests: a tiny busybox OCI image
// built from the host's busybox-static, and a real local registry process.
//
// Everything here runs real parts (the Debian docker-registry binary, real
// HTTP, real tarballs) so that tests exercise the same code paths as
// production. The host needs the packages installed by scripts/setup.sh.
package testenv

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// BusyboxPath is the statically linked busybox (Debian busybox-static)
// that BusyboxLayout packs into its image.
const BusyboxPath = "/bin/busybox"

// DefaultEnv is the image environment of BusyboxLayout before WithEnv.
var DefaultEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"IMAGE_VAR=from-image",
}

// epoch is the timestamp of every file and of the image itself, so the same
// inputs always give the same digests.
var epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// LayoutOptions describes the image that BusyboxLayout and
// WriteBusyboxLayout build. The zero value is the default image.
type LayoutOptions struct {
	User       string   // config User, e.g. "app" or "1000:1000"; "" = root
	WorkingDir string   // config WorkingDir; "" = "/"
	Env        []string // KEY=VALUE entries appended to DefaultEnv
	Entrypoint []string // config Entrypoint; nil = none
	Cmd        []string // config Cmd; nil = ["sh"]
	// Tag is recorded in index.json as the org.opencontainers.image.ref.name
	// annotation, so the layout can be addressed as oci:DIR:TAG; "" = "latest".
	Tag string
	// Layers, when set, are more layers on top of busybox's, bottom first,
	// each its entries in order: headers (owners, modes, devices,
	// whiteouts "dir/.wh.name") with their contents.
	Layers [][]LayerEntry
}

// LayerEntry is one entry of LayoutOptions.Layer.
type LayerEntry struct {
	Header tar.Header
	Data   []byte
}

// LayoutOption customises the image built by BusyboxLayout: a
// LayoutOptions value (its non-zero fields apply) or a With* option.
type LayoutOption interface {
	apply(*LayoutOptions)
}

func (o LayoutOptions) apply(dst *LayoutOptions) {
	if o.User != "" {
		dst.User = o.User
	}
	if o.WorkingDir != "" {
		dst.WorkingDir = o.WorkingDir
	}
	dst.Env = append(dst.Env, o.Env...)
	if o.Entrypoint != nil {
		dst.Entrypoint = o.Entrypoint
	}
	if o.Cmd != nil {
		dst.Cmd = o.Cmd
	}
	if o.Tag != "" {
		dst.Tag = o.Tag
	}
	dst.Layers = append(dst.Layers, o.Layers...)
}

type optionFunc func(*LayoutOptions)

func (f optionFunc) apply(o *LayoutOptions) { f(o) }

// WithUser sets the image config's User (e.g. "app" or "1000:1000").
func WithUser(user string) LayoutOption {
	return optionFunc(func(o *LayoutOptions) { o.User = user })
}

// WithWorkingDir sets the image config's WorkingDir (default "/").
func WithWorkingDir(dir string) LayoutOption {
	return optionFunc(func(o *LayoutOptions) { o.WorkingDir = dir })
}

// WithEnv appends KEY=VALUE entries to the image environment.
func WithEnv(env ...string) LayoutOption {
	return optionFunc(func(o *LayoutOptions) { o.Env = append(o.Env, env...) })
}

// WithEntrypoint sets the image config's Entrypoint (default none).
func WithEntrypoint(args ...string) LayoutOption {
	return optionFunc(func(o *LayoutOptions) { o.Entrypoint = args })
}

// WithCmd sets the image config's Cmd (default ["sh"]).
func WithCmd(args ...string) LayoutOption {
	return optionFunc(func(o *LayoutOptions) { o.Cmd = args })
}

// WithTag sets the tag recorded in index.json (default "latest").
func WithTag(tag string) LayoutOption {
	return optionFunc(func(o *LayoutOptions) { o.Tag = tag })
}

// layer is the image's single filesystem layer, built once per process:
// packing busybox is the only costly step, and it does not depend on the
// options.
var layer struct {
	once   sync.Once
	gz     []byte        // the gzip-compressed tar
	diffID digest.Digest // digest of the uncompressed tar
	err    error
}

// BusyboxLayout writes, into a fresh t.TempDir(), an OCI image layout of a
// tiny Linux image made from the host's busybox-static, and returns the
// layout directory. See WriteBusyboxLayout.
func BusyboxLayout(t testing.TB, opts ...LayoutOption) string {
	t.Helper()
	var o LayoutOptions
	for _, opt := range opts {
		opt.apply(&o)
	}
	dir := t.TempDir()
	if err := WriteBusyboxLayout(dir, o); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return dir
}

// WriteBusyboxLayout writes into dir (created if needed) an OCI image
// layout of a tiny Linux image made from the host's busybox-static: the
// image holds /bin/busybox and its applet symlinks, /etc/passwd and
// /etc/group with root and app (uid/gid 1000, home /home/app), and the
// usual top-level directories. Its digests depend only on opts, so equal
// options give the same image. It suits TestMain, which has no testing.TB.
func WriteBusyboxLayout(dir string, opts LayoutOptions) error {
	if opts.WorkingDir == "" {
		opts.WorkingDir = "/"
	}
	if opts.Cmd == nil {
		opts.Cmd = []string{"sh"}
	}
	if opts.Tag == "" {
		opts.Tag = "latest"
	}
	layer.once.Do(func() { layer.gz, layer.diffID, layer.err = buildLayer() })
	if layer.err != nil {
		return fmt.Errorf("building busybox layer: %w", layer.err)
	}
	if err := writeLayout(dir, opts); err != nil {
		return fmt.Errorf("writing OCI layout: %w", err)
	}
	return nil
}

func writeLayout(dir string, cfg LayoutOptions) error {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return err
	}
	writeBlob := func(mediaType string, data []byte) (ocispec.Descriptor, error) {
		d := digest.FromBytes(data)
		err := os.WriteFile(filepath.Join(blobs, d.Encoded()), data, 0o644)
		return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}, err
	}

	layerDesc, err := writeBlob(ocispec.MediaTypeImageLayerGzip, layer.gz)
	if err != nil {
		return err
	}
	layers, diffIDs := []ocispec.Descriptor{layerDesc}, []digest.Digest{layer.diffID}
	for _, entries := range cfg.Layers {
		gz, diffID, err := packLayer(entries)
		if err != nil {
			return err
		}
		d, err := writeBlob(ocispec.MediaTypeImageLayerGzip, gz)
		if err != nil {
			return err
		}
		layers, diffIDs = append(layers, d), append(diffIDs, diffID)
	}
	created := epoch
	config, err := json.Marshal(ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		Config: ocispec.ImageConfig{
			User:       cfg.User,
			Env:        append(append([]string(nil), DefaultEnv...), cfg.Env...),
			Entrypoint: cfg.Entrypoint,
			Cmd:        cfg.Cmd,
			WorkingDir: cfg.WorkingDir,
		},
		RootFS:  ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
		History: []ocispec.History{{Created: &created, CreatedBy: "boxrun testenv: busybox-static"}},
	})
	if err != nil {
		return err
	}
	configDesc, err := writeBlob(ocispec.MediaTypeImageConfig, config)
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    layers,
	})
	if err != nil {
		return err
	}
	manifestDesc, err := writeBlob(ocispec.MediaTypeImageManifest, manifest)
	if err != nil {
		return err
	}
	manifestDesc.Annotations = map[string]string{ocispec.AnnotationRefName: cfg.Tag}
	index, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{manifestDesc},
	})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, ocispec.ImageIndexFile), index, 0o644); err != nil {
		return err
	}
	ociLayout, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, ocispec.ImageLayoutFile), ociLayout, 0o644)
}

// entry is one file of the layer.
type entry struct {
	hdr  tar.Header
	data []byte
}

// buildLayer packs the busybox root filesystem into a gzip-compressed tar
// and returns it with the digest of the uncompressed tar (the diffID).
func buildLayer() ([]byte, digest.Digest, error) {
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, "", fmt.Errorf("%w (install busybox-static: run scripts/setup.sh)", err)
	}
	out, err := exec.Command(BusyboxPath, "--list-full").Output()
	if err != nil {
		return nil, "", fmt.Errorf("%s --list-full: %w", BusyboxPath, err)
	}

	entries := map[string]entry{}
	dir := func(name string, mode int64, uid int) {
		entries[name] = entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: uid}}
	}
	file := func(name string, mode int64, data []byte) {
		entries[name] = entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))}, data: data}
	}
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "home", "proc", "sys", "dev", "run", "mnt", "var"} {
		dir(d, 0o755, 0)
	}
	dir("root", 0o700, 0)
	dir("tmp", 0o1777, 0)
	dir("home/app", 0o755, 1000)
	file("bin/busybox", 0o755, bin)
	file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"+
		"app:x:1000:1000:app:/home/app:/bin/sh\n"+
		"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"))
	file("etc/group", 0o644, []byte("root:x:0:\napp:x:1000:\nnobody:x:65534:\n"))
	for _, applet := range strings.Fields(string(out)) {
		applet = strings.Trim(path.Clean(applet), "/")
		if _, ok := entries[applet]; ok || applet == "" || strings.HasPrefix(applet, "..") {
			continue // never replace busybox itself (it lists bin/busybox)
		}
		for d := path.Dir(applet); d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				dir(d, 0o755, 0)
			}
		}
		entries[applet] = entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: applet, Linkname: "/bin/busybox", Mode: 0o777}}
	}

	// Sorted names put every directory before its contents and make the
	// tar byte-for-byte reproducible.
	names := make([]string, 0, len(entries))
	for name := range entries {
		names = append(names, name)
	}
	sort.Strings(names)

	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, name := range names {
		e := entries[name]
		e.hdr.ModTime = epoch
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return nil, "", err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz) // zero header: no name, no mtime
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return gz.Bytes(), digest.FromBytes(raw.Bytes()), nil
}

// packLayer makes a gzip-compressed layer of entries, in order, and
// returns it with its diffID.
func packLayer(entries []LayerEntry) ([]byte, digest.Digest, error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, e := range entries {
		h := e.Header
		h.ModTime = epoch
		h.Format = tar.FormatPAX
		if h.Typeflag == tar.TypeReg || h.Typeflag == 0 {
			h.Size = int64(len(e.Data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, "", err
		}
		if _, err := tw.Write(e.Data); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return gz.Bytes(), digest.FromBytes(raw.Bytes()), nil
}
