// Package integration boots real boxes (QEMU: KVM where usable, TCG
// otherwise) from images served by a real registry on 127.0.0.1 and checks
// the engine end to end.
package integration

import (
	"context"
	"fmt"
	"log/slog"
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

// Fixtures shared by the package's tests: one registry, one engine and one
// long-lived box for the tests that only run commands, because each boot
// costs seconds under TCG.
var fx struct {
	hypervisor     string // "": the default (auto)
	dataDir        string
	registry       *testenv.Registry
	registriesConf string
	regRef         string // busybox in the registry, pulled over docker://
	ociRef         string // busybox with User "app" as an oci: layout
	eng            *boxrun.Engine

	once   sync.Once
	box    *boxrun.Box
	boxErr error
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	defer func() {
		if release.dir != "" {
			os.RemoveAll(release.dir)
		}
	}()
	if dir := os.Getenv("BOXRUN_CRASH_CHILD"); dir != "" {
		crashChild(dir, os.Getenv("BOXRUN_CRASH_IMAGE"))
	}
	// The suite runs on the engine's default driver ("auto": Cloud
	// Hypervisor where it and a working /dev/kvm exist, else QEMU); with
	// BOXRUN_TEST_OTHER_DRIVER set (scripts/test.sh's second pass), on the
	// driver auto did not pick, or not at all, said in one line, when the
	// host cannot run it.
	if os.Getenv("BOXRUN_TEST_OTHER_DRIVER") != "" {
		fx.hypervisor = runtime.DriverCloudHypervisor
		if runtime.Missing(runtime.DriverCloudHypervisor, "") == "" {
			fx.hypervisor = runtime.DriverQEMU
		}
		if missing := runtime.Missing(fx.hypervisor, ""); missing != "" {
			fmt.Printf("integration: the suite on %s is skipped: %s\n", fx.hypervisor, missing)
			return 0
		}
		fmt.Printf("integration: the suite runs on %s\n", fx.hypervisor)
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		fmt.Fprintln(os.Stderr, "integration: qemu-system-x86_64 not found; run scripts/setup.sh")
		return 1
	}
	tmp, err := os.MkdirTemp("", "boxrun-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	fx.dataDir = filepath.Join(tmp, "data")

	reg, err := testenv.NewRegistry()
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	defer reg.Close()
	fx.registry = reg
	layout := filepath.Join(tmp, "busybox")
	if err := testenv.WriteBusyboxLayout(layout, testenv.LayoutOptions{}); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	ctx := context.Background()
	if fx.regRef, err = reg.PushLayout(ctx, layout, "library/busybox:latest"); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	userLayout := filepath.Join(tmp, "busybox-app")
	if err := testenv.WriteBusyboxLayout(userLayout, testenv.LayoutOptions{User: "app", WorkingDir: "/home/app"}); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	fx.ociRef = "oci:" + userLayout + ":latest"

	conf := filepath.Join(tmp, "registries.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n", reg.Addr)), 0o644)
	fx.registriesConf = conf
	fx.eng, err = boxrun.New(ctx, boxrun.Config{
		Hypervisor:     fx.hypervisor,
		DataDir:        fx.dataDir,
		RegistriesConf: conf,
		MaxCPU:         64, // TCG vCPUs are threads: overcommit this 2-core host in tests
		MaxMemoryMB:    64 << 10,
		// The shared engine's tests count the boots of shape templates;
		// image templates, made in the background by repeated creates,
		// have a test (and engine) of their own.
		ImageTemplates: boxrun.Disabled,
		Logger:         slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	code := m.Run()
	if err := fx.eng.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "integration: close engine:", err)
		code = 1
	}
	if left := vmmProcesses(fx.dataDir); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "integration: VMM processes left running: %v\n", left)
		code = 1
	}
	return code
}

// sharedBox returns the package's long-lived box (busybox from the
// registry, with box env), booting it on first use.
func sharedBox(t *testing.T) *boxrun.Box {
	t.Helper()
	fx.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		fx.box, fx.boxErr = fx.eng.Create(ctx, boxrun.BoxSpec{
			Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 512, DiskSizeGB: 2,
			Env: map[string]string{"BOX_VAR": "from-box", "OVERRIDE": "box"},
		})
	})
	if fx.boxErr != nil {
		t.Fatalf("create shared box: %v", fx.boxErr)
	}
	return fx.box
}

// newBox creates a box that the test removes when it ends, pass or fail.
func newBox(t *testing.T, spec boxrun.BoxSpec) *boxrun.Box {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	box, err := fx.eng.Create(ctx, spec)
	if err != nil {
		t.Fatalf("create %s: %v", spec.Image, err)
	}
	t.Cleanup(func() {
		if err := fx.eng.Remove(context.Background(), box.ID, boxrun.Force); err != nil && boxrun.CodeOf(err) != boxrun.BoxNotFound {
			t.Errorf("remove %s: %v", box.ID, err)
		}
	})
	return box
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func sh(t *testing.T, box *boxrun.Box, script string) *boxrun.ExecResult {
	t.Helper()
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", script}})
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	return res
}

// vmmProcesses lists the pids of the VMMs (QEMU, Cloud Hypervisor)
// running under dir (the engine runs each in its box's directory).
func vmmProcesses(dir string) []int {
	return processes(func(p proc) bool {
		return strings.HasPrefix(p.cwd, dir) && (strings.HasPrefix(p.comm, "qemu") || strings.HasPrefix(p.comm, "cloud-hyperviso"))
	})
}

// boxVMMs are the VMMs of dir's boxes (and pooled boxes): not those of
// templates being made (warm start; image templates in the background).
func boxVMMs(dir string) []int {
	return processes(func(p proc) bool {
		return strings.HasPrefix(p.cwd, dir) && !strings.Contains(p.cwd, "/cache/templates/") &&
			(strings.HasPrefix(p.comm, "qemu") || strings.HasPrefix(p.comm, "cloud-hyperviso"))
	})
}

// proc is what the tests look at in a host process.
type proc struct {
	pid  int
	args []string // its command line
	cwd  string
	comm string
}

// processes lists the pids of the host's processes that match.
func processes(match func(proc) bool) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p := proc{pid: pid}
		p.cwd, _ = os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		comm, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		p.comm, p.args = string(comm), strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00")
		if match(p) {
			pids = append(pids, pid)
		}
	}
	return pids
}
