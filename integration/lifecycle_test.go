package integration

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

func TestStopStartKeepsDisk(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, Name: "persist-" + t.Name(), CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	sh(t, box, "echo kept > /root/file; mkdir -p /opt/data && echo deep > /opt/data/x")
	ctx := ctxT(t, 2*time.Minute)

	stopped, err := fx.eng.Stop(ctx, box.ID)
	if err != nil {
		t.Fatal(err)
	}
	if stopped.Status != "stopped" || stopped.StoppedAt == nil || stopped.StartedAt == nil {
		t.Fatalf("after stop: %+v", stopped)
	}
	if left := vmmProcesses(filepath.Join(fx.dataDir, "boxes", box.ID)); len(left) != 0 {
		t.Fatalf("VMM still running after Stop: %v", left)
	}
	if _, err := os.Stat(filepath.Join(fx.dataDir, "boxes", box.ID, "disk.ext4")); err != nil {
		t.Fatalf("Stop lost the box disk: %v", err)
	}
	if _, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"true"}}); boxrun.CodeOf(err) != boxrun.BoxNotRunning {
		t.Fatalf("exec on stopped box: %v", err)
	}
	if _, err := fx.eng.Stop(ctx, box.ID); boxrun.CodeOf(err) != boxrun.BoxNotRunning {
		t.Fatalf("stop on stopped box: %v", err)
	}
	// By name, as BoxRun allows everywhere.
	started, err := fx.eng.Start(ctx, box.Name)
	if err != nil {
		t.Fatal(err)
	}
	if started.Status != "running" || started.StoppedAt != nil {
		t.Fatalf("after start: %+v", started)
	}
	if res := sh(t, box, "cat /root/file /opt/data/x"); res.Stdout != "kept\ndeep\n" {
		t.Fatalf("after restart: %q %q", res.Stdout, res.Stderr)
	}
	if _, err := fx.eng.Start(ctx, box.ID); boxrun.CodeOf(err) != boxrun.BoxAlreadyRunning {
		t.Fatalf("start on running box: %v", err)
	}
}

func TestNamesAndLookup(t *testing.T) {
	ctx := context.Background()
	box := sharedBox(t)
	a := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, Name: "named-box", CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	got, err := fx.eng.Get(ctx, "named-box")
	if err != nil || got.ID != a.ID {
		t.Fatalf("lookup by name: %+v %v", got, err)
	}
	for _, name := range []string{"named-box", box.ID} {
		_, err := fx.eng.Create(ctx, boxrun.BoxSpec{Image: "docker://" + fx.regRef, Name: name, DiskSizeGB: 1})
		if boxrun.CodeOf(err) != boxrun.NameAlreadyExists {
			t.Fatalf("duplicate name %q: %v", name, err)
		}
	}
	res, err := fx.eng.Exec(ctx, "named-box", boxrun.ExecSpec{Cmd: []string{"echo", "by-name"}})
	if err != nil || res.Stdout != "by-name\n" {
		t.Fatalf("exec by name: %+v %v", res, err)
	}
	running, err := fx.eng.List(ctx, boxrun.ListOptions{Status: "running"})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, b := range running {
		found = found || b.ID == a.ID
		if b.Status != "running" {
			t.Fatalf("status filter returned %+v", b)
		}
	}
	if !found {
		t.Fatalf("running list lacks %s", a.ID)
	}
	if l, _ := fx.eng.List(ctx, boxrun.ListOptions{Status: "stopped"}); containsBox(l, a.ID) {
		t.Fatalf("stopped list has running box")
	}
	// Removing frees the name.
	if err := fx.eng.Remove(ctx, a.ID, boxrun.Force); err != nil {
		t.Fatal(err)
	}
	b := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, Name: "named-box", CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	if got, _ := fx.eng.Get(ctx, "named-box"); got == nil || got.ID != b.ID {
		t.Fatalf("name not reusable: %+v", got)
	}
}

func containsBox(l []*boxrun.Box, id string) bool {
	for _, b := range l {
		if b.ID == id {
			return true
		}
	}
	return false
}

func TestGCRemovesOnlyOldStoppedBoxes(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	old := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	running := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	if _, err := fx.eng.Stop(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond)
	// A cutoff in the future of the stop removes it; one before it does not.
	if n, err := fx.eng.GC(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("GC(1h) removed %d (%v)", n, err)
	}
	n, err := fx.eng.GC(ctx, time.Second)
	if err != nil || n != 1 {
		t.Fatalf("GC(1s) removed %d, want 1 (%v)", n, err)
	}
	if _, err := fx.eng.Get(ctx, old.ID); boxrun.CodeOf(err) != boxrun.BoxNotFound {
		t.Fatalf("old stopped box survived GC: %v", err)
	}
	if _, err := os.Stat(filepath.Join(fx.dataDir, "boxes", old.ID)); !os.IsNotExist(err) {
		t.Fatalf("GC left the box dir: %v", err)
	}
	if b, err := fx.eng.Get(ctx, running.ID); err != nil || b.Status != "running" {
		t.Fatalf("GC touched a running box: %+v %v", b, err)
	}
}

func TestRunIsEphemeral(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	before, _ := fx.eng.List(ctx)
	vmmBefore := vmmProcesses(fx.dataDir)
	res, err := fx.eng.Run(ctx, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1},
		boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo out; echo err >&2; exit 7"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 7 || res.Stdout != "out\n" || res.Stderr != "err\n" {
		t.Fatalf("run: %+v", res)
	}
	// A failing command (not found) still removes its box.
	if _, err := fx.eng.Run(ctx, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1},
		boxrun.ExecSpec{Cmd: []string{"no-such-cmd"}}); boxrun.CodeOf(err) != boxrun.RuntimeError {
		t.Fatalf("run of a missing command: %v", err)
	}
	// Canceled while its command runs: the box goes all the same.
	cctx, cancel := context.WithCancel(ctx)
	runningBefore, _ := fx.eng.List(ctx, boxrun.ListOptions{Status: "running"})
	go func() {
		for {
			if l, _ := fx.eng.List(ctx, boxrun.ListOptions{Status: "running"}); len(l) > len(runningBefore) {
				time.Sleep(time.Second)
				cancel()
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	if _, err := fx.eng.Run(cctx, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1},
		boxrun.ExecSpec{Cmd: []string{"sleep", "600"}}); boxrun.CodeOf(err) != boxrun.Canceled {
		t.Fatalf("canceled run: %v", err)
	}
	after, _ := fx.eng.List(ctx)
	if len(after) != len(before) {
		t.Fatalf("Run left boxes: %d -> %d", len(before), len(after))
	}
	if left := vmmProcesses(fx.dataDir); len(left) != len(vmmBefore) {
		t.Fatalf("Run left VMMs: %v -> %v", vmmBefore, left)
	}
}

func TestGuestSeesRequestedResources(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 2, MemoryMB: 384, DiskSizeGB: 1})
	res := sh(t, box, "nproc; awk '/MemTotal/{print $2}' /proc/meminfo")
	f := strings.Fields(res.Stdout)
	if len(f) != 2 || f[0] != "2" {
		t.Fatalf("nproc/meminfo: %q", res.Stdout)
	}
	kb, _ := strconv.Atoi(f[1])
	// MemTotal is what the kernel did not reserve for itself: a little
	// under the VM's memory, never above it.
	if kb > 384*1024 || kb < 384*1024*80/100 {
		t.Fatalf("MemTotal %d kB for a 384 MiB box", kb)
	}
}

func TestResourceLimits(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	eng, err := boxrun.New(ctx, boxrun.Config{DataDir: t.TempDir(), MaxCPU: 2, MaxMemoryMB: 600,
		RegistriesConf: fx.registriesConf, MaxExecOutputBytes: 4096})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	if _, err := eng.Create(ctx, boxrun.BoxSpec{Image: fx.ociRef, CPU: 3, MemoryMB: 128, DiskSizeGB: 1}); boxrun.CodeOf(err) != boxrun.ResourceExceeded {
		t.Fatalf("cpu over the cap: %v", err)
	}
	a, err := eng.Create(ctx, boxrun.BoxSpec{Image: fx.ociRef, CPU: 1, MemoryMB: 400, DiskSizeGB: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Remove(context.Background(), a.ID, boxrun.Force) })

	// Output retention: the live caller gets everything, the store keeps
	// the newest 4 KiB and says how much it dropped.
	events, err := eng.Stream(ctx, a.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "for i in $(seq 1 2000); do echo line-$i; done"}})
	if err != nil {
		t.Fatal(err)
	}
	var live strings.Builder
	var execID string
	for ev := range events {
		execID = ev.ExecID
		if ev.Type == "log" {
			live.WriteString(ev.Data)
		}
	}
	if !strings.HasPrefix(live.String(), "line-1\n") || !strings.HasSuffix(live.String(), "line-2000\n") {
		t.Fatalf("live output incomplete: %d bytes", live.Len())
	}
	x, err := eng.GetExec(ctx, execID)
	if err != nil || x.DroppedBytes == 0 || x.DroppedEvents == 0 {
		t.Fatalf("retention not recorded: %+v %v", x, err)
	}
	replay, err := eng.ExecEvents(ctx, execID)
	if err != nil {
		t.Fatal(err)
	}
	var kept strings.Builder
	var last boxrun.Event
	for ev := range replay {
		if ev.Type == "log" {
			kept.WriteString(ev.Data)
		}
		last = ev
	}
	if kept.Len() > 4096 || !strings.HasSuffix(kept.String(), "line-2000\n") || last.Type != "exit" ||
		int64(kept.Len())+x.DroppedBytes != int64(live.Len()) {
		t.Fatalf("stored %d bytes (dropped %d of %d), last %+v", kept.Len(), x.DroppedBytes, live.Len(), last)
	}

	if _, err := eng.Create(ctx, boxrun.BoxSpec{Image: fx.ociRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1}); boxrun.CodeOf(err) != boxrun.ResourceExceeded {
		t.Fatalf("memory over the cap: %v", err)
	}
	if l, _ := eng.List(ctx); len(l) != 1 {
		t.Fatalf("RESOURCE_EXCEEDED left a record: %d boxes", len(l))
	}
	// Stopping releases; starting takes again.
	if _, err := eng.Stop(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	b, err := eng.Create(ctx, boxrun.BoxSpec{Image: fx.ociRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	if err != nil {
		t.Fatalf("create after stop freed memory: %v", err)
	}
	t.Cleanup(func() { eng.Remove(context.Background(), b.ID, boxrun.Force) })
	if _, err := eng.Start(ctx, a.ID); boxrun.CodeOf(err) != boxrun.ResourceExceeded {
		t.Fatalf("start over the cap: %v", err)
	}
}

// A VM that dies on its own (OOM killer, guest panic) leaves a stopped box
// with its disk, not a "running" box nobody can use.
func TestVMDeathMarksBoxStopped(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	sh(t, box, "echo survived > /root/f; sync")
	pids := vmmProcesses(filepath.Join(fx.dataDir, "boxes", box.ID))
	if len(pids) != 1 {
		t.Fatalf("VMM pids %v", pids)
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 2*time.Minute)
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := fx.eng.Get(ctx, box.ID)
		if err != nil {
			t.Fatal(err)
		}
		if b.Status == "stopped" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("box still %q after its VM died", b.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := fx.eng.Start(ctx, box.ID); err != nil {
		t.Fatal(err)
	}
	if res := sh(t, box, "cat /root/f"); res.Stdout != "survived\n" {
		t.Fatalf("after restart: %q %q", res.Stdout, res.Stderr)
	}
}
