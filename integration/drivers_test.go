package integration

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/runtime"
)

// TestDrivers boots a box on every hypervisor driver the host can run and
// execs in it, with a read-write and a read-only volume (virtio-9p under
// QEMU, virtio-fs under Cloud Hypervisor). A driver the host cannot run is
// skipped with one line naming what is missing. The rest of the suite runs
// on the engine's default driver ("auto"): Cloud Hypervisor where it and a
// working /dev/kvm exist, else QEMU.
func TestDrivers(t *testing.T) {
	for _, name := range []string{runtime.DriverQEMU, runtime.DriverCloudHypervisor} {
		t.Run(name, func(t *testing.T) {
			if missing := runtime.Missing(name, ""); missing != "" {
				t.Skipf("%s: %s", name, missing)
			}
			testDriver(t, name)
		})
	}
}

func testDriver(t *testing.T, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	data := filepath.Join(t.TempDir(), "data")
	eng, err := boxrun.New(ctx, boxrun.Config{
		DataDir: data, Hypervisor: name, RegistriesConf: fx.registriesConf,
		MaxCPU: 64, MaxMemoryMB: 64 << 10,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := eng.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if left := driverProcesses(data); len(left) > 0 {
			t.Errorf("VMM processes left running: %v", left)
		}
	}()
	in := eng.Info()
	wantAccel := "tcg"
	if name == runtime.DriverCloudHypervisor || runtime.KVMAvailable() {
		wantAccel = "kvm"
	}
	if in.Hypervisor != name || in.Acceleration != wantAccel || in.HypervisorVersion == "" {
		t.Errorf("info: hypervisor %q version %q acceleration %q; want %s on %s", in.Hypervisor, in.HypervisorVersion, in.Acceleration, name, wantAccel)
	}
	t.Logf("%s %s (%s)", in.Hypervisor, in.HypervisorVersion, in.Acceleration)

	rw, ro := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(ro, "ro.txt"), []byte("read only\n"), 0o644)
	start := time.Now()
	box, err := eng.Create(ctx, boxrun.BoxSpec{
		Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 512, DiskSizeGB: 2,
		Volumes: []boxrun.Volume{{HostPath: rw, GuestPath: "/mnt/rw"}, {HostPath: ro, GuestPath: "/mnt/ro", ReadOnly: true}},
	})
	if err != nil {
		t.Fatalf("create on %s: %v", name, err)
	}
	t.Logf("%s: box up in %v", name, time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(box.RuntimeID, name+":") {
		t.Errorf("runtime id %q", box.RuntimeID)
	}
	res, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c",
		"echo hi; cat /mnt/ro/ro.txt; echo written > /mnt/rw/out.txt; echo x > /mnt/ro/no.txt 2>/dev/null && echo RO-WRITABLE; grep -c ' /mnt/ro ' /proc/mounts; exit 7"}})
	if err != nil {
		t.Fatalf("exec on %s: %v", name, err)
	}
	if res.ExitCode != 7 || res.Stdout != "hi\nread only\n1\n" {
		t.Errorf("exec on %s: exit %d stdout %q stderr %q", name, res.ExitCode, res.Stdout, res.Stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "out.txt")); string(b) != "written\n" {
		t.Errorf("read-write volume on %s: host sees %q", name, b)
	}
	if _, err := os.Stat(filepath.Join(ro, "no.txt")); err == nil {
		t.Errorf("read-only volume on %s was written", name)
	}
	if _, err := eng.Stop(ctx, box.ID); err != nil {
		t.Fatalf("stop on %s: %v", name, err)
	}
	if err := eng.Remove(ctx, box.ID); err != nil {
		t.Fatalf("remove on %s: %v", name, err)
	}
}

// driverProcesses lists VMM (QEMU, cloud-hypervisor) and virtiofsd
// processes running in a box directory under dir.
func driverProcesses(dir string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cwd, _ := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		comm, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		c := strings.TrimSpace(string(comm))
		if strings.HasPrefix(cwd, dir) && (strings.HasPrefix(c, "qemu") || strings.HasPrefix(c, "cloud-hyperviso") || strings.HasPrefix(c, "virtiofsd")) {
			out = append(out, e.Name()+":"+c)
		}
	}
	return out
}
