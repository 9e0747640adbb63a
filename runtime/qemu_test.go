package runtime

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// bootPingVM boots the benchmark's echo init under QEMU and returns the VM.
func bootPingVM(t *testing.T) (VM, *Kernel) {
	return bootInitVM(t, "github.com/boxrun/boxrun/bench/pinginit", "test", "")
}

// bootInitVM boots the Go program pkg as the VM's PID 1 and returns the VM,
// killed when the test ends.
func bootInitVM(t *testing.T, pkg, id, cmdline string) (VM, *Kernel) {
	t.Helper()
	if !(&QEMU{}).Available() {
		t.Skip("qemu-system-x86_64 not installed: run scripts/setup.sh")
	}
	cache := t.TempDir()
	k, err := PrepareKernel("", "", cache)
	if err != nil {
		t.Fatal(err)
	}
	init := filepath.Join(cache, "init")
	build := exec.Command("go", "build", "-o", init, pkg)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, out)
	}
	initrd, err := BuildInitramfs(k, init, cache)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	vm, err := (&QEMU{}).Start(context.Background(), VMConfig{
		ID: id, Dir: dir, CPUs: 1, MemoryMB: 256, Kernel: k.Vmlinux, Initramfs: initrd, Cmdline: cmdline,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Kill() })
	return vm, k
}

func TestQEMUBootsAndEchoes(t *testing.T) {
	start := time.Now()
	vm, k := bootPingVM(t)
	if k.Version == "" || !strings.Contains(k.Vmlinux, "vmlinux") {
		t.Fatalf("kernel %+v", k)
	}
	// QEMU's open files are capped by us, whatever our own limit is.
	limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", vm.PID()))
	if !regexp.MustCompile(`Max open files\s+4096\s+4096`).Match(limits) {
		t.Errorf("QEMU's RLIMIT_NOFILE is not 4096:\n%s", limits)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	done := make(chan error, 1)
	go func() { _, err := io.ReadFull(conn, buf); done <- err }()
	select {
	case err := <-done:
		if err != nil || string(buf) != "ping" {
			b, _ := os.ReadFile(filepath.Join(dir(vm), "qemu.log"))
			t.Fatalf("echo: %q %v\nconsole:\n%s\nqemu.log: %s", buf, err, vm.Console(), b)
		}
	case <-ctx.Done():
		t.Fatalf("no echo from guest\nconsole:\n%s", vm.Console())
	}
	t.Logf("boot to first echo: %v", time.Since(start))
	pid := vm.PID()
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
		t.Fatalf("qemu pid %d still exists after Kill", pid)
	}
}

func dir(vm VM) string { return vm.(*qemuVM).dir }
