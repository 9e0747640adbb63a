package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

// crashChild is what the crash test's child process runs (see TestMain): it
// opens an engine, creates a box, runs one command to completion (writing
// its live events to a file), starts a long command, says "ready" and waits
// to be killed with SIGKILL.
func crashChild(dataDir, image string) {
	fail := func(err error) { fmt.Println("error:", err); os.Exit(2) }
	ctx := context.Background()
	eng, err := boxrun.New(ctx, boxrun.Config{DataDir: dataDir, MaxCPU: 64, MaxMemoryMB: 1 << 16})
	if err != nil {
		fail(err)
	}
	box, err := eng.Create(ctx, boxrun.BoxSpec{Image: image, Name: "survivor", CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	if err != nil {
		fail(err)
	}
	stopped, err := eng.Create(ctx, boxrun.BoxSpec{Image: image, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	if err != nil {
		fail(err)
	}
	if _, err := eng.Stop(ctx, stopped.ID); err != nil {
		fail(err)
	}
	events, err := eng.Stream(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c",
		"for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; sleep 0.05; done; echo written > /home/app/before-crash; sync; exit 3"}})
	if err != nil {
		fail(err)
	}
	var live []boxrun.Event
	for ev := range events {
		live = append(live, ev)
	}
	b, _ := json.Marshal(live)
	if err := os.WriteFile(filepath.Join(dataDir, "live-events.json"), b, 0o600); err != nil {
		fail(err)
	}
	long, err := eng.StartExec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo begun; sleep 1000"}})
	if err != nil {
		fail(err)
	}
	fmt.Printf("ready %s %s %s %s\n", box.ID, stopped.ID, live[0].ExecID, long.ID)
	select {}
}

func TestCrashRecovery(t *testing.T) {
	dataDir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BOXRUN_CRASH_CHILD="+dataDir, "BOXRUN_CRASH_IMAGE="+fx.ociRef)
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, no VMM of this data dir survives the test.
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		for _, pid := range vmmProcesses(dataDir) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if l := sc.Text(); strings.HasPrefix(l, "ready ") || strings.HasPrefix(l, "error:") {
				lines <- l
				return
			}
		}
		close(lines)
	}()
	var line string
	select {
	case line = <-lines:
	case <-time.After(3 * time.Minute):
		t.Fatal("child never became ready")
	}
	f := strings.Fields(line)
	if len(f) != 5 || f[0] != "ready" {
		t.Fatalf("child: %q", line)
	}
	boxID, stoppedID, doneExec, longExec := f[1], f[2], f[3], f[4]
	// Let the long command's first output reach the store, then crash.
	time.Sleep(500 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// The box's VMM outlives the engine; a template's, made in the
	// background (the child's second box of the image starts its image
	// template), dies with it, at once.
	for deadline := time.Now().Add(5 * time.Second); len(vmmProcesses(dataDir)) != 1; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("want the running box's VMM to outlive the engine, and it alone: got %v (boxes' %v)", vmmProcesses(dataDir), boxVMMs(dataDir))
		}
	}
	if got := boxVMMs(dataDir); len(got) != 1 {
		t.Fatalf("want the running box's VMM to outlive the engine: got %v", got)
	}

	ctx := ctxT(t, 2*time.Minute)
	eng, err := boxrun.New(ctx, boxrun.Config{DataDir: dataDir, MaxCPU: 64, MaxMemoryMB: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })

	// A second engine on the same data dir is refused, clearly.
	if _, err := boxrun.New(ctx, boxrun.Config{DataDir: dataDir}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second engine on one data dir: %v", err)
	}

	// The running box was re-attached and is usable, with its disk.
	box, err := eng.Get(ctx, "survivor")
	if err != nil || box.ID != boxID || box.Status != "running" {
		t.Fatalf("survivor after crash: %+v %v", box, err)
	}
	res, err := eng.Exec(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"cat", "/home/app/before-crash"}})
	if err != nil || res.Stdout != "written\n" {
		t.Fatalf("exec in re-attached box: %+v %v", res, err)
	}
	// The killed session's command is gone from the guest.
	if res, _ := eng.Exec(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "ps -o args | grep '^sleep 1000' || true"}}); strings.TrimSpace(res.Stdout) != "" {
		t.Fatalf("orphaned command still runs: %q", res.Stdout)
	}
	if b, err := eng.Get(ctx, stoppedID); err != nil || b.Status != "stopped" {
		t.Fatalf("stopped box after crash: %+v %v", b, err)
	}

	// The exec that was running is finished as failed, with a reason, and
	// its stream ends.
	x, err := eng.GetExec(ctx, longExec)
	if err != nil || x.Status != "failed" || x.ErrorMessage == "" || x.FinishedAt == nil {
		t.Fatalf("orphaned exec: %+v %v", x, err)
	}
	evs := collect(t, eng, longExec)
	if last := evs[len(evs)-1]; last.Type != "exit" || last.Error == "" || evs[0].Data != "begun\n" {
		t.Fatalf("orphaned exec events: %+v", evs)
	}

	// The finished exec replays exactly as it streamed live.
	var live []boxrun.Event
	b, _ := os.ReadFile(filepath.Join(dataDir, "live-events.json"))
	json.Unmarshal(b, &live)
	if replay := collect(t, eng, doneExec); !reflect.DeepEqual(replay, live) || len(live) != 7 {
		t.Fatalf("replay after restart differs:\nlive   %+v\nreplay %+v", live, replay)
	}
	if x, _ := eng.GetExec(ctx, doneExec); x == nil || x.Status != "failed" || x.ExitCode == nil || *x.ExitCode != 3 {
		t.Fatalf("finished exec record: %+v", x)
	}

	// GC and Remove clean up every VMM and file.
	if err := eng.Remove(ctx, boxID, boxrun.Force); err != nil {
		t.Fatal(err)
	}
	if n, err := eng.GC(ctx, 0); err != nil || n != 1 {
		t.Fatalf("GC removed %d (%v), want the stopped box", n, err)
	}
	if left := vmmProcesses(dataDir); len(left) != 0 {
		t.Fatalf("VMMs left: %v", left)
	}
	if got := listDir(t, filepath.Join(dataDir, "boxes")); len(got) != 0 {
		t.Fatalf("box dirs left: %v", got)
	}
	if l, _ := eng.List(ctx); len(l) != 0 {
		t.Fatalf("records left: %d", len(l))
	}
}

func collect(t *testing.T, eng *boxrun.Engine, execID string) []boxrun.Event {
	t.Helper()
	ch, err := eng.ExecEvents(ctxT(t, 30*time.Second), execID)
	if err != nil {
		t.Fatal(err)
	}
	var out []boxrun.Event
	for ev := range ch {
		out = append(out, ev)
	}
	if len(out) == 0 || out[len(out)-1].Type != "exit" {
		t.Fatalf("events of %s did not end with exit: %+v", execID, out)
	}
	return out
}

func TestReplayEqualsLiveStream(t *testing.T) {
	box := sharedBox(t)
	events, err := fx.eng.Stream(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo a; echo b >&2; exit 5"}})
	if err != nil {
		t.Fatal(err)
	}
	var live []boxrun.Event
	for ev := range events {
		live = append(live, ev)
	}
	if replay := collect(t, fx.eng, live[0].ExecID); !reflect.DeepEqual(replay, live) {
		t.Fatalf("replay differs:\nlive   %+v\nreplay %+v", live, replay)
	}
	x, err := fx.eng.GetExec(context.Background(), live[0].ExecID)
	if err != nil || x.Status != "failed" || *x.ExitCode != 5 || x.BoxID != box.ID {
		t.Fatalf("exec record %+v %v", x, err)
	}
	xs, err := fx.eng.ListExecs(context.Background(), box.ID)
	if err != nil || len(xs) == 0 || xs[0].ID != x.ID {
		t.Fatalf("list execs: newest first? %v", err)
	}
}

func TestCancelExec(t *testing.T) {
	box := sharedBox(t)
	ctx := ctxT(t, time.Minute)
	x, err := fx.eng.StartExec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sleep", "777"}})
	if err != nil {
		t.Fatal(err)
	}
	follow, err := fx.eng.ExecEvents(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	got, err := fx.eng.CancelExec(ctx, x.ID)
	if err != nil || got.Status != "canceled" || got.ExitCode != nil || got.FinishedAt == nil {
		t.Fatalf("cancel: %+v %v", got, err)
	}
	var last boxrun.Event
	for ev := range follow { // a live follower gets an exit event, not a hang
		last = ev
	}
	if last.Type != "exit" {
		t.Fatalf("follower's last event %+v", last)
	}
	if _, err := fx.eng.CancelExec(ctx, x.ID); boxrun.CodeOf(err) != "EXEC_ALREADY_FINISHED" {
		t.Fatalf("second cancel: %v", err)
	}
	if res := sh(t, box, "ps -o args | grep '^sleep 777' || true"); strings.TrimSpace(res.Stdout) != "" {
		t.Fatalf("canceled command still runs: %q", res.Stdout)
	}
}
