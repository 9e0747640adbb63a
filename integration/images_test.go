package integration

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/image"
	"github.com/boxrun/boxrun/internal/testenv"
)

// imageEngine opens an engine of the test's own (its store and cache get
// pruned) on the fixtures' registry and agent, and counts its pull
// progress events. Every box it creates is removed, and the engine
// closed, when the test ends, pass or fail.
func imageEngine(t *testing.T, ctx context.Context, policy boxrun.PullPolicy) (eng *boxrun.Engine, dataDir string, progress *atomic.Int64) {
	t.Helper()
	agent, err := agentexec.AgentPath(ctx, filepath.Join(fx.dataDir, "cache")) // no second agent build
	if err != nil {
		t.Fatal(err)
	}
	progress = &atomic.Int64{}
	dataDir = t.TempDir()
	eng, err = boxrun.New(ctx, boxrun.Config{
		DataDir: dataDir, RegistriesConf: fx.registriesConf, AgentPath: agent,
		MaxCPU: 64, MaxMemoryMB: 64 << 10, PullPolicy: policy,
		PullProgress: func(image.Progress) { progress.Add(1) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		boxes, _ := eng.List(context.Background())
		for _, b := range boxes {
			eng.Remove(context.Background(), b.ID, boxrun.Force)
		}
		if err := eng.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return eng, dataDir, progress
}

// pushImage pushes a busybox image with env to the fixtures' registry
// under repoTag and returns its reference.
func pushImage(t *testing.T, ctx context.Context, repoTag string, env ...string) string {
	t.Helper()
	dir := t.TempDir()
	if err := testenv.WriteBusyboxLayout(dir, testenv.LayoutOptions{Env: env}); err != nil {
		t.Fatal(err)
	}
	ref, err := fx.registry.PushLayout(ctx, dir, repoTag)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

func echo(t *testing.T, eng *boxrun.Engine, box *boxrun.Box, variable string) string {
	t.Helper()
	res, err := eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo $" + variable}})
	if err != nil {
		t.Fatalf("exec in %s: %v", box.ID, err)
	}
	return strings.TrimSpace(res.Stdout)
}

func imagesByID(t *testing.T, eng *boxrun.Engine) map[string]boxrun.ImageInfo {
	t.Helper()
	list, err := eng.Images(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]boxrun.ImageInfo{}
	for _, i := range list {
		m[i.ID] = i
	}
	return m
}

func writeFile(t *testing.T, path string, size int) {
	t.Helper()
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestImagesOverTime: image removal refused while a box (running or
// stopped) uses the image; a tag pushed again is seen by PullAlways only;
// Prune removes what nothing uses (an untagged image of a running box and
// the image of a stopped box survive) and DiskUsage drops by what it
// reports; a forced removal untags, and the stopped box still starts.
// Four boots.
func TestImagesOverTime(t *testing.T) {
	ctx := ctxT(t, 10*time.Minute)
	eng, dataDir, progress := imageEngine(t, ctx, "")
	spec := func(ref string) boxrun.BoxSpec {
		return boxrun.BoxSpec{Image: ref, CPU: 1, MemoryMB: 256, DiskSizeGB: 1}
	}
	create := func(s boxrun.BoxSpec) *boxrun.Box {
		t.Helper()
		box, err := eng.Create(ctx, s)
		if err != nil {
			t.Fatalf("create %s: %v", s.Image, err)
		}
		return box
	}
	runRef := pushImage(t, ctx, "library/it-run:v1", "VERSION=1")
	stopRef := pushImage(t, ctx, "library/it-stop:v1", "ROLE=stop")
	idleRef := pushImage(t, ctx, "library/it-idle:v1", "ROLE=idle")

	running := create(spec(runRef))
	stopped := create(spec(stopRef))
	if _, err := eng.Stop(ctx, stopped.ID); err != nil {
		t.Fatal(err)
	}
	idle, err := eng.Pull(ctx, idleRef)
	if err != nil {
		t.Fatal(err)
	}
	imgs := imagesByID(t, eng)
	var runImg, stopImg boxrun.ImageInfo
	for _, i := range imgs {
		switch {
		case slices.Contains(i.Names, runRef):
			runImg = i
		case slices.Contains(i.Names, stopRef):
			stopImg = i
		}
	}
	if len(imgs) != 3 || !runImg.InUse || !slices.Equal(runImg.Boxes, []string{running.ID}) || runImg.BaseDiskSize == 0 ||
		!stopImg.InUse || !slices.Equal(stopImg.Boxes, []string{stopped.ID}) || runImg.Size == 0 || runImg.Digest == "" ||
		runImg.Pulled.IsZero() || runImg.Created.IsZero() {
		t.Fatalf("images: %+v", imgs)
	}
	if i := imgs[idle.ID]; i.InUse || i.BaseDiskSize != 0 || !slices.Equal(i.Names, []string{idleRef}) {
		t.Errorf("idle image: %+v", i)
	}

	// Removal refused while a box uses the image, running or stopped.
	for _, ref := range []string{runRef, "docker://" + runRef, runImg.ID, stopRef, stopImg.ID[:12]} {
		if err := eng.RemoveImage(ctx, ref); boxrun.CodeOf(err) != boxrun.ImageInUse || !strings.Contains(err.Error(), "box_") {
			t.Errorf("RemoveImage(%s) = %v, want IMAGE_IN_USE naming the box", ref, err)
		}
	}
	if err := eng.RemoveImage(ctx, fx.registry.Addr+"/library/none:v1"); boxrun.CodeOf(err) != boxrun.ImageNotFound {
		t.Errorf("RemoveImage of an unknown image = %v", err)
	}

	// The tag now names other content: missing keeps the old image,
	// always takes the new one; the running box keeps its image.
	pushImage(t, ctx, "library/it-run:v1", "VERSION=2")
	progress.Store(0)
	if img, err := eng.Pull(ctx, runRef); err != nil || img.ID != runImg.ID || progress.Load() != 0 {
		t.Fatalf("missing after re-push: %v, %v, %d progress events; want the old image, no fetch", img, err, progress.Load())
	}
	s := spec(runRef)
	s.PullPolicy = boxrun.PullAlways
	fresh := create(s)
	if v := echo(t, eng, fresh, "VERSION"); v != "2" {
		t.Errorf("box created with PullAlways sees VERSION=%q, want 2", v)
	}
	if v := echo(t, eng, running, "VERSION"); v != "1" {
		t.Errorf("the running box sees VERSION=%q, want 1", v)
	}
	newImg, err := eng.PullWith(ctx, runRef, boxrun.PullOptions{Policy: boxrun.PullNever})
	if err != nil || newImg.ID == runImg.ID {
		t.Fatalf("never after always: %+v, %v", newImg, err)
	}
	// Digest-pinned: not fetched again, whatever the policy.
	progress.Store(0)
	pinned := fx.registry.Addr + "/library/it-run@" + newImg.Digest.String()
	if img, err := eng.PullWith(ctx, pinned, boxrun.PullOptions{Policy: boxrun.PullAlways}); err != nil || img.ID != newImg.ID || progress.Load() != 0 {
		t.Errorf("pinned pull: %v, %v, %d progress events", img, err, progress.Load())
	}
	if err := eng.Remove(ctx, fresh.ID, boxrun.Force); err != nil {
		t.Fatal(err)
	}

	// Prune: the new image (its box gone, base disk built) and the idle
	// one go, so do stale cache files and an orphan base disk; the old
	// image (untagged, used by the running box) and the stopped box's stay.
	const mib = 1 << 20
	cache := filepath.Join(dataDir, "cache")
	stale := []string{"vmlinux-0123456789abcdef", "initramfs-0123456789abcdef.cpio", "agent-0123456789abcdef0123"}
	for _, name := range stale {
		writeFile(t, filepath.Join(cache, name), mib)
	}
	writeFile(t, filepath.Join(cache, "notes.txt"), 10) // not the engine's: kept
	orphan := strings.Repeat("f", 64)                   // a base disk whose image is gone
	writeFile(t, filepath.Join(dataDir, "bases", orphan+".ext4"), mib)
	before, err := eng.DiskUsage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := eng.Prune(ctx)
	if err != nil {
		t.Fatal(err)
	}
	after, err := eng.DiskUsage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("prune: %+v\nbefore %+v\nafter  %+v", rep, before, after)
	slices.Sort(rep.Images)
	wantImages := []string{idle.ID, newImg.ID}
	slices.Sort(wantImages)
	if !slices.Equal(rep.Images, wantImages) {
		t.Errorf("pruned images %v, want the idle and the new one %v", rep.Images, wantImages)
	}
	wantBases := []string{newImg.ID, orphan}
	slices.Sort(wantBases)
	if slices.Sort(rep.BaseDisks); !slices.Equal(rep.BaseDisks, wantBases) {
		t.Errorf("pruned base disks %v, want %s and the orphan", rep.BaseDisks, newImg.ID)
	}
	slices.Sort(stale)
	if slices.Sort(rep.CacheFiles); !slices.Equal(rep.CacheFiles, stale) || rep.CacheSkipped != "" {
		t.Errorf("pruned cache files %v (skipped: %q), want %v", rep.CacheFiles, rep.CacheSkipped, stale)
	}
	if _, err := os.Stat(filepath.Join(cache, "notes.txt")); err != nil {
		t.Errorf("prune removed a file it does not know: %v", err)
	}
	imgs = imagesByID(t, eng)
	if len(imgs) != 2 || imgs[runImg.ID].BaseDiskSize == 0 || imgs[stopImg.ID].BaseDiskSize == 0 || len(imgs[runImg.ID].Names) != 0 {
		t.Errorf("images after prune: %+v", imgs)
	}
	drop := before.Total - after.Total
	if rep.BytesFreed < 3*mib+imgs[runImg.ID].BaseDiskSize/2 || drop < rep.BytesFreed*9/10-mib || drop > rep.BytesFreed*11/10+mib {
		t.Errorf("prune reports %d bytes freed; disk usage dropped by %d", rep.BytesFreed, drop)
	}
	if v := echo(t, eng, running, "VERSION"); v != "1" { // untouched
		t.Errorf("the running box after prune: VERSION=%q", v)
	}

	// Force untags an image in use; its stopped box still starts on it.
	if err := eng.RemoveImage(ctx, stopRef, boxrun.Force); err != nil {
		t.Fatalf("forced RemoveImage: %v", err)
	}
	if i, ok := imagesByID(t, eng)[stopImg.ID]; !ok || len(i.Names) != 0 || !i.InUse {
		t.Errorf("image after a forced removal while in use: %+v (present %v), want untagged", i, ok)
	}
	if _, err := eng.Start(ctx, stopped.ID); err != nil {
		t.Fatalf("start after the forced image removal: %v", err)
	}
	if v := echo(t, eng, stopped, "ROLE"); v != "stop" {
		t.Errorf("restarted box: ROLE=%q", v)
	}
	for _, b := range []*boxrun.Box{stopped, running} {
		if err := eng.Remove(ctx, b.ID, boxrun.Force); err != nil {
			t.Fatal(err)
		}
	}
	if rep, err := eng.Prune(ctx); err != nil || len(rep.Images) != 2 || len(rep.BaseDisks) != 2 {
		t.Errorf("prune with no box left: %+v, %v", rep, err)
	}
	if imgs, err := eng.Images(ctx); err != nil || len(imgs) != 0 {
		t.Errorf("images at the end: %+v, %v", imgs, err)
	}
}

// TestPullPolicyDefault: Config.PullPolicy never fails Create and Pull
// cleanly when the image is absent, leaving no box; a box's own policy
// overrides it; an unknown policy is a validation error. No boot.
func TestPullPolicyDefault(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	eng, _, progress := imageEngine(t, ctx, boxrun.PullNever)
	ref := pushImage(t, ctx, "library/it-never:v1", "ROLE=never")
	_, err := eng.Create(ctx, boxrun.BoxSpec{Image: ref, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	if boxrun.CodeOf(err) != boxrun.ImagePullFailed || !strings.Contains(err.Error(), `"never"`) || !strings.Contains(err.Error(), ref) {
		t.Errorf("create under never: %v", err)
	}
	if _, err := eng.Pull(ctx, ref); boxrun.CodeOf(err) != boxrun.ImagePullFailed || !strings.Contains(err.Error(), `"never"`) {
		t.Errorf("pull under never: %v", err)
	}
	if boxes, _ := eng.List(ctx); len(boxes) != 0 || progress.Load() != 0 {
		t.Errorf("left %d boxes, %d progress events", len(boxes), progress.Load())
	}
	if _, err := eng.PullWith(ctx, ref, boxrun.PullOptions{Policy: boxrun.PullMissing}); err != nil || progress.Load() == 0 {
		t.Errorf("pull with its own policy: %v (%d progress events)", err, progress.Load())
	}
	if _, err := eng.Pull(ctx, ref); err != nil {
		t.Errorf("pull under never, present: %v", err)
	}
	_, err = eng.Create(ctx, boxrun.BoxSpec{Image: ref, PullPolicy: "sometimes"})
	if boxrun.CodeOf(err) != boxrun.ValidationError {
		t.Errorf("create with an unknown policy: %v", err)
	}
	if err := eng.RemoveImage(ctx, ref); err != nil {
		t.Errorf("remove an unused image: %v", err)
	}
	if imgs, _ := eng.Images(ctx); len(imgs) != 0 {
		t.Errorf("images after removal: %+v", imgs)
	}
}
