package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/runtime"
)

// The warm start's known traps, each checked on two boxes restored from
// one template: a restored box must see its own disks (not the template's
// stand-ins, whose capacity and first blocks a guest would have cached
// had it probed them), its own clock, its own randomness, its own
// hostname and MAC, the CPUs and memory it asked for, and working volumes
// and network.
func TestWarmStartTwoBoxesFromOneTemplate(t *testing.T) {
	port := hostServer(t, "host says hi")

	// A shape of its own (3 CPUs, 320 MiB, a NIC, one volume), so that
	// this test makes the template and restores both boxes from it.
	before := fx.eng.Info().Boots
	// On Cloud Hypervisor boxes with volumes boot cold (a restored
	// virtio-fs device hangs with today's virtiofsd): there the boxes
	// have none, so that they are restored.
	withVol := fx.hypervisor != runtime.DriverCloudHypervisor
	spec := func(img string, diskGB int, vol string) boxrun.BoxSpec {
		s := boxrun.BoxSpec{Image: img, CPU: 3, MemoryMB: 320, DiskSizeGB: diskGB, Network: true,
			NetworkPolicy: boxrun.NetworkPolicy{AllowHostPorts: []int{port}}}
		if withVol {
			s.Volumes = []boxrun.Volume{{HostPath: vol, GuestPath: "/mnt/vol"}}
		}
		return s
	}
	volA, volB := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(volA, "who"), []byte("volume A\n"), 0o644)
	os.WriteFile(filepath.Join(volB, "who"), []byte("volume B\n"), 0o644)
	// Two images, whose base disks differ in size but not in size class
	// (disk.SizeClass), and box disks of 2 and 3 GiB: one template serves
	// both. The template's guest probed stand-ins of A's sizes at boot; B's
	// disk (and C's, below) gets its own capacity at the restore.
	a := newBox(t, spec("docker://"+fx.regRef, 2, volA))
	// Let the template grow older than the clock check's slack: a box
	// that kept the template's clock would be caught.
	time.Sleep(3 * time.Second)
	b := newBox(t, spec(fx.ociRef, 3, volB))
	after := fx.eng.Info().Boots
	if after.Templates != before.Templates+1 || after.Warm != before.Warm+2 || after.Fallbacks != before.Fallbacks {
		t.Fatalf("boots before %+v, after %+v: want one template made and two warm starts", before, after)
	}

	ctx := ctxT(t, 3*time.Minute)
	type facts struct{ disk, size, sectors, rnd, uuid, clock, host, mac, cpus, mem, vol, net string }
	probe := func(box *boxrun.Box) facts {
		res := sh(t, box, `
			cat /etc/warm-owner 2>/dev/null || echo none
			df -k / | awk 'NR==2{print $2}'
			cat /sys/block/vdb/size
			head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo
			cat /proc/sys/kernel/random/uuid
			date +%s
			hostname
			cat /sys/class/net/eth0/address
			nproc
			awk '/MemTotal/{print $2}' /proc/meminfo
			cat /mnt/vol/who 2>/dev/null || echo no volume
			wget -qO- http://10.0.2.2:`+strconv.Itoa(port)+`/ ; echo`)
		host := time.Now().Unix()
		l := strings.Split(strings.TrimRight(res.Stdout, "\n"), "\n")
		if len(l) != 12 {
			t.Fatalf("probe of %s: %q %q", box.ID, res.Stdout, res.Stderr)
		}
		if clock, _ := strconv.ParseInt(l[5], 10, 64); clock < host-2 || clock > host+2 {
			t.Errorf("%s: clock %s, host %d: more than 2 s apart", box.ID, l[5], host)
		}
		return facts{l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9], l[10], l[11]}
	}
	// Each box writes to its own disk; the other must not see it.
	for _, box := range []*boxrun.Box{a, b} {
		res, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{User: "root", Cmd: []string{"sh", "-c", "echo " + box.ID + " > /etc/warm-owner"}})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("write in %s: %v %+v", box.ID, err, res)
		}
	}
	fa, fb := probe(a), probe(b)
	t.Logf("box A: %+v", fa)
	t.Logf("box B: %+v", fb)
	if fa.disk != a.ID || fb.disk != b.ID {
		t.Errorf("own disks: A sees %q, B sees %q", fa.disk, fb.disk)
	}
	// The data disks are 2 and 3 GiB: each guest sees its own disk at its
	// own size (a guest that kept the template's capacity for B's could
	// not mount B's file system, which is larger).
	sa, _ := strconv.Atoi(fa.size)
	sb, _ := strconv.Atoi(fb.size)
	if sa < 1_900_000 || sa > 2_100_000 || sb < 2_900_000 || sb > 3_200_000 {
		t.Errorf("file system sizes (KiB): A %d (want ~2 GiB), B %d (want ~3 GiB)", sa, sb)
	}
	if fa.sectors != strconv.Itoa(2<<21) || fb.sectors != strconv.Itoa(3<<21) {
		t.Errorf("disk capacities (sectors): A %s (want %d), B %s (want %d)", fa.sectors, 2<<21, fb.sectors, 3<<21)
	}
	// A smaller disk than the template's: a stale capacity would mount
	// (the file system fits) and show only here.
	c := newBox(t, spec(fx.ociRef, 1, t.TempDir()))
	if got := fx.eng.Info().Boots; got.Templates != after.Templates || got.Warm != after.Warm+1 {
		t.Errorf("boots %+v -> %+v: want box C restored from the same template", after, got)
	}
	if res := sh(t, c, "cat /sys/block/vdb/size"); res.Stdout != strconv.Itoa(1<<21)+"\n" {
		t.Errorf("box C's disk capacity: %q sectors, want %d", res.Stdout, 1<<21)
	}
	after = fx.eng.Info().Boots
	if fa.rnd == fb.rnd || len(fa.rnd) != 64 {
		t.Errorf("/dev/urandom: A %s, B %s", fa.rnd, fb.rnd)
	}
	// Distinct bytes alone do not prove the reseed (the kernel reseeds on
	// its own in early boot, from RDRAND under TCG's max CPU): the agent
	// says on the console that the host's entropy went in.
	for _, box := range []*boxrun.Box{a, b} {
		cons, _ := os.ReadFile(filepath.Join(fx.dataDir, "boxes", box.ID, "console.log"))
		if !strings.Contains(string(cons), `msg="RNG reseeded from the host" bytes=64`) {
			t.Errorf("%s: no reseed from the host on the console:\n%s", box.ID, cons)
		}
		// On QEMU the template's guest bound the disks at boot: a restored
		// box probes none at its Hello (that probe was a tenth of a warm
		// create under TCG). Cloud Hypervisor's guest probes both there.
		probed := "disks_probed=0"
		if fx.hypervisor == runtime.DriverCloudHypervisor {
			probed = "disks_probed=2"
		}
		if !strings.Contains(string(cons), probed) {
			t.Errorf("%s: want %s on the console:\n%s", box.ID, probed, cons)
		}
	}
	checkOwnIdentities(t, restoredBox{a, fa.uuid, fa.host, fa.mac, fa.cpus, fa.mem, fa.net},
		restoredBox{b, fb.uuid, fb.host, fb.mac, fb.cpus, fb.mem, fb.net}, "3", 320, "host says hi")
	if withVol && (fa.vol != "volume A" || fb.vol != "volume B") {
		t.Errorf("volumes: A %q, B %q", fa.vol, fb.vol)
	}
	// A restored box stops and starts (restored again) with its disk.
	if _, err := fx.eng.Stop(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := fx.eng.Start(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if res := sh(t, a, "cat /etc/warm-owner; cat /mnt/vol/who 2>/dev/null || echo no volume"); res.Stdout != a.ID+"\n"+fa.vol+"\n" {
		t.Errorf("after stop/start: %q %q", res.Stdout, res.Stderr)
	}
	if got := fx.eng.Info().Boots; got.Warm != after.Warm+1 {
		t.Errorf("start of a warm box: boots %+v, want one more warm start", got)
	}
}

// A template whose saved state is corrupt costs one cold boot, logged,
// never the box; the next box of the shape makes the template again.
func TestWarmStartCorruptTemplateFallsBack(t *testing.T) {
	spec := boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 288, DiskSizeGB: 1}
	before := fx.eng.Info().Boots
	// Two first boxes of a shape at once: the template is made once.
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			box, err := fx.eng.Create(ctxT(t, 3*time.Minute), spec)
			if err != nil {
				t.Errorf("create: %v", err)
				return
			}
			t.Cleanup(func() { fx.eng.Remove(context.Background(), box.ID, boxrun.Force) })
		}()
	}
	wg.Wait()
	mid := fx.eng.Info().Boots
	if mid.Templates != before.Templates+1 || mid.Warm != before.Warm+2 {
		t.Fatalf("boots %+v -> %+v: want one template and two warm starts", before, mid)
	}
	tpl := newestTemplate(t, filepath.Join(fx.dataDir, "cache", "templates"))
	state := filepath.Join(tpl, "state") // QEMU's device state
	if fx.hypervisor == runtime.DriverCloudHypervisor {
		state = filepath.Join(tpl, "snapshot", "state.json")
	}
	garble(t, state)

	box := newBox(t, spec)
	if res := sh(t, box, "echo ok"); res.Stdout != "ok\n" {
		t.Fatalf("box after a corrupt template: %q", res.Stdout)
	}
	got := fx.eng.Info().Boots
	if got.Fallbacks != mid.Fallbacks+1 || got.Cold != mid.Cold+1 {
		t.Fatalf("boots %+v -> %+v: want one fallback to a cold boot", mid, got)
	}
	if _, err := os.Stat(tpl); !os.IsNotExist(err) {
		t.Fatalf("the corrupt template is still there: %v", err)
	}
	newBox(t, spec)
	if again := fx.eng.Info().Boots; again.Templates != got.Templates+1 || again.Warm != got.Warm+1 {
		t.Fatalf("boots %+v -> %+v: want the template made again and used", got, again)
	}
}

// A template depends on the agent (and kernel, QEMU, flags): an engine
// with another agent makes a new template and drops the old one. With
// the warm start off, boxes boot cold and no template is made.
func TestWarmStartTemplateFollowsAgentAndSwitch(t *testing.T) {
	ctx := ctxT(t, 5*time.Minute)
	dataDir := filepath.Join(t.TempDir(), "data")
	open := func(agent string, warm boxrun.Toggle) *boxrun.Engine {
		eng, err := boxrun.New(ctx, boxrun.Config{
			DataDir: dataDir, RegistriesConf: fx.registriesConf, AgentPath: agent, WarmStart: warm,
			Hypervisor: fx.hypervisor, MaxCPU: 64, MaxMemoryMB: 64 << 10,
			Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		})
		if err != nil {
			t.Fatal(err)
		}
		return eng
	}
	run := func(eng *boxrun.Engine) {
		t.Helper()
		res, err := eng.Run(ctx, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1},
			boxrun.ExecSpec{Cmd: []string{"cat", "/proc/sys/kernel/hostname"}})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("run: %v %+v", err, res)
		}
	}
	// The first engine's agent: the one the suite's engine uses.
	agentA := suiteAgent(t)
	eng := open(agentA, boxrun.Default)
	run(eng)
	if b := eng.Info().Boots; b.Templates != 1 || b.Warm != 1 {
		t.Fatalf("first engine: boots %+v", b)
	}
	eng.Close()
	templates := filepath.Join(dataDir, "cache", "templates")
	first := newestTemplate(t, templates)

	// The same agent with bytes appended: another file, another template.
	b, err := os.ReadFile(agentA)
	if err != nil {
		t.Fatal(err)
	}
	agentB := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agentB, append(b, "changed"...), 0o755); err != nil {
		t.Fatal(err)
	}
	eng = open(agentB, boxrun.Default)
	run(eng)
	if b := eng.Info().Boots; b.Templates != 1 || b.Warm != 1 {
		t.Fatalf("engine with another agent: boots %+v", b)
	}
	eng.Close()
	second := newestTemplate(t, templates)
	if second == first {
		t.Fatal("the template was not made again for the new agent")
	}
	if _, err := os.Stat(first); !os.IsNotExist(err) {
		t.Fatalf("the old agent's template is still there: %v", err)
	}

	eng = open(agentB, boxrun.Disabled)
	run(eng)
	if b := eng.Info().Boots; b.Templates != 0 || b.Warm != 0 || b.Cold != 1 {
		t.Fatalf("warm start off: boots %+v", b)
	}
	if newestTemplate(t, templates) != second {
		t.Fatal("templates changed with the warm start off")
	}
	// Prune drops templates of boot files this engine does not use (here
	// one written by hand) and keeps the current one.
	stale := filepath.Join(templates, "0123456789abcdef01234567")
	os.MkdirAll(stale, 0o700)
	os.WriteFile(filepath.Join(stale, "meta.json"), []byte(`{"boot":"an old kernel"}`), 0o600)
	os.WriteFile(filepath.Join(stale, "ram"), make([]byte, 1<<20), 0o600)
	rep, err := eng.Prune(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale template kept by Prune (report %+v)", rep)
	}
	if _, err := os.Stat(second); err != nil {
		t.Errorf("Prune removed the current template: %v", err)
	}
	if !strings.Contains(strings.Join(rep.CacheFiles, " "), "templates/0123456789abcdef01234567") || rep.BytesFreed < 1<<20 {
		t.Errorf("prune report: %+v", rep)
	}
	eng.Close()
}

// suiteAgent returns the agent binary the suite's engine built (booting
// the shared box first, if no box booted yet).
func suiteAgent(t *testing.T) string {
	t.Helper()
	sharedBox(t)
	agents, _ := filepath.Glob(filepath.Join(fx.dataDir, "cache", "agent-*"))
	if len(agents) == 0 {
		t.Fatal("no agent in the suite's cache")
	}
	return agents[0]
}

// newestTemplate returns the most recently made template in dir.
func newestTemplate(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var best string
	var bestTime time.Time
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		// meta.json is written last, and says when (its time stamps
		// follow the template's use).
		var meta struct{ Created time.Time }
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "meta.json"))
		if err == nil && json.Unmarshal(b, &meta) == nil && meta.Created.After(bestTime) {
			best, bestTime = filepath.Join(dir, e.Name()), meta.Created
		}
	}
	if best == "" {
		t.Fatalf("no template in %s", dir)
	}
	return best
}

// Config.Pool: a box made ahead of time becomes the next box of its image
// and shape. It is the box's own (id, hostname, MAC), gets the box's own
// network policy only when taken, and Close kills what the pool holds.
func TestPoolHandsOutReadyBoxes(t *testing.T) {
	port := hostServer(t, "pooled hi")

	ctx := ctxT(t, 5*time.Minute)
	dataDir := filepath.Join(t.TempDir(), "data")
	eng, err := boxrun.New(ctx, boxrun.Config{
		DataDir: dataDir, RegistriesConf: fx.registriesConf, AgentPath: suiteAgent(t), Pool: 1,
		Hypervisor: fx.hypervisor, MaxCPU: 64, MaxMemoryMB: 64 << 10,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			eng.Close()
		}
	})
	spec := boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 2, Network: true}
	a, err := eng.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: still not after 2 minutes (info %+v)", what, eng.Info())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("the pool fills", func() bool { return eng.Info().PoolVMs == 1 })
	// A Create that fails before it boots (a name in use) puts the
	// pooled box back, its share of the caps with it.
	used := eng.Info().UsedCPU
	dup := spec
	dup.Name = a.ID
	if _, err := eng.Create(ctx, dup); boxrun.CodeOf(err) != boxrun.NameAlreadyExists {
		t.Fatalf("create with a taken name: %v", err)
	}
	if in := eng.Info(); in.PoolVMs != 1 || in.UsedCPU != used {
		t.Fatalf("after a failed create: %d pooled, %d CPUs used (was %d)", in.PoolVMs, in.UsedCPU, used)
	}
	// Another shape (disk size) or volumes: not from the pool.
	if _, err := eng.Run(ctx, boxrun.BoxSpec{Image: spec.Image, CPU: 1, MemoryMB: 256, DiskSizeGB: 1},
		boxrun.ExecSpec{Cmd: []string{"true"}}); err != nil {
		t.Fatal(err)
	}
	if boots := eng.Info().Boots; boots.Pooled != 0 {
		t.Fatalf("boots %+v: a box of another shape came from the pool", boots)
	}
	withPolicy := spec
	withPolicy.NetworkPolicy = boxrun.NetworkPolicy{AllowHostPorts: []int{port}}
	b, err := eng.Create(ctx, withPolicy)
	if err != nil {
		t.Fatal(err)
	}
	if boots := eng.Info().Boots; boots.Pooled != 1 {
		t.Fatalf("boots %+v: want the box from the pool", boots)
	}
	probe := func(box *boxrun.Box) []string {
		res, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c",
			"echo " + box.ID + " > /root/owner; cat /root/owner; hostname; cat /sys/class/net/eth0/address; " +
				"wget -qO- http://10.0.2.2:" + strconv.Itoa(port) + "/ || echo unreachable"}})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("probe %s: %v %+v", box.ID, err, res)
		}
		return strings.Fields(res.Stdout)
	}
	pa, pb := probe(a), probe(b)
	t.Logf("A %v, B %v", pa, pb)
	if len(pb) != 5 || pb[0] != b.ID || pb[1] != b.ID {
		t.Fatalf("pooled box: %v", pb)
	}
	if pa[2] == pb[2] || pb[2] == "52:54:00:00:00:01" {
		t.Errorf("MACs: A %s, B %s", pa[2], pb[2])
	}
	// Each box has its own policy: B may reach the host's port, A not.
	if strings.Join(pb[3:], " ") != "pooled hi" || pa[3] != "unreachable" {
		t.Errorf("network: A %v, B %v", pa[3:], pb[3:])
	}
	// Taking a box refills the pool (and the Run of the other shape made
	// one of that shape); Close kills what it holds.
	waitFor("the pool refills", func() bool { return eng.Info().PoolVMs == 2 })
	if left := boxVMMs(dataDir); len(left) != 4 {
		t.Errorf("VMMs: %v, want two boxes and two pooled ones", left)
	}
	closed = true
	if err := eng.Close(); err != nil {
		t.Fatal(err)
	}
	if left := vmmProcesses(dataDir); len(left) > 0 {
		t.Fatalf("VMMs left after Close: %v", left)
	}
	ents, _ := os.ReadDir(filepath.Join(dataDir, "boxes"))
	if len(ents) != 2 {
		t.Errorf("box dirs after Close: %d, want the two boxes' (the pooled ones removed)", len(ents))
	}
}

// garble overwrites a template's state file past its first 64 bytes
// (its header kept): a corrupt template.
func garble(t *testing.T, state string) {
	t.Helper()
	st, err := os.Stat(state)
	if err != nil {
		t.Fatal(err)
	}
	garbage := make([]byte, st.Size()-64)
	for i := range garbage {
		garbage[i] = byte(i * 7)
	}
	f, err := os.OpenFile(state, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(garbage, 64); err != nil {
		t.Fatal(err)
	}
}

// hostServer serves body over HTTP on a loopback port of the host until
// the test ends, and returns the port.
func hostServer(t *testing.T, body string) int {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, body)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// restoredBox is what a box restored from a template said of itself.
type restoredBox struct {
	box                               *boxrun.Box
	uuid, host, mac, cpus, memKB, net string
}

// checkOwnIdentities checks two boxes restored from one template: each
// has an identity of its own (a UUID of its own making, its id as
// hostname, a MAC of its own, not the template's 52:54:00:00:00:01), the
// CPUs and about the memory (MiB) asked for, and its network (net is what
// the host's server answered).
func checkOwnIdentities(t *testing.T, a, b restoredBox, cpus string, memMiB int, net string) {
	t.Helper()
	if a.uuid == b.uuid {
		t.Errorf("both boxes made UUID %s", a.uuid)
	}
	if a.host != a.box.ID || b.host != b.box.ID {
		t.Errorf("hostnames: %q %q, want the box ids", a.host, b.host)
	}
	if a.mac == b.mac || a.mac == "52:54:00:00:00:01" || !strings.HasPrefix(a.mac, "52:54:00:") {
		t.Errorf("MACs: %s, %s (the template's is 52:54:00:00:00:01)", a.mac, b.mac)
	}
	for _, r := range []restoredBox{a, b} {
		// MemTotal is the memory less what the kernel keeps: within
		// 75 MiB below and 10 MiB above.
		mem, _ := strconv.Atoi(r.memKB)
		if r.cpus != cpus || mem < (memMiB-75)<<10 || mem > (memMiB+10)<<10 {
			t.Errorf("%s: nproc %s, MemTotal %s kB; want %s CPUs and ~%d MiB", r.box.ID, r.cpus, r.memKB, cpus, memMiB)
		}
		if r.net != net {
			t.Errorf("%s: network: %q, want %q", r.box.ID, r.net, net)
		}
	}
}
