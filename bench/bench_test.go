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
	initrd  string // pinginit initramfs
	eng     *boxrun.Engine
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
			if env.eng, err = boxrun.New(context.Background(), boxrun.Config{DataDir: filepath.Join(tmp, "data")}); err != nil {
				return err
			}
			env.cleanup = append(env.cleanup, func() { env.eng.Close() })
			// One create outside the timings pulls the image, builds the
			// base disk, the agent and the initramfs.
			env.box, err = env.eng.Create(context.Background(), boxrun.BoxSpec{Image: env.image, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
			return err
		}()
	})
	if env.err != nil {
		b.Fatal(env.err)
	}
}

// baselineVM boots the echo-only guest and waits for its first echo.
func baselineVM(b *testing.B) (runtime.VM, io.ReadWriteCloser) {
	dir := b.TempDir()
	vm, err := (&runtime.QEMU{}).Start(context.Background(), runtime.VMConfig{
		ID: "baseline", Dir: dir, CPUs: 1, MemoryMB: 256, Kernel: env.kernel.Vmlinux, Initramfs: env.initrd,
	})
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

func BenchmarkBoot(b *testing.B) {
	setup(b)
	b.Run("baseline", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			vm, conn := baselineVM(b)
			b.StopTimer()
			conn.Close()
			vm.Kill()
			b.StartTimer()
		}
	})
	b.Run("box", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			box, err := env.eng.Create(context.Background(), boxrun.BoxSpec{Image: env.image, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			env.eng.Remove(context.Background(), box.ID, boxrun.Force)
			b.StartTimer()
		}
	})
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
	b.Run("exec-true", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			res, err := env.eng.Exec(context.Background(), env.box.ID, boxrun.ExecSpec{Cmd: []string{"true"}})
			if err != nil || res.ExitCode != 0 {
				b.Fatal(res, err)
			}
		}
	})
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

// BenchmarkIdleMemory reports the resident memory of an idle VMM process,
// 5 s after boot, as the metric rss-MiB (the time per op is meaningless).
func BenchmarkIdleMemory(b *testing.B) {
	setup(b)
	b.Run("baseline", func(b *testing.B) {
		vm, conn := baselineVM(b)
		defer vm.Kill()
		defer conn.Close()
		time.Sleep(5 * time.Second)
		b.ReportMetric(rssMiB(vm.PID()), "rss-MiB")
	})
	b.Run("box", func(b *testing.B) {
		time.Sleep(5 * time.Second)
		var pid int
		fmt.Sscanf(env.box.RuntimeID[strings.Index(env.box.RuntimeID, ":")+1:], "%d", &pid)
		b.ReportMetric(rssMiB(pid), "rss-MiB")
	})
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
