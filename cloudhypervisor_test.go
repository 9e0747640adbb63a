package boxrun_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/internal/testenv"
	"github.com/boxrun/boxrun/runtime"
)

// TestCloudHypervisorFakeEndToEnd runs the engine's real code path on the
// Cloud Hypervisor driver, with fakech (runtime/ch/fakech) in place of
// cloud-hypervisor: the engine pulls the image, makes the base and box
// disks, builds the kernel and initramfs, starts "cloud-hypervisor" in its
// own session, creates and boots the VM over the REST API, dials the agent
// through the hybrid vsock socket (CONNECT/OK) and says hello; then it
// execs, streams, copies both ways, re-attaches after an engine that died
// (a child process that exits without Close), stops, starts and removes.
//
// Bypassed, because there is no VM: fakech runs the real agent (the /init
// of the initramfs the engine built) as a host process in its host mode,
// on a box root that fakech extracts from the base disk with debugfs,
// instead of a guest kernel mounting the base and box disks; the box disk
// is not used (the extracted root keeps the box's writes across a stop).
// Volumes and the network need a real VM (fakech refuses them): they are
// covered by the contract test and the TAP test in package runtime, and by
// the integration suite where cloud-hypervisor runs.
func TestCloudHypervisorFakeEndToEnd(t *testing.T) {
	if dir := os.Getenv("BOXRUN_FAKECH_CHILD"); dir != "" {
		fakeCHChild(t, dir)
		return
	}
	chBin := buildFakeCH(t)
	layout := testenv.BusyboxLayout(t)
	data := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// The first engine dies with the box running: a child process that
	// creates it and exits without Close.
	child := exec.Command(os.Args[0], "-test.run=^TestCloudHypervisorFakeEndToEnd$", "-test.v")
	child.Env = append(os.Environ(), "BOXRUN_FAKECH_CHILD="+data, "BOXRUN_FAKECH_BIN="+chBin, "BOXRUN_FAKECH_IMAGE=oci:"+layout+":latest")
	out, err := child.CombinedOutput()
	if err != nil {
		t.Fatalf("child engine: %v\n%s", err, out)
	}
	var boxID string
	for _, line := range strings.Split(string(out), "\n") {
		if id, ok := strings.CutPrefix(line, "FAKECH_BOX="); ok {
			boxID = strings.TrimSpace(id)
		}
	}
	if boxID == "" {
		t.Fatalf("the child did not create a box:\n%s", out)
	}
	t.Cleanup(func() { killFakeCH(data) })

	eng := newFakeCHEngine(t, ctx, data, chBin)
	defer eng.Close()
	in := eng.Info()
	if in.Hypervisor != "cloud-hypervisor" || in.HypervisorVersion != "v53.0" || in.Acceleration != "kvm" {
		t.Errorf("info %+v", in)
	}
	// Re-attached through the API and the vsock socket.
	box, err := eng.Get(ctx, boxID)
	if err != nil {
		t.Fatal(err)
	}
	if box.Status != "running" || !strings.HasPrefix(box.RuntimeID, "cloud-hypervisor:") {
		t.Fatalf("after the engine restart: %+v", box)
	}
	if in := eng.Info(); in.Boxes != 1 {
		t.Errorf("running boxes %d after re-attach", in.Boxes)
	}
	res, err := eng.Exec(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"cat", "/root/from-child"}})
	if err != nil || res.Stdout != "written before the engine died\n" {
		t.Fatalf("after re-attach: %+v, %v", res, err)
	}

	// Exec: output, exit code, env.
	res, err = eng.Exec(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo hi; echo err >&2; echo $BOX_VAR; exit 3"}})
	if err != nil || res.ExitCode != 3 || res.Stdout != "hi\nfrom-box\n" || res.Stderr != "err\n" {
		t.Fatalf("exec: %+v, %v", res, err)
	}
	// Stream: ordered log events, then one exit.
	events, err := eng.Stream(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "for i in 1 2 3; do echo $i; done"}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for ev := range events {
		switch ev.Type {
		case "log":
			got = append(got, strings.TrimSpace(ev.Data))
		case "exit":
			got = append(got, "exit="+strconv.Itoa(ev.ExitCode))
		}
	}
	if strings.Join(got, ",") != "1,2,3,exit=0" && strings.Join(got, ",") != "1\n2\n3,exit=0" {
		if joined := strings.Join(got, ""); strings.ReplaceAll(joined, "\n", "") != "123exit=0" {
			t.Errorf("stream events %q", got)
		}
	}
	// Copy in and out.
	host := filepath.Join(t.TempDir(), "in.txt")
	os.WriteFile(host, []byte("payload from the host\n"), 0o644)
	if err := eng.Copy(ctx, host, boxID+":/root/in.txt"); err != nil {
		t.Fatal(err)
	}
	res, err = eng.Exec(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "cat /root/in.txt; echo from the box > /root/out.txt"}})
	if err != nil || res.Stdout != "payload from the host\n" {
		t.Fatalf("copied file in the box: %+v, %v", res, err)
	}
	outDir := t.TempDir()
	if err := eng.Copy(ctx, boxID+":/root/out.txt", outDir+"/out.txt"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(outDir + "/out.txt"); string(b) != "from the box\n" {
		t.Errorf("copied out %q", b)
	}

	// Stop: the agent powers the "VM" off, and the VMM exits, as CH does.
	stopped, err := eng.Stop(ctx, boxID)
	if err != nil || stopped.Status != "stopped" {
		t.Fatalf("stop: %+v, %v", stopped, err)
	}
	if pids := fakeCHPids(data); len(pids) > 0 {
		t.Errorf("VMM processes after stop: %v", pids)
	}
	// The serial port reached the engine's capped console relay.
	if b, _ := os.ReadFile(filepath.Join(data, "boxes", boxID, "console.log")); !strings.Contains(string(b), "boxrun-agent: ") {
		t.Errorf("console.log has no agent output: %q", b)
	}
	// Start again: what the box wrote is still there.
	if _, err := eng.Start(ctx, boxID); err != nil {
		t.Fatal(err)
	}
	res, err = eng.Exec(ctx, boxID, boxrun.ExecSpec{Cmd: []string{"cat", "/root/out.txt"}})
	if err != nil || res.Stdout != "from the box\n" {
		t.Fatalf("after restart: %+v, %v", res, err)
	}
	// Remove while running: vm.shutdown, vmm.shutdown; nothing left.
	if err := eng.Remove(ctx, boxID, boxrun.Force); err != nil {
		t.Fatal(err)
	}
	if pids := fakeCHPids(data); len(pids) > 0 {
		t.Errorf("VMM processes after remove: %v", pids)
	}
	if _, err := os.Stat(filepath.Join(data, "boxes", boxID)); !os.IsNotExist(err) {
		t.Errorf("box dir after remove: %v", err)
	}
}

// TestCloudHypervisorFakeWarmStart runs the warm start on the Cloud
// Hypervisor driver, fakech in place of cloud-hypervisor (see
// TestCloudHypervisorFakeEndToEnd for what it bypasses): the first box of
// a shape makes a template (vm.pause, vm.snapshot) and is restored from it
// (vm.restore with the box's own disks, vm.resume), as is the next one; a
// box with a bigger disk gets a template of its own (fakech refuses a
// restore whose disk sizes differ from the snapshot's, as CH would show
// the guest the template's capacity); Stop/Start restores again with the
// box's files kept; a corrupt state.json costs one cold boot and the
// template, which the next box makes again; a CH that may not restore
// memory on demand restores by copying it; a VMM whose restores keep
// failing backs the shape off to cold boots.
func TestCloudHypervisorFakeWarmStart(t *testing.T) {
	chBin := buildFakeCH(t)
	ref := "oci:" + testenv.BusyboxLayout(t) + ":latest"
	data := t.TempDir()
	t.Cleanup(func() { killFakeCH(data) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	eng := newFakeCHEngine(t, ctx, data, chBin)
	defer eng.Close()

	boots := func(want boxrun.BootStats) {
		t.Helper()
		if got := eng.Info().Boots; got != want {
			t.Fatalf("boots %+v, want %+v", got, want)
		}
	}
	create := func(gb int) *boxrun.Box {
		t.Helper()
		b, err := eng.Create(ctx, boxrun.BoxSpec{Image: ref, CPU: 1, MemoryMB: 256, DiskSizeGB: gb})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { eng.Remove(context.Background(), b.ID, boxrun.Force) })
		return b
	}
	exec := func(id, cmd string) string {
		t.Helper()
		res, err := eng.Exec(ctx, id, boxrun.ExecSpec{Cmd: []string{"sh", "-c", cmd}})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("exec %q in %s: %+v, %v", cmd, id, res, err)
		}
		return res.Stdout
	}
	templates := func() []string {
		m, _ := filepath.Glob(filepath.Join(data, "cache", "templates", "*", "snapshot", "state.json"))
		return m
	}

	a := create(1)
	boots(boxrun.BootStats{Warm: 1, Templates: 1})
	b := create(1)
	boots(boxrun.BootStats{Warm: 2, Templates: 1})
	if tpl := templates(); len(tpl) != 1 {
		t.Fatalf("templates %v", tpl)
	}
	// Only the snapshot and its meta: no stand-in, socket or log.
	ents, _ := os.ReadDir(filepath.Dir(filepath.Dir(templates()[0])))
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "meta.json snapshot" {
		t.Errorf("template dir holds %v", names)
	}
	exec(a.ID, "echo in a > /root/mine")
	if out := exec(b.ID, "cat /root/mine 2>/dev/null || echo none"); out != "none\n" {
		t.Errorf("box b sees box a's file: %q", out)
	}
	for _, id := range []string{a.ID, b.ID} {
		if _, err := os.Stat(filepath.Join(data, "boxes", id, "restore")); !os.IsNotExist(err) {
			t.Errorf("box %s keeps its restore dir: %v", id, err)
		}
	}

	// Another disk size: a template of its own, restored with that size.
	create(2)
	boots(boxrun.BootStats{Warm: 3, Templates: 2})

	// Stop/Start: restored again, the box's files kept.
	if _, err := eng.Stop(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := eng.Start(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	boots(boxrun.BootStats{Warm: 4, Templates: 2})
	if out := exec(a.ID, "cat /root/mine"); out != "in a\n" {
		t.Errorf("after stop/start: %q", out)
	}

	// A corrupt state.json: one cold boot, and the template goes.
	for _, p := range templates() {
		if err := os.WriteFile(p, []byte("garbage"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c := create(1)
	boots(boxrun.BootStats{Cold: 1, Warm: 4, Templates: 2, Fallbacks: 1})
	exec(c.ID, "true")
	if tpl := templates(); len(tpl) != 1 { // the 2 GiB one, still corrupt
		t.Errorf("templates after the fallback: %v", tpl)
	}
	create(1)
	boots(boxrun.BootStats{Cold: 1, Warm: 5, Templates: 3, Fallbacks: 1})

	// A CH that may not use userfaultfd: the box is restored by copying
	// the memory instead, still warm.
	// (Each box from here on is removed at once: the engine's CPU cap.)
	once := func() {
		t.Helper()
		if err := eng.Remove(ctx, create(1).ID, boxrun.Force); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("FAKECH_NO_ONDEMAND", "1")
	once()
	boots(boxrun.BootStats{Cold: 1, Warm: 6, Templates: 3, Fallbacks: 1})

	// A VMM that cannot restore at all: the template is made again once,
	// and after the second failure in a row the shape boots cold without
	// making one each time.
	t.Setenv("FAKECH_FAIL_RESTORE", "1")
	once()
	boots(boxrun.BootStats{Cold: 2, Warm: 6, Templates: 3, Fallbacks: 2})
	once()
	boots(boxrun.BootStats{Cold: 3, Warm: 6, Templates: 4, Fallbacks: 3})
	once()
	boots(boxrun.BootStats{Cold: 4, Warm: 6, Templates: 4, Fallbacks: 3})

	for _, box := range []string{a.ID, b.ID, c.ID} {
		if err := eng.Remove(ctx, box, boxrun.Force); err != nil {
			t.Fatal(err)
		}
	}
}

// buildFakeCH builds fakech as a "cloud-hypervisor" binary, or skips the
// test when this host cannot run it.
func buildFakeCH(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the fake cloud-hypervisor's agent chroots into the box root: needs root")
	}
	for _, tool := range []string{"debugfs", "mkfs.ext4", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	if _, err := runtime.FindKernel(""); err != nil {
		t.Skip(err)
	}
	chBin := filepath.Join(t.TempDir(), "cloud-hypervisor")
	build := exec.Command("go", "build", "-o", chBin, "github.com/boxrun/boxrun/runtime/ch/fakech")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build fakech: %v\n%s", err, out)
	}
	return chBin
}

func newFakeCHEngine(t *testing.T, ctx context.Context, data, chBin string) *boxrun.Engine {
	t.Helper()
	eng, err := boxrun.New(ctx, boxrun.Config{
		DataDir: data, Hypervisor: "cloud-hypervisor", CloudHypervisor: chBin,
		MaxCPU: 8, MaxMemoryMB: 8192, BootTimeout: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

// fakeCHChild is the engine that dies: it creates a box, writes a file in
// it and exits without closing the engine.
func fakeCHChild(t *testing.T, data string) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	eng := newFakeCHEngine(t, ctx, data, os.Getenv("BOXRUN_FAKECH_BIN"))
	box, err := eng.Create(ctx, boxrun.BoxSpec{
		Image: os.Getenv("BOXRUN_FAKECH_IMAGE"), CPU: 1, MemoryMB: 256, DiskSizeGB: 1,
		Env: map[string]string{"BOX_VAR": "from-box"},
	})
	if err != nil {
		t.Fatal(err)
	}
	res, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo written before the engine died > /root/from-child"}})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec in the child: %+v, %v", res, err)
	}
	fmt.Printf("FAKECH_BOX=%s\n", box.ID)
	os.Exit(0) // no Close: the box outlives its engine
}

// fakeCHPids lists the fakech processes running in a box dir under data.
func fakeCHPids(data string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, _ := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		comm, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		stat, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		zombie := strings.Contains(string(stat), ") Z ")
		if strings.HasPrefix(cwd, data) && strings.HasPrefix(string(comm), "cloud-hyperviso") && !zombie {
			pids = append(pids, pid)
		}
	}
	return pids
}

func killFakeCH(data string) {
	for _, pid := range fakeCHPids(data) {
		if p, err := os.FindProcess(pid); err == nil {
			p.Kill()
		}
	}
}
