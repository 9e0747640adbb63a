package integration

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

// busyboxTree writes a minimal root filesystem (busybox and its applets)
// into dir: a host tree as a container runtime hands it over.
func busyboxTree(t *testing.T, dir string) {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("busybox-static is needed (scripts/setup.sh): %v", err)
	}
	for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "bin/busybox"), bb, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"sh", "cat", "echo", "sleep", "ls", "id"} {
		os.Symlink("busybox", filepath.Join(dir, "bin", a))
	}
	os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc/group"), []byte("root:x:0:\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc/tree-marker"), []byte("from the host tree\n"), 0o644)
}

// TestRootfsBoxesShareOneBaseAndTemplate boots boxes on a host tree
// (BoxSpec.Rootfs) from two engines on their own data dirs and one shared
// dir, as containerd's shim processes do: the tree becomes one base disk,
// the second engine restores from the first one's template, each box
// writes to its own disk only, and Usage and SignalExec work on them.
func TestRootfsBoxesShareOneBaseAndTemplate(t *testing.T) {
	ctx := ctxT(t, 5*time.Minute)
	tmp := t.TempDir()
	tree := filepath.Join(tmp, "tree")
	busyboxTree(t, tree)
	shared := filepath.Join(tmp, "shared")
	open := func(name string) *boxrun.Engine {
		eng, err := boxrun.New(ctx, boxrun.Config{
			Hypervisor: fx.hypervisor, DataDir: filepath.Join(tmp, name), SharedDir: shared,
			MaxCPU: 64, MaxMemoryMB: 64 << 10,
			Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			boxes, _ := eng.List(context.Background())
			for _, b := range boxes {
				eng.Remove(context.Background(), b.ID, boxrun.Force)
			}
			eng.Close()
			if left := vmmProcesses(filepath.Join(tmp, name)); len(left) > 0 {
				t.Errorf("VMMs left by engine %s: %v", name, left)
			}
		})
		return eng
	}
	spec := boxrun.BoxSpec{Rootfs: &boxrun.Rootfs{Dir: tree, Key: "busybox-tree-1", Sources: []string{tree}}, CPU: 1, MemoryMB: 256, DiskSizeGB: 1}

	// Bad input first: nothing is made.
	bad := open("bad")
	for _, s := range []boxrun.BoxSpec{
		{Rootfs: &boxrun.Rootfs{Dir: "relative", Key: "k"}},
		{Rootfs: &boxrun.Rootfs{Dir: filepath.Join(tree, "etc/passwd"), Key: "k"}},
		{Rootfs: &boxrun.Rootfs{Dir: tree, Key: "../k"}},
		{Rootfs: &boxrun.Rootfs{Dir: tree, Key: "k"}, Image: "busybox"},
	} {
		if _, err := bad.Create(ctx, s); boxrun.CodeOf(err) != boxrun.ValidationError {
			t.Errorf("Create(%+v) = %v, want VALIDATION_ERROR", *s.Rootfs, err)
		}
	}

	a, b := open("a"), open("b")
	boxA, err := a.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	boxB, err := b.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if boots := b.Info().Boots; boots.Warm != 1 || boots.Templates != 0 {
		t.Errorf("second engine's boots = %+v; want one warm start from the first one's template", boots)
	}
	bases, _ := filepath.Glob(filepath.Join(shared, "bases", "rootfs-*.ext4"))
	if len(bases) != 1 {
		t.Errorf("base disks of the tree in the shared dir: %v; want one", bases)
	}
	if own, _ := filepath.Glob(filepath.Join(tmp, "a", "bases", "*")); len(own) > 0 {
		t.Errorf("engine a made base disks of its own: %v", own)
	}
	run := func(eng *boxrun.Engine, box, script string) string {
		t.Helper()
		res, err := eng.Exec(ctx, box, boxrun.ExecSpec{Cmd: []string{"sh", "-c", script}})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("%q: %v %+v", script, err, res)
		}
		return res.Stdout
	}
	if got := run(a, boxA.ID, "cat /etc/tree-marker; echo written-in-a > /etc/tree-marker; cat /etc/tree-marker"); got != "from the host tree\nwritten-in-a\n" {
		t.Errorf("box a: %q", got)
	}
	if got := run(b, boxB.ID, "cat /etc/tree-marker"); got != "from the host tree\n" {
		t.Errorf("box b sees %q: box a's write leaked", got)
	}
	if got, _ := os.ReadFile(filepath.Join(tree, "etc/tree-marker")); string(got) != "from the host tree\n" {
		t.Errorf("the host tree was written: %q", got)
	}

	// Usage: the guest's own figures.
	u, err := a.Usage(ctx, boxA.ID)
	if err != nil {
		t.Fatal(err)
	}
	if u.MemTotal < 150<<20 || u.MemTotal > 256<<20 || u.MemUsed == 0 || u.MemUsed >= u.MemTotal || u.CPUUsec == 0 || u.Processes < 2 {
		t.Errorf("usage of a 256 MiB box: %+v", u)
	}

	// SignalExec: the command's own handler runs.
	info, events, err := a.StreamExec(ctx, boxA.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c",
		`trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.1; done`}})
	if err != nil {
		t.Fatal(err)
	}
	if info.Pid <= 1 {
		t.Errorf("exec pid %d", info.Pid)
	}
	var out strings.Builder
	var exit boxrun.Event
	for ev := range events {
		if ev.Type == "exit" {
			exit = ev
			break
		}
		out.WriteString(ev.Data)
		if strings.Contains(out.String(), "ready") && !strings.Contains(out.String(), "sent") {
			if err := a.SignalExec(ctx, info.ID, syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			out.WriteString("sent")
		}
	}
	if exit.ExitCode != 3 || !strings.Contains(out.String(), "got-term") {
		t.Errorf("after SIGTERM: exit %+v, output %q", exit, out.String())
	}
	if err := a.SignalExec(ctx, info.ID, syscall.SIGTERM); boxrun.CodeOf(err) != "EXEC_ALREADY_FINISHED" {
		t.Errorf("signal to a finished exec: %v", err)
	}
	if err := a.SignalExec(ctx, "exec_nope", syscall.SIGTERM); err == nil {
		t.Error("signal to an unknown exec: no error")
	}

	// Stop and Start keep the box's disk; the base comes from the tree's key.
	if _, err := a.Stop(ctx, boxA.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Start(ctx, boxA.ID); err != nil {
		t.Fatal(err)
	}
	if got := run(a, boxA.ID, "cat /etc/tree-marker"); got != "written-in-a\n" {
		t.Errorf("after Stop/Start: %q", got)
	}

	// PruneRootfs: the base stays while a box uses it or its sources
	// exist, and goes once they are gone.
	if removed, err := a.PruneRootfs(ctx); err != nil || len(removed) != 0 {
		t.Errorf("PruneRootfs with the tree in place: %v %v", removed, err)
	}
	os.Rename(tree, tree+".gone")
	if removed, err := a.PruneRootfs(ctx); err != nil || len(removed) != 0 {
		t.Errorf("PruneRootfs while box a uses the base: %v %v", removed, err)
	}
	for _, x := range []struct {
		eng *boxrun.Engine
		id  string
	}{{a, boxA.ID}, {b, boxB.ID}} {
		if err := x.eng.Remove(ctx, x.id, boxrun.Force); err != nil {
			t.Fatal(err)
		}
	}
	if removed, err := a.PruneRootfs(ctx); err != nil || len(removed) != 1 {
		t.Errorf("PruneRootfs with the tree gone and no box: %v %v; want the base removed", removed, err)
	}
	if left, _ := filepath.Glob(filepath.Join(shared, "bases", "rootfs-*")); len(left) != 0 {
		t.Errorf("left in the shared bases: %v", left)
	}
}

// TestExecInRootOfTheBox runs commands chrooted into a directory of a box
// (ExecSpec.Root, a pod's container in the containerd shim) given over a
// volume: they see that tree as "/", with /proc, /sys and /dev of their
// own; a hostile tree's symlinked /proc and /dev cannot make the agent
// mount over the box's own files; ReleaseRoot unmounts what it mounted.
func TestExecInRootOfTheBox(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	pod := t.TempDir()
	good, evil := filepath.Join(pod, "good"), filepath.Join(pod, "evil")
	busyboxTree(t, good)
	busyboxTree(t, evil)
	os.RemoveAll(filepath.Join(evil, "proc"))
	os.RemoveAll(filepath.Join(evil, "dev"))
	os.Symlink("/../../../etc", filepath.Join(evil, "proc"))
	os.Symlink("../../../../bin", filepath.Join(evil, "dev"))
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1,
		Volumes: []boxrun.Volume{{HostPath: pod, GuestPath: "/pod"}}})
	run := func(root, script string) (string, int) {
		t.Helper()
		res, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Root: root, Cmd: []string{"sh", "-c", script}})
		if err != nil {
			t.Fatalf("exec in %s: %v", root, err)
		}
		return res.Stdout + res.Stderr, res.ExitCode
	}
	out, code := run("/pod/good", "cat /etc/tree-marker; ls /proc/self/fd >/dev/null && echo proc-ok; test -c /dev/null && echo dev-ok; ls /sys/kernel >/dev/null && echo sys-ok; id -u")
	if code != 0 || out != "from the host tree\nproc-ok\ndev-ok\nsys-ok\n0\n" {
		t.Errorf("in the tree: exit %d, %q", code, out)
	}
	// The symlinks resolve inside the tree: its own /etc gets the proc
	// mount, the box's /etc and /bin stay as they were.
	// (Whether the exec then runs or fails does not matter.)
	fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Root: "/pod/evil", Cmd: []string{"true"}})
	if res := sh(t, box, "ls /bin/sh /etc/passwd; test -e /etc/self && echo proc-on-etc; test -e /bin/null && echo dev-on-bin; awk '$2 == \"/etc\" || $2 == \"/bin\"' /proc/mounts | wc -l"); res.Stdout != "/bin/sh\n/etc/passwd\n0\n" {
		t.Errorf("the box's own files after a hostile root: %q %q", res.Stdout, res.Stderr)
	}
	if err := fx.eng.ReleaseRoot(ctx, box.ID, "/pod/good"); err != nil {
		t.Fatal(err)
	}
	if mounts := sh(t, box, "grep -c /pod/good /proc/mounts || true").Stdout; mounts != "0\n" {
		t.Errorf("mounts left in the tree after ReleaseRoot: %s", mounts)
	}
	for _, bad := range []string{"relative", "/"} {
		if _, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Root: bad, Cmd: []string{"true"}}); boxrun.CodeOf(err) != boxrun.ValidationError {
			t.Errorf("root %q: %v; want VALIDATION_ERROR", bad, err)
		}
	}
	if _, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Root: "/pod/none", Cmd: []string{"true"}}); err == nil {
		t.Error("a root that does not exist: no error")
	}
}
