// Package bench measures boxrun against a baseline booted in the same run:
// bare QEMU with the same kernel, the same initramfs layout and the same
// flags, whose PID 1 (pinginit) only echoes bytes on the agent port. The
// ratio box/baseline is what boxrun's agent, disks and protocol cost.
//
//	go test -run XXX -bench . -benchtime 5x ./bench/
package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/internal/testenv"
	"github.com/boxrun/boxrun/runtime"
)

var env struct {
	once    sync.Once
	err     error
	tmp     string
	kernel  *runtime.Kernel
	initrd  string         // pinginit initramfs
	eng     *boxrun.Engine // the default: warm start, from the image's template once made
	shape   *boxrun.Engine // ImageTemplates: Disabled: warm start from the shape's template
	cold    *boxrun.Engine // WarmStart: Disabled
	pooled  *boxrun.Engine // Pool: 2
	image   string
	box     *boxrun.Box
	cleanup []func()
}

func TestMain(m *testing.M) {
	code := m.Run()
	for i := len(env.cleanup) - 1; i >= 0; i-- {
		env.cleanup[i]()
	}
	os.Exit(code)
}

func setup(b *testing.B) {
	env.once.Do(func() {
		env.err = func() error {
			tmp, err := os.MkdirTemp("", "boxrun-bench-")
			if err != nil {
				return err
			}
			env.tmp = tmp
			env.cleanup = append(env.cleanup, func() { os.RemoveAll(tmp) })
			cache := filepath.Join(tmp, "cache")
			if env.kernel, err = runtime.PrepareKernel("", "", cache); err != nil {
				return err
			}
			init := filepath.Join(tmp, "pinginit")
			build := exec.Command("go", "build", "-o", init, "github.com/boxrun/boxrun/bench/pinginit")
			build.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := build.CombinedOutput(); err != nil {
				return fmt.Errorf("build pinginit: %v\n%s", err, out)
			}
			if env.initrd, err = runtime.BuildInitramfs(env.kernel, init, cache); err != nil {
				return err
			}
			layout := filepath.Join(tmp, "busybox")
			if err := testenv.WriteBusyboxLayout(layout, testenv.LayoutOptions{}); err != nil {
				return err
			}
			env.image = "oci:" + layout + ":latest"
			if env.eng, err = boxrun.New(context.Background(), boxrun.Config{DataDir: filepath.Join(tmp, "data"), MaxCPU: 64}); err != nil {
				return err
			}
			env.cleanup = append(env.cleanup, func() { env.eng.Close() })
			// One create outside the timings pulls the image, builds the
			// base disk, the agent, the initramfs and the template.
			env.box, err = env.eng.Create(context.Background(), boxSpec())
			if err != nil {
				return err
			}
			// The engines to compare with: their own data dirs, the same
			// agent binary.
			agents, _ := filepath.Glob(filepath.Join(tmp, "data", "cache", "agent-*"))
			if len(agents) == 0 {
				return fmt.Errorf("no agent in the engine's cache")
			}
			if env.cold, err = boxrun.New(context.Background(), boxrun.Config{DataDir: filepath.Join(tmp, "cold"),
				AgentPath: agents[0], WarmStart: boxrun.Disabled, MaxCPU: 64}); err != nil {
				return err
			}
			env.cleanup = append(env.cleanup, func() { env.cold.Close() })
			if env.pooled, err = boxrun.New(context.Background(), boxrun.Config{DataDir: filepath.Join(tmp, "pooled"),
				AgentPath: agents[0], Pool: 2, MaxCPU: 64}); err != nil {
				return err
			}
			env.cleanup = append(env.cleanup, func() { env.pooled.Close() })
			if env.shape, err = boxrun.New(context.Background(), boxrun.Config{DataDir: filepath.Join(tmp, "shape"),
				AgentPath: agents[0], ImageTemplates: boxrun.Disabled, MaxCPU: 64}); err != nil {
				return err
			}
			env.cleanup = append(env.cleanup, func() { env.shape.Close() })
			// The second box of the image on the default engine makes the
			// image's template (in the background): waited for.
			for _, eng := range []*boxrun.Engine{env.cold, env.pooled, env.shape, env.eng} {
				box, err := eng.Create(context.Background(), boxSpec())
				if err != nil {
					return err
				}
				eng.Remove(context.Background(), box.ID, boxrun.Force)
			}
			for deadline := time.Now().Add(3 * time.Minute); env.eng.Info().Boots.ImageTemplates == 0; {
				if time.Now().After(deadline) {
					return fmt.Errorf("no image template 3 minutes after the second box: %+v", env.eng.Info().Boots)
				}
				time.Sleep(50 * time.Millisecond)
			}
			// Nor the pool's boots: they would run during the timings.
			for deadline := time.Now().Add(3 * time.Minute); env.pooled.Info().PoolVMs < 2; {
				if time.Now().After(deadline) {
					return fmt.Errorf("the pool holds %d VMs after 3 minutes, want 2", env.pooled.Info().PoolVMs)
				}
				time.Sleep(50 * time.Millisecond)
			}
			time.Sleep(time.Second) // the last one settles
			return nil
		}()
	})
	if env.err != nil {
		b.Fatal(env.err)
	}
}

// boxSpec is the box every benchmark creates.
func boxSpec() boxrun.BoxSpec {
	return boxrun.BoxSpec{Image: env.image, CPU: 1, MemoryMB: 256, DiskSizeGB: 1}
}

// baselineConfig is the bare guest's VM: pinginit, with the image's base
// disk (for its `true`).
func baselineConfig(b *testing.B, dir string) runtime.VMConfig {
	bases, _ := filepath.Glob(filepath.Join(env.tmp, "data", "bases", "*"))
	var disks []runtime.Disk
	for _, p := range bases {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			disks = []runtime.Disk{{Path: p, ReadOnly: true}}
			break
		}
	}
	if disks == nil {
		b.Fatal("no base disk in the engine's data dir")
	}
	return runtime.VMConfig{ID: "baseline", Dir: dir, CPUs: 1, MemoryMB: 256, Kernel: env.kernel.Vmlinux,
		Initramfs: env.initrd, Disks: disks}
}

// baselineVM boots the echo-only guest and waits for its first echo.
func baselineVM(b *testing.B) (runtime.VM, io.ReadWriteCloser) {
	vm, err := (&runtime.QEMU{}).Start(context.Background(), baselineConfig(b, b.TempDir()))
	return firstEcho(b, vm, err)
}

// firstEcho connects to a bare guest that started (err nil) and waits for
// its first echo.
func firstEcho(b *testing.B, vm runtime.VM, err error) (runtime.VM, io.ReadWriteCloser) {
	if err != nil {
		b.Fatal(err)
	}
	conn, err := vm.DialAgent(context.Background())
	if err != nil {
		vm.Kill()
		b.Fatal(err)
	}
	echo(b, conn, []byte("x"))
	return vm, conn
}

func echo(b *testing.B, conn io.ReadWriter, msg []byte) {
	if _, err := conn.Write(msg); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil || !bytes.Equal(buf, msg) {
		b.Fatalf("echo: %q %v", buf, err)
	}
}

// BenchmarkBoot times a new VM to its first answer: bare QEMU booted cold
// and restored from a snapshot (baselines), and a box created to its first
// `exec true` answered: booted cold, restored from its template (warm) and
// handed a VM from the pool.
func BenchmarkBoot(b *testing.B) {
	setup(b)
	b.Run("baseline-cold", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			vm, conn := baselineVM(b)
			b.StopTimer()
			conn.Close()
			vm.Kill()
			b.StartTimer()
		}
	})
	b.Run("baseline-restore", func(b *testing.B) {
		tdir := baselineTemplate(b)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			vm, conn := baselineRestore(b, tdir)
			b.StopTimer()
			conn.Close()
			vm.Kill()
			b.StartTimer()
		}
	})
	create := func(b *testing.B, eng *boxrun.Engine, pooled bool) {
		for i := 0; i < b.N; i++ {
			if pooled {
				b.StopTimer()
				waitPool(b, eng, 2)
				b.StartTimer()
			}
			id := createAndExec(b, eng)
			b.StopTimer()
			eng.Remove(context.Background(), id, boxrun.Force)
			b.StartTimer()
		}
		boots := eng.Info().Boots
		b.ReportMetric(float64(boots.Cold), "cold-boots")
		b.ReportMetric(float64(boots.Warm), "warm-boots")
		b.ReportMetric(float64(boots.Pooled), "pooled-boots")
	}
	b.Run("box-cold", func(b *testing.B) { create(b, env.cold, false) })
	b.Run("box-warm", func(b *testing.B) { create(b, env.eng, false) })
	b.Run("box-warm-shape", func(b *testing.B) { create(b, env.shape, false) })
	b.Run("box-pooled", func(b *testing.B) { create(b, env.pooled, true) })
	// The warm creates (from the image's template: the default; from the
	// shape's: ImageTemplates off) and the baselines interleaved: each
	// iteration times one of each, in an order that rotates, and the
	// medians and their ratios are reported. The host is shared: its load
	// moves the means of separate runs of a few iterations by a third.
	b.Run("paired", func(b *testing.B) {
		tdir := baselineTemplate(b)
		timeCold := func() float64 {
			t0 := time.Now()
			vm, conn := baselineVM(b)
			d := time.Since(t0).Seconds() * 1000
			conn.Close()
			vm.Kill()
			return d
		}
		timeRestore := func() float64 {
			t0 := time.Now()
			vm, conn := baselineRestore(b, tdir)
			d := time.Since(t0).Seconds() * 1000
			conn.Close()
			vm.Kill()
			return d
		}
		// The restored bare guest's first answer to a command: it mounts
		// the image's disk and fork/execs its `true`, the least a restored
		// guest does to run a command (a box also mounts its disks and runs
		// its first command, all of it code the restored VM has not yet
		// translated under TCG).
		timeRestoreExec := func() float64 {
			t0 := time.Now()
			vm, err := (&runtime.QEMU{}).Restore(context.Background(), baselineConfig(b, b.TempDir()), tdir)
			if err != nil {
				b.Fatal(err)
			}
			conn, err := vm.DialAgent(context.Background())
			if err != nil {
				vm.Kill()
				b.Fatal(err)
			}
			echo(b, conn, []byte("T"))
			d := time.Since(t0).Seconds() * 1000
			conn.Close()
			vm.Kill()
			return d
		}
		warmOn := func(eng *boxrun.Engine) func() float64 {
			return func() float64 {
				t0 := time.Now()
				id := createAndExec(b, eng)
				d := time.Since(t0).Seconds() * 1000
				eng.Remove(context.Background(), id, boxrun.Force)
				return d
			}
		}
		premounted := env.eng.Info().Boots.Premounted
		timers := []func() float64{timeCold, timeRestore, warmOn(env.eng), timeRestoreExec, warmOn(env.shape)}
		times := make([][]float64, len(timers))
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			for j := range timers {
				k := (i + j) % len(timers)
				times[k] = append(times[k], timers[k]())
				time.Sleep(300 * time.Millisecond) // the VM just killed winds down
			}
		}
		cold, restore, warm := median(times[0]), median(times[1]), median(times[2])
		b.ReportMetric(cold, "bare-cold-ms")
		b.ReportMetric(restore, "bare-restore-ms")
		b.ReportMetric(warm, "warm-ms")
		b.ReportMetric(warm/cold, "warm/cold")
		b.ReportMetric(warm/restore, "warm/restore")
		restoreExec := median(times[3])
		b.ReportMetric(restoreExec, "bare-restore-exec-ms")
		b.ReportMetric(warm/restoreExec, "warm/restore-exec")
		shape := median(times[4])
		b.ReportMetric(shape, "warm-shape-ms")
		b.ReportMetric(shape/cold, "warm-shape/cold")
		b.ReportMetric(shape/restoreExec, "warm-shape/restore-exec")
		if got := env.eng.Info().Boots.Premounted - premounted; got != int64(b.N) {
			b.Fatalf("%d of %d warm creates came from the image's template", got, b.N)
		}
	})
}

// createAndExec creates a box on eng and waits for its first `exec true`
// to answer: what the boot benchmarks time. It returns the box's id.
func createAndExec(b *testing.B, eng *boxrun.Engine) string {
	box, err := eng.Create(context.Background(), boxSpec())
	if err != nil {
		b.Fatal(err)
	}
	res, err := eng.Exec(context.Background(), box.ID, boxrun.ExecSpec{Cmd: []string{"true"}})
	if err != nil || res.ExitCode != 0 {
		b.Fatal(res, err)
	}
	return box.ID
}

// baselineTemplate boots the bare guest, waits for its first echo and
// saves it as a template (QEMU: migration to a file), in a directory of
// the benchmark's.
func baselineTemplate(b *testing.B) string {
	q := &runtime.QEMU{}
	tdir := b.TempDir()
	tvm, err := q.StartTemplate(context.Background(), baselineConfig(b, tdir))
	tvm, conn := firstEcho(b, tvm, err)
	conn.Close()
	// SaveTemplate kills the template VM, whether or not it saved it.
	if err := q.SaveTemplate(context.Background(), tvm); err != nil {
		b.Fatal(err)
	}
	return tdir
}

// baselineRestore restores the bare guest from its template and waits for
// its first echo.
func baselineRestore(b *testing.B, tdir string) (runtime.VM, io.ReadWriteCloser) {
	vm, err := (&runtime.QEMU{}).Restore(context.Background(), baselineConfig(b, b.TempDir()), tdir)
	return firstEcho(b, vm, err)
}

// waitPool waits until the engine's pool holds n VMs.
func waitPool(b *testing.B, eng *boxrun.Engine, n int) {
	deadline := time.Now().Add(2 * time.Minute)
	for eng.Info().PoolVMs < n {
		if time.Now().After(deadline) {
			b.Fatalf("the pool holds %d VMs after 2 minutes, want %d", eng.Info().PoolVMs, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Let the last restored VM settle: its restore's CPU is not Create's.
	time.Sleep(500 * time.Millisecond)
}

func BenchmarkRoundTrip(b *testing.B) {
	setup(b)
	b.Run("baseline", func(b *testing.B) {
		vm, conn := baselineVM(b)
		defer vm.Kill()
		defer conn.Close()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			echo(b, conn, []byte("ping"))
		}
	})
	b.Run("baseline-forkexec", func(b *testing.B) {
		vm, conn := baselineVM(b)
		defer vm.Kill()
		defer conn.Close()
		echo(b, conn, []byte("T")) // mounts the disk
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			echo(b, conn, []byte("T"))
		}
	})
	b.Run("exec-true", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			res, err := env.eng.Exec(context.Background(), env.box.ID, boxrun.ExecSpec{Cmd: []string{"true"}})
			if err != nil || res.ExitCode != 0 {
				b.Fatal(res, err)
			}
		}
	})
	// The same two, interleaved: each iteration times one bare fork/exec
	// and one `exec true`, back to back, so that both see the same host
	// load; the medians and their ratio are reported. (The host is shared:
	// its load moves single figures by up to 2x within a run.) Which goes
	// first alternates: what a guest still does after it answered (its
	// kernel's deferred work) runs on the host's cores during the other's
	// turn.
	b.Run("paired", func(b *testing.B) {
		vm, conn := baselineVM(b)
		defer vm.Kill()
		defer conn.Close()
		echo(b, conn, []byte("T"))
		timeBare := func() float64 {
			t0 := time.Now()
			echo(b, conn, []byte("T"))
			return time.Since(t0).Seconds() * 1000
		}
		timeBox := func() float64 {
			t0 := time.Now()
			res, err := env.eng.Exec(context.Background(), env.box.ID, boxrun.ExecSpec{Cmd: []string{"true"}})
			if err != nil || res.ExitCode != 0 {
				b.Fatal(res, err)
			}
			return time.Since(t0).Seconds() * 1000
		}
		bare, box := make([]float64, 0, b.N), make([]float64, 0, b.N)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if i%2 == 0 {
				bare = append(bare, timeBare())
				box = append(box, timeBox())
			} else {
				box = append(box, timeBox())
				bare = append(bare, timeBare())
			}
		}
		mb, mx := median(bare), median(box)
		b.ReportMetric(mb, "bare-ms")
		b.ReportMetric(mx, "exec-ms")
		b.ReportMetric(mx/mb, "ratio")
	})
}

// median of xs (sorted in place).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	sort.Float64s(xs)
	if n := len(xs); n%2 == 0 {
		return (xs[n/2-1] + xs[n/2]) / 2
	}
	return xs[len(xs)/2]
}

func BenchmarkThroughput(b *testing.B) {
	setup(b)
	const size = 16 << 20
	b.Run("baseline-echo", func(b *testing.B) {
		vm, conn := baselineVM(b)
		defer vm.Kill()
		defer conn.Close()
		chunk := make([]byte, 64<<10)
		b.SetBytes(size)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			done := make(chan error, 1)
			go func() {
				_, err := io.CopyN(io.Discard, conn, size)
				done <- err
			}()
			for sent := 0; sent < size; sent += len(chunk) {
				if _, err := conn.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("stream-stdout", func(b *testing.B) {
		b.SetBytes(size)
		for i := 0; i < b.N; i++ {
			events, err := env.eng.Stream(context.Background(), env.box.ID, boxrun.ExecSpec{
				// dd writes 32 KiB at a time; busybox head's small writes
				// would measure head, not the stream.
				Cmd: []string{"dd", "if=/dev/zero", "bs=32768", "count=" + strconv.Itoa(size/32768)}})
			if err != nil {
				b.Fatal(err)
			}
			n := 0
			for ev := range events {
				if ev.Type == "log" && ev.Stream == "stdout" {
					n += len(ev.Data)
				}
			}
			if n != size {
				b.Fatalf("streamed %d bytes", n)
			}
		}
	})
	src := filepath.Join(b.TempDir(), "blob")
	blob := make([]byte, size)
	rand.Read(blob)
	os.WriteFile(src, blob, 0o644)
	b.Run("copy-in", func(b *testing.B) {
		b.SetBytes(size)
		for i := 0; i < b.N; i++ {
			if err := env.eng.Copy(context.Background(), src, env.box.ID+":/root/blob"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("copy-out", func(b *testing.B) {
		b.SetBytes(size)
		dst := filepath.Join(b.TempDir(), "out")
		for i := 0; i < b.N; i++ {
			if err := env.eng.Copy(context.Background(), env.box.ID+":/root/blob", dst); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkIdleMemory reports the memory of an idle VMM process, 5 s after
// its first answer: rss-MiB (resident), pss-MiB (resident, pages shared
// with other processes divided among them: what one more box costs) and
// anon-MiB (its own pages). The time per op is meaningless. The warm
// boxes are two, restored from one template, so that their shared pages
// show.
func BenchmarkIdleMemory(b *testing.B) {
	setup(b)
	report := func(b *testing.B, pid int) {
		m := vmMemory(pid)
		b.ReportMetric(m["Rss"], "rss-MiB")
		b.ReportMetric(m["Pss"], "pss-MiB")
		b.ReportMetric(m["Anonymous"], "anon-MiB")
	}
	b.Run("baseline", func(b *testing.B) {
		vm, conn := baselineVM(b)
		defer vm.Kill()
		defer conn.Close()
		time.Sleep(5 * time.Second)
		report(b, vm.PID())
	})
	idle := func(b *testing.B, eng *boxrun.Engine) {
		var pids []int
		for i := 0; i < 2; i++ {
			box, err := eng.Create(context.Background(), boxSpec())
			if err != nil {
				b.Fatal(err)
			}
			defer eng.Remove(context.Background(), box.ID, boxrun.Force)
			if _, err := eng.Exec(context.Background(), box.ID, boxrun.ExecSpec{Cmd: []string{"true"}}); err != nil {
				b.Fatal(err)
			}
			var pid int
			fmt.Sscanf(box.RuntimeID[strings.Index(box.RuntimeID, ":")+1:], "%d", &pid)
			pids = append(pids, pid)
		}
		time.Sleep(5 * time.Second)
		report(b, pids[1])
	}
	b.Run("box-cold", func(b *testing.B) { idle(b, env.cold) })
	b.Run("box-warm", func(b *testing.B) { idle(b, env.eng) })
	b.Run("box-warm-shape", func(b *testing.B) { idle(b, env.shape) })
}

// vmMemory reads a process's smaps_rollup, in MiB by field.
func vmMemory(pid int) map[string]float64 {
	m := map[string]float64{}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var kb float64
		if _, err := fmt.Sscanf(strings.TrimSpace(v), "%f", &kb); err == nil {
			m[k] = kb / 1024
		}
	}
	return m
}

func rssMiB(pid int) float64 {
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			var kb float64
			fmt.Sscanf(strings.TrimPrefix(line, "VmRSS:"), "%f", &kb)
			return kb / 1024
		}
	}
	return 0
}
