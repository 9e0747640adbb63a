package testenv

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// containerdBuilds are the containerd builds the harness supports; each
// subtest skips, saying what is missing, where its build is not installed.
var containerdBuilds = []struct {
	name string
	opts func(testing.TB) ContainerdOptions
}{
	{"debian-1.6", RequireDebianContainerd},
	{"cached-" + CachedContainerdVersion, RequireCachedContainerd},
}

// TestContainerdHarness checks StartContainerd, Import, Ctr and Crictl
// against real containerd builds with the runc runtime: `ctr run` of the
// imported busybox image, and a host-network CRI pod without CNI (runp,
// create, start, exec, stopp, rmp). Nothing may be left behind: no
// process, no mount, no private dir.
func TestContainerdHarness(t *testing.T) {
	if _, err := os.Stat(BusyboxPath); err != nil {
		t.Skipf("testenv: %s missing (busybox-static)", BusyboxPath)
	}
	for _, b := range containerdBuilds {
		t.Run(b.name, func(t *testing.T) {
			t.Run("ctr", func(t *testing.T) {
				checkNothingLeft(t, func(t *testing.T) *Containerd { return testCtrRun(t, b.opts(t)) })
			})
			t.Run("cri", func(t *testing.T) {
				checkNothingLeft(t, func(t *testing.T) *Containerd { return testCRIPod(t, b.opts(t)) })
			})
			// containerd killed with a container running: the cleanup
			// cannot go through containerd and kills and unmounts itself.
			t.Run("crashed", func(t *testing.T) {
				checkNothingLeft(t, func(t *testing.T) *Containerd { return testCrashed(t, b.opts(t)) })
			})
		})
	}
}

// checkNothingLeft runs f in a subtest, notes the processes of the
// containerd it started (which f leaves with a container running), and
// checks that once the containerd's cleanup ran none of them is alive and
// no mount or private dir is left.
func checkNothingLeft(t *testing.T, f func(t *testing.T) *Containerd) {
	t.Helper()
	var c *Containerd
	var procs []string
	pids := map[int]bool{}
	if !t.Run("run", func(t *testing.T) {
		c = f(t)
		// The shim(s) and the container left running. (A container's
		// process may still be "runc init" just after its start returned,
		// so wait a little for its exec.)
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			all := ListProcesses()
			procs = procs[:0]
			for pid := range c.Processes(all) {
				pids[pid] = true
				procs = append(procs, strings.TrimSpace(all[pid].Cmdline))
			}
			joined := strings.Join(procs, "\n")
			if strings.Contains(joined, "sleep 600") && strings.Contains(joined, "containerd-shim-runc-v2") {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("processes of containerd %s: %q, want a shim and sleep 600", c.Version, procs)
				break
			}
		}
	}) || c == nil {
		return
	}
	all := ListProcesses()
	for pid := range pids {
		if p, ok := all[pid]; ok && !p.Zombie {
			t.Errorf("process %d %q outlived containerd %s", pid, p.Cmdline, c.Version)
		}
	}
	for pid, p := range all {
		if !p.Zombie && (strings.Contains(p.Cmdline, c.Dir+"/") || strings.HasPrefix(p.Cwd+"/", c.Dir+"/")) {
			t.Errorf("process %d %q outlived containerd %s", pid, p.Cmdline, c.Version)
		}
	}
	if m := mountsUnder(c.Dir); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if _, err := os.Stat(c.Dir); !os.IsNotExist(err) {
		t.Errorf("%s not removed: %v", c.Dir, err)
	}
	t.Logf("containerd %s: %d processes stopped: %q", c.Version, len(procs), procs)
}

func testCtrRun(t *testing.T, o ContainerdOptions) *Containerd {
	c := StartContainerd(t, o)
	t.Logf("containerd %s at %s", c.Version, c.Address)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	img := c.Import(t, "default", "docker.io/library/busybox:latest")
	if img != "docker.io/library/busybox:latest" {
		t.Errorf("imported as %q", img)
	}
	// Short names are normalised the docker way.
	if got := c.Import(t, "default", "other:v1"); got != "docker.io/library/other:v1" {
		t.Errorf("imported other:v1 as %q", got)
	}
	// --runc-root: the runc shim's default root, /run/containerd/runc/<ns>,
	// is shared by every containerd on the host.
	out := c.MustCtr(t, ctx, "run", "--rm", "--runc-root", filepath.Join(c.State, "runc"), img, "t1", "echo", "hi")
	if strings.TrimSpace(out) != "hi" {
		t.Errorf("ctr run printed %q, want hi", out)
	}
	// A container left running is cleaned up by StartContainerd's cleanup.
	c.MustCtr(t, ctx, "run", "-d", "--runc-root", filepath.Join(c.State, "runc"), img, "left", "sleep", "600")
	if out := c.MustCtr(t, ctx, "task", "ls"); !strings.Contains(out, "RUNNING") {
		t.Errorf("ctr task ls: %s", out)
	}
	return c
}

func testCrashed(t *testing.T, o ContainerdOptions) *Containerd {
	c := StartContainerd(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img := c.Import(t, "default", "docker.io/library/busybox:latest")
	c.MustCtr(t, ctx, "run", "-d", "--runc-root", filepath.Join(c.State, "runc"), img, "left", "sleep", "600")
	if m := mountsUnder(c.Dir); len(m) == 0 {
		t.Logf("no mounts under %s with a container running (the shim mounts the rootfs in its own mount namespace)", c.Dir)
	}
	c.cmd.Process.Kill()
	<-c.done
	return c
}

func testCRIPod(t *testing.T, o ContainerdOptions) *Containerd {
	RequireCrictl(t)
	o.CRI = true
	o.RuntimeHandlers = map[string]string{"runc": "io.containerd.runc.v2"}
	o.SandboxImage = "docker.io/boxrun/pause:test"
	c := StartContainerd(t, o)
	t.Logf("containerd %s at %s", c.Version, c.Address)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	c.Import(t, "k8s.io", o.SandboxImage, PauseImage())
	img := c.Import(t, "k8s.io", "docker.io/library/busybox:latest")

	dir := t.TempDir()
	write := func(name string, v any) string {
		data, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Host network (NamespaceMode NODE = 2): no netns, no CNI. Field names
	// are the proto names, which crictl's JSON decoding accepts; enums as
	// numbers.
	pod := write("pod.json", map[string]any{
		"metadata":      map[string]any{"name": "p1", "namespace": "default", "uid": "p1-uid", "attempt": 0},
		"log_directory": filepath.Join(c.Dir, "pods", "p1"),
		"linux": map[string]any{
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}},
		},
	})
	ctr := write("ctr.json", map[string]any{
		"metadata": map[string]any{"name": "c1"},
		"image":    map[string]any{"image": img},
		"command":  []string{"/bin/sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"},
		"log_path": "c1.log",
		"linux":    map[string]any{},
	})

	podID := strings.TrimSpace(c.MustCrictl(t, ctx, "runp", "--runtime", "runc", pod))
	cid := strings.TrimSpace(c.MustCrictl(t, ctx, "create", podID, ctr, pod))
	c.MustCrictl(t, ctx, "start", cid)
	if out := c.MustCrictl(t, ctx, "exec", "-s", cid, "echo", "hi"); strings.TrimSpace(out) != "hi" {
		t.Errorf("crictl exec -s printed %q", out)
	}
	// Without -s: the streaming server (127.0.0.1, free port).
	if out := c.MustCrictl(t, ctx, "exec", cid, "sh", "-c", "echo $((6*7))"); strings.TrimSpace(out) != "42" {
		t.Errorf("crictl exec printed %q", out)
	}
	// Host network: the pod sees the host's interfaces.
	hostIfs, _ := os.ReadFile("/proc/net/dev")
	if out := c.MustCrictl(t, ctx, "exec", "-s", cid, "cat", "/proc/net/dev"); len(strings.Split(strings.TrimSpace(out), "\n")) != len(strings.Split(strings.TrimSpace(string(hostIfs)), "\n")) {
		t.Errorf("pod's /proc/net/dev:\n%s\nhost's:\n%s", out, hostIfs)
	}
	c.MustCrictl(t, ctx, "stopp", podID)
	c.MustCrictl(t, ctx, "rmp", podID)
	if out := c.MustCrictl(t, ctx, "pods", "-q"); strings.TrimSpace(out) != "" {
		t.Errorf("pods left after rmp: %s", out)
	}
	// A pod left running is cleaned up by StartContainerd's cleanup.
	pod2 := write("pod2.json", map[string]any{
		"metadata":      map[string]any{"name": "p2", "namespace": "default", "uid": "p2-uid"},
		"log_directory": filepath.Join(c.Dir, "pods", "p2"),
		"linux": map[string]any{
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}},
		},
	})
	podID2 := strings.TrimSpace(c.MustCrictl(t, ctx, "runp", pod2))
	c.MustCrictl(t, ctx, "start", strings.TrimSpace(c.MustCrictl(t, ctx, "create", podID2, ctr, pod2)))
	return c
}

func TestNormalizeDockerRef(t *testing.T) {
	for in, want := range map[string]string{
		"busybox":                          "docker.io/library/busybox:latest",
		"busybox:1":                        "docker.io/library/busybox:1",
		"boxrun/pause:test":                "docker.io/boxrun/pause:test",
		"docker.io/library/busybox:latest": "docker.io/library/busybox:latest",
		"localhost:5000/x":                 "localhost:5000/x:latest",
		"registry.k8s.io/pause:3.6":        "registry.k8s.io/pause:3.6",
	} {
		if got := normalizeDockerRef(in); got != want {
			t.Errorf("normalizeDockerRef(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestWithFIFODir(t *testing.T) {
	c := &Containerd{Dir: "/tmp/ctrd-x"}
	for _, tc := range []struct{ in, want string }{
		{"run --rm img id echo hi", "run --fifo-dir /tmp/ctrd-x/fifo --rm img id echo hi"},
		{"-n k8s.io run img id", "-n k8s.io run --fifo-dir /tmp/ctrd-x/fifo img id"},
		{"--namespace=k8s.io task exec --exec-id e id ls", "--namespace=k8s.io task exec --fifo-dir /tmp/ctrd-x/fifo --exec-id e id ls"},
		{"t start -d id", "t start --fifo-dir /tmp/ctrd-x/fifo -d id"},
		{"task ls", "task ls"},
		{"image import -", "image import -"},
		{"run --log-uri file:///x img id", "run --log-uri file:///x img id"},
	} {
		if got := strings.Join(c.withFIFODir(strings.Fields(tc.in)), " "); got != tc.want {
			t.Errorf("withFIFODir(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	if got := unescapeMountinfo(`/tmp/a\040b\134c`); got != `/tmp/a b\c` {
		t.Errorf("got %q", got)
	}
}
