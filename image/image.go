// Package image pulls OCI and Docker images into a local
// containers/storage store and exposes their root filesystems, from which
// the engine builds the disks of its boxes.
//
// Pulling uses github.com/containers/image/v5 and honours
// containers-registries.conf(5) (mirrors, insecure and blocked registries,
// short-name aliases and unqualified-search registries), but never
// /etc/containers/policy.json: boxes run untrusted code anyway, so image
// signatures are not checked.
//
// containers/storage unpacks layers in chrooted child processes that it
// starts from the program's own executable (/proc/self/exe) under argv[0]
// names such as "storage-untar". Importing this package makes any program,
// test binaries included, serve those children: see init.
package image

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/containers/image/v5/pkg/sysregistriesv2"
	istorage "github.com/containers/image/v5/storage"
	"github.com/containers/image/v5/types"
	"github.com/containers/storage"
	"github.com/containers/storage/pkg/idtools"
	"github.com/containers/storage/pkg/reexec"
	stypes "github.com/containers/storage/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/boxrun/boxrun/errdefs"
)

// init runs the containers/storage child routine when this process is one
// of its re-executed children (each such routine ends with os.Exit, so the
// child never reaches main), and otherwise records that the check was made,
// without which storage panics on its first layer. Doing it here, rather
// than asking every main and TestMain to call reexec.Init, is safe because
// package initialisation runs storage's registrations first.
func init() {
	rootlessWrap()
	if reexec.Init() {
		return // not reached: storage's routines exit
	}
	if os.Args[0] == pullHelper {
		runPullHelper() // exits
	}
}

// Options configures a Store.
type Options struct {
	// userNSChild: this is the pull child of an ordinary user (userns.go).
	userNSChild bool

	Root    string // containers/storage graph root (required), e.g. <datadir>/storage
	RunRoot string // containers/storage run root (required), e.g. /run/boxrun/storage

	// Driver is the containers/storage graph driver. "" picks "overlay" when
	// the host supports it and falls back to "vfs" otherwise.
	Driver string

	// RegistriesConf is the registries.conf to use; "" means the standard
	// locations of containers-registries.conf(5). When set, drop-in files
	// are read from RegistriesConf+".d" (e.g. registries.conf.d next to
	// registries.conf) instead of the system and per-user drop-in
	// directories, so that an explicit configuration is self-contained.
	RegistriesConf string

	// Progress, if set, receives pull progress events. It is called from one
	// goroutine at a time and never on the pull's own goroutine, so a slow
	// callback only makes intermediate "progress" events coalesce; Pull
	// returns after the last event of the pull has been delivered.
	Progress func(Progress)

	Logger *slog.Logger // nil discards logs
}

// Progress is one pull progress event.
type Progress struct {
	Ref    string // the reference being pulled, as given to Pull
	Layer  string // blob digest (layers, and the config blob)
	Event  string // "start", "progress", "done", "skipped" (already present)
	Offset int64  // bytes transferred so far
	Total  int64  // blob size, -1 when unknown
}

// Image describes an image in the store.
type Image struct {
	ID     string              // containers/storage image ID
	Ref    string              // resolved reference actually pulled, e.g. docker://127.0.0.1:5000/library/busybox:latest
	Digest digest.Digest       // manifest digest
	Config ocispec.ImageConfig // Env, WorkingDir, User, Entrypoint, Cmd, ...
	Size   int64               // uncompressed size of all layers in bytes if known, else 0
}

// Store is an image store. It is safe for concurrent use. Open at most one
// Store per Root in a process: containers/storage shares state per root.
type Store struct {
	store    storage.Store
	sys      *types.SystemContext
	log      *slog.Logger
	progress func(Progress)

	pulls keyedMutex // serialises pulls of the same resolved image

	// ctx is cancelled by Close to abort pulls in flight.
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	busy   sync.WaitGroup // Pull and Mount calls in flight
	mounts map[string]int // image ID -> our outstanding MountImage calls
}

// errClosed is the cause of every call on a closed Store.
var errClosed = errors.New("image store is closed")

// Open opens (creating if needed) the image store at opts.Root.
func Open(opts Options) (*Store, error) {
	if opts.Root == "" || opts.RunRoot == "" {
		return nil, errdefs.New(errdefs.ValidationError, "image: Options.Root and Options.RunRoot are required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	routeLogrus(log)

	store, err := openStorage(opts, log)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "image: open store at %s", opts.Root)
	}

	sys := sysContext(opts.RegistriesConf, filepath.Join(store.GraphRoot(), "boxrun-blob-info-cache"))
	// sysregistriesv2 caches parsed files per path for the whole process;
	// start from what is on disk now.
	sysregistriesv2.InvalidateCache()

	ctx, cancel := context.WithCancel(context.Background())
	log.Info("image store opened", "root", store.GraphRoot(), "driver", store.GraphDriverName(),
		"registries_conf", sysregistriesv2.ConfigurationSourceDescription(sys))
	return &Store{
		store:    store,
		sys:      sys,
		log:      log,
		progress: opts.Progress,
		ctx:      ctx,
		cancel:   cancel,
		mounts:   map[string]int{},
	}, nil
}

// sysContext returns the containers/image settings of a Store.
func sysContext(registriesConf, blobInfoCacheDir string) *types.SystemContext {
	disabled := types.ShortNameModeDisabled
	sys := &types.SystemContext{
		SystemRegistriesConfPath: registriesConf,
		// Never prompt for, nor record, a short-name choice: the engine is
		// not interactive. Candidates are tried in order instead.
		ShortNameMode: &disabled,
		// Boxes are Linux VMs whatever the host runs; the architecture
		// stays the host's.
		OSChoice: "linux",
		// Keep the blob-info cache with the store rather than in
		// /var/lib/containers, which belongs to other tools.
		BlobInfoCacheDir:        blobInfoCacheDir,
		DockerRegistryUserAgent: "boxrun",
	}
	if registriesConf != "" {
		sys.SystemRegistriesConfDirPath = registriesConf + ".d"
	}
	return sys
}

// openStorage opens containers/storage with the requested driver, or with
// overlay falling back to vfs when none was requested: overlay shares
// layers between images and mounts instantly, but needs kernel support
// that, for instance, an overlay-on-overlay container lacks.
func openStorage(opts Options, log *slog.Logger) (storage.Store, error) {
	open := func(driver string) (storage.Store, error) {
		so := stypes.StoreOptions{
			GraphRoot:       opts.Root,
			RunRoot:         opts.RunRoot,
			GraphDriverName: driver,
		}
		if driver == "vfs" && opts.userNSChild {
			// The pull child of an ordinary user (userns.go): root in a
			// user namespace where the user is the only id.
			so.GraphDriverOptions = []string{"vfs.ignore_chown_errors=true"}
		}
		if driver == "vfs" && os.Geteuid() != 0 {
			// Not root: files cannot be given to their owners. They stay
			// the caller's; the base disk takes the owners from the
			// layers' tar headers instead (Owners). The mapping puts the
			// image's root on the caller, so that the store's own
			// chowns (of its directories, to the image's root) succeed;
			// every other owner maps past the caller and its chown fails,
			// which ignore_chown_errors ignores. No user namespace, no
			// subordinate ids.
			uid, gid := os.Geteuid(), os.Getegid()
			so.UIDMap = []idtools.IDMap{{ContainerID: 0, HostID: uid, Size: maxID - uid}}
			so.GIDMap = []idtools.IDMap{{ContainerID: 0, HostID: gid, Size: maxID - gid}}
			so.GraphDriverOptions = []string{"vfs.ignore_chown_errors=true"}
		}
		return storage.GetStore(so)
	}
	if opts.Driver != "" {
		return open(opts.Driver)
	}
	if os.Geteuid() != 0 {
		// overlay needs root (or a user namespace) to mount.
		return open("vfs")
	}
	store, err := open("overlay")
	if err == nil {
		return store, nil
	}
	log.Warn("overlay storage driver unavailable, using vfs", "err", err)
	return open("vfs")
}

// maxID bounds the ids a rootless store maps (2^32 - 2: the largest
// valid uid).
const maxID = 1<<32 - 2

// Driver returns the name of the containers/storage driver in use.
func (s *Store) Driver() string { return s.store.GraphDriverName() }

// enter registers a call in flight, failing once the Store is closed.
func (s *Store) enter() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errClosed
	}
	s.busy.Add(1)
	return nil
}

// Close aborts pulls in flight, undoes the Mounts not yet unmounted, and
// shuts containers/storage down (unmounting the driver's own mounts). It
// is idempotent.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()

	s.cancel()
	s.busy.Wait()

	var errs []error
	for id, n := range s.mounts {
		for range n {
			if s.rootless() {
				break // read in place: nothing mounted
			}
			if _, err := s.store.UnmountImage(id, false); err != nil {
				errs = append(errs, fmt.Errorf("unmount image %s: %w", id, err))
				break
			}
		}
		delete(s.mounts, id)
	}
	if _, err := s.store.Shutdown(false); err != nil {
		// Something still holds a layer mounted (a leak, or another user
		// of this root). The Store owns its root, so force it: a failed
		// Shutdown would otherwise leave the driver's home mount behind.
		s.log.Warn("image store: forcing storage shutdown", "err", err)
		_, _ = s.store.Shutdown(true)
		if _, err := s.store.Shutdown(false); err != nil {
			errs = append(errs, fmt.Errorf("shut down storage: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "image: close store")
	}
	return nil
}

// Mount mounts the root filesystem of an image read-only and returns its
// path on the host. Each Mount must be matched by an Unmount (or Close);
// mounting an image twice returns the same path and counts twice.
func (s *Store) Mount(ctx context.Context, imageID string) (rootfs string, err error) {
	if err := s.enter(); err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "mount image %s", imageID)
	}
	defer s.busy.Done()
	if err := ctx.Err(); err != nil {
		return "", errdefs.Wrap(errdefs.Canceled, err, "mount image %s", imageID)
	}
	img, err := s.store.Image(imageID)
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "mount image %s", imageID)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rootless() {
		// vfs keeps each layer as a whole tree: the top layer's directory
		// is the image's root, read in place. (MountImage would make an
		// id-mapped copy of it, which an ordinary user cannot.) An image
		// without layers is an empty tree.
		dir := filepath.Join(s.store.GraphRoot(), "boxrun-empty-rootfs")
		if img.TopLayer != "" {
			dir = filepath.Join(s.store.GraphRoot(), "vfs", "dir", img.TopLayer)
		} else if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "mount image %s", imageID)
		}
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return "", errdefs.New(errdefs.RuntimeError, "mount image %s: no layer directory %s", imageID, dir)
		}
		s.mounts[img.ID]++
		return dir, nil
	}
	rootfs, err = s.store.MountImage(img.ID, nil, "")
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "mount image %s", imageID)
	}
	s.mounts[img.ID]++
	s.log.Debug("image mounted", "image", img.ID, "rootfs", rootfs)
	return rootfs, nil
}

// Unmount undoes one Mount of the image.
func (s *Store) Unmount(imageID string) error {
	if err := s.enter(); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "unmount image %s", imageID)
	}
	defer s.busy.Done()
	img, err := s.store.Image(imageID)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "unmount image %s", imageID)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mounts[img.ID] == 0 {
		return errdefs.New(errdefs.ValidationError, "unmount image %s: not mounted", imageID)
	}
	if s.rootless() {
		// Read in place (Mount): nothing to unmount.
	} else if _, err := s.store.UnmountImage(img.ID, false); err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "unmount image %s", imageID)
	}
	if s.mounts[img.ID]--; s.mounts[img.ID] == 0 {
		delete(s.mounts, img.ID)
	}
	s.log.Debug("image unmounted", "image", img.ID)
	return nil
}

// Get returns an image already in the store by its ID, without any
// network access: a box restarts on exactly the image it was created from,
// even if its reference now names another one.
func (s *Store) Get(ctx context.Context, imageID string) (*Image, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.busy.Done()
	img, err := s.describe(ctx, imageID, imageID)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "image %s is not in the store", imageID)
	}
	return img, nil
}

// describe reads the store's record of an image into an Image.
func (s *Store) describe(ctx context.Context, id, ref string) (*Image, error) {
	rec, err := s.store.Image(id)
	if err != nil {
		return nil, err
	}
	sref, err := istorage.Transport.NewStoreReference(s.store, nil, rec.ID)
	if err != nil {
		return nil, err
	}
	img, err := sref.NewImage(ctx, s.sys)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	config, err := img.OCIConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf("read image config: %w", err)
	}
	return &Image{
		ID:     rec.ID,
		Ref:    ref,
		Digest: rec.Digest,
		Config: config.Config,
		Size:   s.layersSize(rec.TopLayer),
	}, nil
}

// layersSize adds up the uncompressed sizes of a layer and its parents,
// or returns 0 if any of them is unknown.
func (s *Store) layersSize(top string) int64 {
	var size int64
	for id := top; id != ""; {
		l, err := s.store.Layer(id)
		if err != nil || l.UncompressedSize <= 0 {
			return 0
		}
		size += l.UncompressedSize
		id = l.Parent
	}
	return size
}

// layerChain returns the ids of a layer and its parents, top first.
func (s *Store) layerChain(top string) ([]string, error) {
	var ids []string
	for id := top; id != ""; {
		l, err := s.store.Layer(id)
		if err != nil {
			return ids, err
		}
		ids = append(ids, l.ID)
		id = l.Parent
	}
	return ids, nil
}

// keyedMutex is a set of mutexes by key whose Lock honours a context.
type keyedMutex struct {
	mu     sync.Mutex
	holder map[string]chan struct{} // closed when the key is unlocked
}

func (k *keyedMutex) lock(ctx context.Context, key string) (unlock func(), err error) {
	for {
		k.mu.Lock()
		if k.holder == nil {
			k.holder = map[string]chan struct{}{}
		}
		held, busy := k.holder[key]
		if !busy {
			released := make(chan struct{})
			k.holder[key] = released
			k.mu.Unlock()
			return func() {
				k.mu.Lock()
				delete(k.holder, key)
				k.mu.Unlock()
				close(released)
			}, nil
		}
		k.mu.Unlock()
		select {
		case <-held:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
