package boxrun

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	goruntime "runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/runtime"
)

// These tests drive the pool's and the warm start's bookkeeping with
// stand-in VMs: what they check (lock order, caps, lock files) involves
// no guest. The integration tests boot real ones.

// standInVM is a VM that is "running" until died is closed.
type standInVM struct {
	died chan struct{}
	once sync.Once
}

func newStandInVM() *standInVM                                             { return &standInVM{died: make(chan struct{})} }
func (v *standInVM) PID() int                                              { return 0 }
func (v *standInVM) DialAgent(context.Context) (io.ReadWriteCloser, error) { return nil, io.EOF }
func (v *standInVM) DialNetwork(context.Context) (io.ReadWriteCloser, error) {
	return nil, io.EOF
}
func (v *standInVM) Done() <-chan struct{} { return v.died }
func (v *standInVM) Kill() error           { v.once.Do(func() { close(v.died) }); return nil }
func (v *standInVM) Console() string       { return "" }

func testEngine(t *testing.T, pool int) *Engine {
	t.Helper()
	return &Engine{cfg: Config{MaxCPU: 64, MaxMemoryMB: 1 << 20}, hv: &runtime.QEMU{},
		log: slog.New(slog.DiscardHandler), warm: &warmStart{}, pool: newPool(pool),
		live: map[string]*liveBox{}, busy: map[string]bool{}}
}

// pooledStandIn is an idle pooled box as pool.make leaves it: its share
// of the caps reserved.
func pooledStandIn(t *testing.T, e *Engine, spec BoxSpec) (*pooledBox, *standInVM) {
	t.Helper()
	if err := e.reserve(spec.CPU, spec.MemoryMB); err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	t.Cleanup(func() { b.Close() })
	vm := newStandInVM()
	pb := &pooledBox{id: newID("box_"), dir: t.TempDir(), key: poolKey(spec.Image, spec.CPU, spec.MemoryMB, spec.DiskSizeGB, spec.Network),
		cpu: spec.CPU, mem: spec.MemoryMB, unpin: func() {},
		lb: &liveBox{vm: vm, agent: agentexec.NewClient(a, slog.New(slog.DiscardHandler))}}
	return pb, vm
}

// idleStandIn is pooledStandIn, idle in e's pool.
func idleStandIn(t *testing.T, e *Engine, spec BoxSpec) (*pooledBox, *standInVM) {
	pb, vm := pooledStandIn(t, e, spec)
	e.pool.mu.Lock()
	e.pool.idleNow(e, pb)
	e.pool.mu.Unlock()
	return pb, vm
}

// pollInfo calls e.Info in a loop, as a dashboard polling /v1/info
// would, until the returned stop is called.
func pollInfo(e *Engine) (stop func()) {
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-quit:
				return
			default:
				e.Info()
			}
		}
	}()
	return func() { close(quit); wg.Wait() }
}

// Info takes the engine's lock and asks the pool for its count; a Create
// taking a pooled box held the pool's lock while giving the box's share
// back under the engine's: the two deadlocked (a dashboard polling
// /v1/info while boxes were created from the pool).
func TestPoolTakeAndInfoDoNotDeadlock(t *testing.T) {
	e := testEngine(t, 1)
	spec := BoxSpec{Image: "img", CPU: 1, MemoryMB: 64, DiskSizeGB: 1}
	stopInfo := pollInfo(e)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 3000; i++ {
			pb, _ := pooledStandIn(t, e, spec)
			e.pool.mu.Lock()
			e.pool.idle[pb.key] = append(e.pool.idle[pb.key], pb)
			e.pool.mu.Unlock()
			if e.pool.take(e, &spec) != pb {
				t.Error("take did not hand out the idle box")
				return
			}
			e.pool.claimed(pb.id)
		}
	}()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("pool.take and Engine.Info deadlocked")
	}
	stopInfo()
	if i := e.Info(); i.UsedCPU != 0 || i.UsedMemoryMB != 0 {
		t.Fatalf("after every pooled box was taken: used %d CPUs, %d MiB; want none", i.UsedCPU, i.UsedMemoryMB)
	}
}

// Close discards the idle boxes; it held the pool's lock while giving
// their shares back, against Info the same way.
func TestPoolCloseAndInfoDoNotDeadlock(t *testing.T) {
	for round := 0; round < 200; round++ {
		e := testEngine(t, 4)
		spec := BoxSpec{Image: "img", CPU: 1, MemoryMB: 64, DiskSizeGB: 1}
		for i := 0; i < 4; i++ {
			idleStandIn(t, e, spec)
		}
		stopInfo := pollInfo(e)
		closed := make(chan struct{})
		go func() { e.pool.close(e); close(closed) }()
		select {
		case <-closed:
		case <-time.After(30 * time.Second):
			t.Fatal("pool.close and Engine.Info deadlocked")
		}
		stopInfo()
		if i := e.Info(); i.UsedCPU != 0 || i.PoolVMs != 0 {
			t.Fatalf("after close: used %d CPUs, %d pooled VMs; want none", i.UsedCPU, i.PoolVMs)
		}
	}
}

// An idle pooled box whose VM dies (the host's OOM killer, a crash)
// leaves the pool at once and gives back its share of the caps: it held
// it for ever (or, taken later by a Create, was discarded without giving
// it back), and each such death lowered what the engine could run.
func TestPoolDeadIdleBoxGivesBackItsShare(t *testing.T) {
	e := testEngine(t, 2)
	spec := BoxSpec{Image: "img", CPU: 2, MemoryMB: 512, DiskSizeGB: 1}
	pb, vm := idleStandIn(t, e, spec)
	if i := e.Info(); i.UsedCPU != 2 || i.PoolVMs != 1 {
		t.Fatalf("idle pooled box: used %d CPUs, %d pooled; want 2, 1", i.UsedCPU, i.PoolVMs)
	}
	vm.Kill()
	deadline := time.Now().Add(10 * time.Second)
	for {
		i := e.Info()
		if i.UsedCPU == 0 && i.UsedMemoryMB == 0 && i.PoolVMs == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 s after the idle box's VM died: used %d CPUs, %d MiB, %d pooled; want none", i.UsedCPU, i.UsedMemoryMB, i.PoolVMs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(pb.dir); !os.IsNotExist(err) {
		t.Fatalf("the dead pooled box's dir is still there: %v", err)
	}

	// Found dead by a Create before its watch did: the same.
	e2 := testEngine(t, 2)
	pb2, vm2 := pooledStandIn(t, e2, spec)
	vm2.Kill()
	e2.pool.idle[pb2.key] = []*pooledBox{pb2}
	if got := e2.pool.take(e2, &spec); got != nil {
		t.Fatal("take handed out a box whose VM died")
	}
	deadline = time.Now().Add(10 * time.Second)
	for e2.Info().UsedCPU != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("a dead pooled box that take skipped still holds %d CPUs", e2.Info().UsedCPU)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A Create or Start that claims its box after Close began is refused:
// Close waits only for the claims it finds, so a boot claimed later would
// leave a VM running behind a closed engine. Stop and Remove still claim
// (Close stops boxes through them).
func TestClaimAfterCloseRefusesBoots(t *testing.T) {
	e := testEngine(t, 0)
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	if _, err := e.claim("box_a", true); err == nil {
		t.Fatal("a boot was claimed on a closed engine")
	}
	release, err := e.claim("box_a", false)
	if err != nil {
		t.Fatalf("stop/remove claim on a closing engine: %v", err)
	}
	release()
}

// A template build's dir is locked from the moment it exists: an engine
// that finds one whose lock nobody holds removes it (and its VM) however
// young it is, and leaves a live build alone.
func TestBuildDirLockDecides(t *testing.T) {
	w := &warmStart{dir: t.TempDir()}
	dir, unlock, err := w.newBuildDir()
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(dir) != w.dir || filepath.Base(dir)[:7] != ".build-" {
		t.Fatalf("build dir %s", dir)
	}
	if !building(dir) {
		t.Fatal("a build whose engine holds its lock is not reported in progress")
	}
	// From another open file description, as another engine would.
	f, err := os.Open(filepath.Join(dir, buildLock))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil {
		t.Fatal("the build's lock is not held")
	}
	unlock() // the engine died: its lock went with it
	if building(dir) {
		t.Fatal("a build seconds old whose lock nobody holds is reported in progress")
	}
	// No .new-* dir stays behind a build dir made.
	if m, _ := filepath.Glob(filepath.Join(w.dir, ".new-*")); len(m) != 0 {
		t.Fatalf("left behind: %v", m)
	}
}

// killVMIn kills the VMM whose pid file is in dir only if that process
// runs in dir, also when dir is named through a symlink (the process's
// cwd is the resolved path).
func TestKillVMInThroughSymlink(t *testing.T) {
	real := t.TempDir()
	link := filepath.Join(t.TempDir(), "data")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	start := func(dir string) *os.Process {
		p, err := os.StartProcess("/bin/sleep", []string{"sleep", "60"}, &os.ProcAttr{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Kill(); p.Wait() })
		return p
	}
	exited := func(p *os.Process) bool {
		done := make(chan struct{})
		go func() { p.Wait(); close(done) }()
		select {
		case <-done:
			return true
		case <-time.After(5 * time.Second):
			return false
		}
	}
	// A process elsewhere with that pid file: not ours, left alone.
	other := start(t.TempDir())
	os.WriteFile(filepath.Join(real, "qemu.pid"), []byte(itoa(other.Pid)), 0o600)
	killVMIn(link)
	if syscall.Kill(other.Pid, 0) != nil {
		t.Fatal("killVMIn killed a process that does not run in the dir")
	}
	p := start(real)
	os.WriteFile(filepath.Join(real, "qemu.pid"), []byte(itoa(p.Pid)+"\n"), 0o600)
	killVMIn(link)
	if !exited(p) {
		t.Fatal("killVMIn(symlink to the dir) left the VMM running")
	}
}

func itoa(n int) string {
	b := []byte{}
	for {
		b = append([]byte{byte('0' + n%10)}, b...)
		if n /= 10; n == 0 {
			return string(b)
		}
	}
}

// Boxes restored from one corrupt template at once all fail; that is one
// failed template, not several: the first removes it, the next box makes
// it again, and only a second build failing backs the shape off.
func TestRestoreFailuresCountPerBuild(t *testing.T) {
	w := &warmStart{dir: t.TempDir(), snap: &runtime.QEMU{}, locks: map[string]*sync.Mutex{}}
	const key = "k"
	make := func() uint64 {
		dir := filepath.Join(w.dir, key)
		os.MkdirAll(dir, 0o700)
		for _, f := range append(w.snap.TemplateFiles(), "meta.json") {
			os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600)
		}
		if !w.complete(dir) {
			t.Fatal("stand-in template incomplete")
		}
		return w.stateIno(dir)
	}
	ino := make()
	// Kept alive, so that the next build's state file gets another inode.
	keep := filepath.Join(t.TempDir(), "state")
	if err := os.Link(filepath.Join(w.dir, key, w.snap.TemplateFiles()[1]), keep); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ { // three boxes failed on the same build
		w.restoreFailed(key, ino)
	}
	if w.complete(filepath.Join(w.dir, key)) {
		t.Fatal("the failed template is still there")
	}
	if w.backingOff(key) {
		t.Fatal("one failed build backed the shape off: the next box should make it again")
	}
	w.restoreFailed(key, ino) // a late one, on a build already gone
	if w.backingOff(key) {
		t.Fatal("a failure on a template already removed counted")
	}
	ino2 := make()
	if ino2 == ino {
		t.Fatal("the new build has the old one's inode")
	}
	w.restoreFailed(key, ino2)
	if !w.backingOff(key) {
		t.Fatal("a second build failing in a row did not back the shape off")
	}
}

// Exec keeps the last MaxOutputBytes of a stream, whatever the chunks,
// and counts the rest.
func TestTailBuffer(t *testing.T) {
	for _, max := range []int64{1, 7, 64, 1000} {
		for _, chunk := range []int{1, 3, 63, 64, 65, 999, 5000} {
			var all []byte
			b := tailBuffer{max: max}
			for i := 0; len(all) < 20000; i++ {
				p := make([]byte, chunk)
				for j := range p {
					p[j] = byte('a' + (len(all)+j)%26)
				}
				all = append(all, p...)
				b.write(string(p))
				if int64(cap(b.buf)) > 2*max+int64(chunk) && int64(len(b.buf)) > 2*max {
					t.Fatalf("max %d chunk %d: holds %d bytes", max, chunk, len(b.buf))
				}
			}
			got, dropped := b.result()
			want := string(all[int64(len(all))-max:])
			if got != want || dropped != int64(len(all))-max {
				t.Fatalf("max %d chunk %d: kept %d bytes (want the last %d), dropped %d", max, chunk, len(got), max, dropped)
			}
		}
	}
	b := tailBuffer{max: -1}
	b.write("abc")
	b.write("def")
	if got, dropped := b.result(); got != "abcdef" || dropped != 0 {
		t.Fatalf("no limit: %q, %d dropped", got, dropped)
	}
	b = tailBuffer{max: 10}
	b.write("short")
	if got, dropped := b.result(); got != "short" || dropped != 0 {
		t.Fatalf("under the limit: %q, %d dropped", got, dropped)
	}
}

// A pooled box taken by Creates that fail (a name in use, a pull that
// fails) goes back to the pool each time; its watch is started once.
func TestPoolWatchStartedOnce(t *testing.T) {
	e := testEngine(t, 1)
	spec := BoxSpec{Image: "img", CPU: 1, MemoryMB: 64, DiskSizeGB: 1}
	pb, _ := idleStandIn(t, e, spec)
	before := goruntime.NumGoroutine()
	for i := 0; i < 500; i++ {
		if e.pool.take(e, &spec) != pb {
			t.Fatal("take did not hand out the idle box")
		}
		e.pool.release(e, pb.id)
	}
	if after := goruntime.NumGoroutine(); after > before+5 {
		t.Fatalf("500 takes put back: %d goroutines, %d before", after, before)
	}
	if i := e.Info(); i.PoolVMs != 1 || i.UsedCPU != 1 {
		t.Fatalf("after the takes put back: %d pooled, %d CPUs used; want 1, 1", i.PoolVMs, i.UsedCPU)
	}
}
