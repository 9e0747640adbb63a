package boxrun

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/runtime"
)

// writeTemplate makes a stand-in template dir: meta, and a data file of
// size bytes (written, so that it takes disk space), used at used.
func writeTemplate(t *testing.T, w *warmStart, key string, meta templateMeta, size int, used time.Time) {
	t.Helper()
	dir := filepath.Join(w.dir, key)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	meta.Key = key
	b, _ := json.Marshal(meta)
	os.WriteFile(filepath.Join(dir, "meta.json"), b, 0o600)
	os.WriteFile(filepath.Join(dir, "ram"), make([]byte, size), 0o600)
	os.Chtimes(filepath.Join(dir, "meta.json"), used, used)
}

// Over the cache's bound, image templates go before shape templates,
// whatever their age: a shape's serves every image and every Start.
func TestEvictTakesImageTemplatesFirst(t *testing.T) {
	w := &warmStart{dir: t.TempDir(), maxBytes: 7 << 19, locks: map[string]*sync.Mutex{}}
	old, recent := time.Now().Add(-time.Hour), time.Now().Add(-time.Minute)
	writeTemplate(t, w, "shape-old", templateMeta{Family: "a"}, 1<<20, old)
	writeTemplate(t, w, "image-recent", templateMeta{Family: "b image", Base: "/x"}, 1<<20, recent)
	writeTemplate(t, w, "image-older", templateMeta{Family: "c image", Base: "/y"}, 1<<20, old.Add(time.Minute))
	writeTemplate(t, w, "new", templateMeta{Family: "d"}, 1<<20, time.Now())
	w.evict("new")
	// 4 MiB over a 3.5 MiB bound: one goes, the least recently used
	// image template, though the shape template is older.
	for key, want := range map[string]bool{"shape-old": true, "image-recent": true, "image-older": false, "new": true} {
		if _, err := os.Stat(filepath.Join(w.dir, key)); (err == nil) != want {
			t.Errorf("%s kept %v, want %v", key, err == nil, want)
		}
	}
}

// Prune drops an image template whose base is gone or was made again
// (another fileID), and keeps one whose base is as it was.
func TestPruneDropsImageTemplatesOfOtherBases(t *testing.T) {
	tmp := t.TempDir()
	w := &warmStart{dir: filepath.Join(tmp, "templates"), maxBytes: 1 << 30, locks: map[string]*sync.Mutex{}}
	kernel, initrd := filepath.Join(tmp, "vmlinux"), filepath.Join(tmp, "initrd")
	os.WriteFile(kernel, []byte("k"), 0o600)
	os.WriteFile(initrd, []byte("i"), 0o600)
	boot := &bootAssets{kernel: &runtime.Kernel{Vmlinux: kernel}, initramfs: initrd}
	kid, _ := fileID(kernel)
	iid, _ := fileID(initrd)
	same, changed, gone := filepath.Join(tmp, "same.ext4"), filepath.Join(tmp, "changed.ext4"), filepath.Join(tmp, "gone.ext4")
	for _, p := range []string{same, changed} {
		os.WriteFile(p, []byte("base"), 0o600)
	}
	sameID, _ := fileID(same)
	changedID, _ := fileID(changed)
	now := time.Now()
	writeTemplate(t, w, "shape", templateMeta{Boot: bootID(kid, iid)}, 10, now)
	writeTemplate(t, w, "img-same", templateMeta{Boot: bootID(kid, iid), Base: same, BaseID: sameID}, 10, now)
	writeTemplate(t, w, "img-changed", templateMeta{Boot: bootID(kid, iid), Base: changed, BaseID: changedID}, 10, now)
	writeTemplate(t, w, "img-gone", templateMeta{Boot: bootID(kid, iid), Base: gone, BaseID: "whatever"}, 10, now)
	// The base made again at the same path: another size and time.
	time.Sleep(10 * time.Millisecond)
	os.WriteFile(changed, []byte("base, again"), 0o600)
	names, _ := w.prune(boot)
	t.Logf("pruned %v", names)
	for key, want := range map[string]bool{"shape": true, "img-same": true, "img-changed": false, "img-gone": false} {
		if _, err := os.Stat(filepath.Join(w.dir, key)); (err == nil) != want {
			t.Errorf("%s kept %v, want %v", key, err == nil, want)
		}
	}
}

// The second create of an image template's key that finds none starts
// its build (one, whatever the creates that follow); the first does not.
// A closed engine starts none.
func TestWantImageStartsOnTheSecondCreate(t *testing.T) {
	w := &warmStart{dir: t.TempDir(), locks: map[string]*sync.Mutex{}, wants: map[string]int{},
		inflight: map[string]bool{}, bgSlot: make(chan struct{}, 1)}
	w.ctx, w.cancel = contextWithCancel()
	// The slot is taken: a started build waits for it, in flight.
	w.bgSlot <- struct{}{}
	w.wantImage(nil, "k", "f", runtime.VMConfig{}, nil, 1)
	w.mu.Lock()
	first := w.inflight["k"]
	w.mu.Unlock()
	if first {
		t.Fatal("the first create started a build")
	}
	for i := 0; i < 3; i++ {
		w.wantImage(nil, "k", "f", runtime.VMConfig{}, nil, 1)
	}
	w.mu.Lock()
	inflight, wants := w.inflight["k"], w.wants["k"]
	w.mu.Unlock()
	if !inflight || wants != 0 {
		t.Fatalf("after four creates: in flight %v, wants %d; want one build in flight and no count left", inflight, wants)
	}
	w.close() // cancels the waiting build: it never takes the slot
	w.mu.Lock()
	inflight = w.inflight["k"]
	w.mu.Unlock()
	if inflight {
		t.Fatal("a build still in flight after close")
	}
	w.wantImage(nil, "k2", "f", runtime.VMConfig{}, nil, 1)
	w.wantImage(nil, "k2", "f", runtime.VMConfig{}, nil, 1)
	if w.inflight["k2"] {
		t.Fatal("a closed engine started a build")
	}
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
