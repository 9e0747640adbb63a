package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/internal/testenv"
)

// The containerd tests run the release shim binary (scripts/build.sh,
// agent embedded) under a private containerd, driven by its own ctr and by
// crictl, as a user or kubelet would: Debian's containerd 1.6 and a
// containerd 2.4 built from its module (scripts/containerd.sh).

const boxrunRuntime = "io.containerd.boxrun.v2"

// shimRoot is the shims' root (BOXRUN_SHIM_ROOT), shared by the tests so
// that the warm-start template and base disks are made once.
var shimRoot struct {
	once sync.Once
	dir  string
}

func shimEnv(t *testing.T) []string {
	shimRoot.once.Do(func() { shimRoot.dir = filepath.Join(filepath.Dir(fx.dataDir), "shim") })
	return []string{"BOXRUN_SHIM_ROOT=" + shimRoot.dir, "BOXRUN_SHIM_CPUS=1", "BOXRUN_SHIM_MEMORY_MB=256",
		"BOXRUN_SHIM_DISK_GB=1", "BOXRUN_HYPERVISOR=" + fx.hypervisor}
}

func TestContainerdShim(t *testing.T) {
	for _, v := range []struct {
		name string
		opts func(testing.TB) testenv.ContainerdOptions
	}{
		{"debian-1.6", testenv.RequireDebianContainerd},
		{"containerd-2.4", testenv.RequireCachedContainerd},
	} {
		t.Run(v.name, func(t *testing.T) {
			o := v.opts(t)
			shimBin := filepath.Dir(boxrundBinary(t)) // scripts/build.sh's output: the shim is there too
			if _, err := os.Stat(filepath.Join(shimBin, "containerd-shim-boxrun-v2")); err != nil {
				t.Fatalf("the release build has no shim: %v", err)
			}
			o.PATH = append([]string{shimBin}, o.PATH...)
			o.CRI = true
			o.RuntimeHandlers = map[string]string{"boxrun": boxrunRuntime}
			o.Env = shimEnv(t)
			c := testenv.StartContainerd(t, o)
			t.Run("ctr", func(t *testing.T) { ctrScenario(t, c) })
			t.Run("cri", func(t *testing.T) { criScenario(t, c) })
			if t.Failed() {
				t.Logf("containerd log:\n%s", tail(c.Log(), 6000))
			}
		})
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// ctrScenario: ctr run's exit codes, output and stdin; a detached task with
// an exec, killed; and nothing left once it is removed.
func ctrScenario(t *testing.T, c *testenv.Containerd) {
	ctx := ctxT(t, 5*time.Minute)
	img := c.Import(t, "default", "docker.io/library/busybox:latest")
	sockets := shimSockets(c)
	run := func(stdin string, args ...string) (string, string, int) {
		t.Helper()
		var in *strings.Reader
		if stdin != "" {
			in = strings.NewReader(stdin)
		}
		var out, errOut string
		var code int
		var err error
		if in != nil {
			out, errOut, code, err = c.Ctr(ctx, in, args...)
		} else {
			out, errOut, code, err = c.Ctr(ctx, nil, args...)
		}
		if err != nil {
			t.Fatalf("ctr %v: %v (stderr %s)", args, err, errOut)
		}
		return out, errOut, code
	}
	if out, errOut, code := run("", "run", "--rm", "--runtime", boxrunRuntime, img, "t1", "echo", "hi"); out != "hi\n" || code != 0 {
		t.Errorf("echo hi: stdout %q, exit %d, stderr %s", out, code, errOut)
	}
	if _, errOut, code := run("", "run", "--rm", "--runtime", boxrunRuntime, img, "t2", "sh", "-c", "exit 7"); code != 7 {
		t.Errorf("exit 7: exit %d, stderr %s", code, errOut)
	}
	in := "line one\nline two\n" + strings.Repeat("x", 100000) + "\n"
	if out, errOut, code := run(in, "run", "--rm", "--runtime", boxrunRuntime, img, "t3", "cat"); out != in || code != 0 {
		t.Errorf("stdin through cat: %d bytes back of %d, exit %d, stderr %s", len(out), len(in), code, errOut)
	}
	if out, _, code := run("", "run", "--rm", "--runtime", boxrunRuntime, img, "t4", "sh", "-c", "echo to-err >&2; id -u"); out != "0\n" || code != 0 {
		t.Errorf("id: %q exit %d", out, code)
	}
	// A terminal (-t): ctr needs one on its stdin, so it runs under
	// script(1); the command's output comes through the terminal.
	if _, err := exec.LookPath("script"); err == nil {
		ctrCmd := fmt.Sprintf("%s --address %s run -t --rm --fifo-dir %s --runtime %s %s tty1 sh -c 'tty; stty size; exit 4'",
			c.CtrBinary, c.Address, filepath.Join(c.Dir, "fifo"), boxrunRuntime, img)
		cmd := exec.CommandContext(ctx, "script", "-qec", ctrCmd, "/dev/null")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 4 || !strings.Contains(string(out), "/dev/pts/") {
			t.Errorf("ctr run -t: %v\n%s", err, out)
		}
	}
	// One base disk for the image, shared by all these containers, with
	// the layer dirs it was built from (for PruneRootfs).
	srcs, _ := filepath.Glob(filepath.Join(shimRoot.dir, "bases", "rootfs-*.ext4.sources"))
	ours := 0
	for _, f := range srcs {
		if b, _ := os.ReadFile(f); strings.Contains(string(b), c.Root) {
			ours++
		}
	}
	if ours != 1 {
		t.Errorf("base disks of the image from this containerd's layers: %d of %v; want one", ours, srcs)
	}
	// A kernel of its own: a container on the host's kernel has its boot id.
	if out, _, _ := run("", "run", "--rm", "--runtime", boxrunRuntime, img, "t5", "cat", "/proc/sys/kernel/random/boot_id"); out == "" || out == hostBootID(t) {
		t.Errorf("boot id in the container %q: the host's is %q", out, hostBootID(t))
	}

	// Detached: an exec, metrics, then SIGTERM (ctr task kill's default).
	if _, errOut, code := run("", "run", "-d", "--runtime", boxrunRuntime, img, "d1", "sleep", "1000"); code != 0 {
		t.Fatalf("run -d: exit %d: %s", code, errOut)
	}
	if out, _, _ := run("", "task", "ls"); !strings.Contains(out, "RUNNING") {
		t.Errorf("task ls: %s", out)
	}
	if out, errOut, code := run("", "task", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo in-exec; ls /proc | grep -c . >/dev/null; exit 3"); out != "in-exec\n" || code != 3 {
		t.Errorf("task exec: stdout %q exit %d stderr %s", out, code, errOut)
	}
	if out, _, code := run("", "task", "metrics", "d1"); code != 0 || !strings.Contains(out, "memory.usage") {
		t.Errorf("task metrics: exit %d\n%s", code, out)
	}
	if _, errOut, code := run("", "task", "kill", "d1"); code != 0 {
		t.Fatalf("task kill: exit %d: %s", code, errOut)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _, _ := run("", "task", "ls")
		if strings.Contains(out, "STOPPED") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("task not stopped 30 s after kill: %s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	_, errOut, code := run("", "task", "rm", "d1")
	if code != 0 || !strings.Contains(errOut, "143") {
		t.Errorf("task rm after kill: exit %d; want the exit code 143 reported: %s", code, errOut)
	}
	if _, errOut, code := run("", "container", "rm", "d1"); code != 0 {
		t.Errorf("container rm: exit %d: %s", code, errOut)
	}
	noLeftovers(t, c, sockets)

	// A shim killed with its container running: containerd runs the
	// shim's delete, which stops the VM and removes the socket and the
	// task's data dir.
	if _, errOut, code := run("", "run", "-d", "--runtime", boxrunRuntime, img, "d2", "sleep", "1000"); code != 0 {
		t.Fatalf("run -d: exit %d: %s", code, errOut)
	}
	shims := shimPIDs(c, "d2")
	if len(shims) != 1 || len(vmmProcesses(shimRoot.dir)) != 1 {
		t.Fatalf("shim processes of d2 %v, VMMs %v; want one each", shims, vmmProcesses(shimRoot.dir))
	}
	syscall.Kill(shims[0], syscall.SIGKILL)
	deadline = time.Now().Add(30 * time.Second)
	for {
		out, _, _ := run("", "task", "ls")
		if !strings.Contains(out, "d2") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("task of a killed shim still listed: %s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, errOut, code := run("", "container", "rm", "d2"); code != 0 {
		t.Errorf("container rm after the shim died: exit %d: %s", code, errOut)
	}
	noLeftovers(t, c, sockets)
}

// shimPIDs are the pids of the boxrun shim servers of task id under c.
func shimPIDs(c *testenv.Containerd, id string) []int {
	return processes(func(p proc) bool {
		return isShimOf(p, c) && slices.Contains(p.args, id) && !slices.Contains(p.args, "start")
	})
}

// isShimOf says whether p is a boxrun shim of containerd c.
func isShimOf(p proc, c *testenv.Containerd) bool {
	return strings.HasSuffix(p.args[0], "containerd-shim-boxrun-v2") && slices.Contains(p.args, c.Address)
}

// criScenario: the CRI path kubelet takes, through crictl, with the boxrun
// runtime handler: a pod of two containers in one box, each on its own
// root filesystem, sharing localhost.
func criScenario(t *testing.T, c *testenv.Containerd) {
	testenv.RequireCrictl(t)
	ctx := ctxT(t, 5*time.Minute)
	c.Import(t, "k8s.io", testenv.DefaultSandboxImage, testenv.PauseImage())
	img := c.Import(t, "k8s.io", "docker.io/library/busybox:latest")
	sockets := shimSockets(c)
	dir := t.TempDir()
	pod := filepath.Join(dir, "pod.json")
	writeJSON(t, pod, map[string]any{
		"metadata":      map[string]any{"name": "boxpod", "namespace": "default", "uid": "uid-boxpod", "attempt": 1},
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
		"log_directory": dir,
	})
	ctr := filepath.Join(dir, "ctr.json")
	writeJSON(t, ctr, map[string]any{
		"metadata": map[string]any{"name": "app"},
		"image":    map[string]any{"image": img},
		"command":  []string{"sh", "-c", "echo started > /tmp/mark; exec sleep 1000"},
		"log_path": "app.log",
		"linux":    map[string]any{},
	})
	podID := strings.TrimSpace(c.MustCrictl(t, ctx, "runp", "--runtime", "boxrun", pod))
	cid := strings.TrimSpace(c.MustCrictl(t, ctx, "create", podID, ctr, pod))
	c.MustCrictl(t, ctx, "start", cid)
	var out string
	deadline := time.Now().Add(30 * time.Second)
	for {
		o, _, err := c.Crictl(ctx, "exec", "-s", cid, "cat", "/tmp/mark")
		// crictl exec -s prints stdout and stderr, each with a newline.
		if out = o; err == nil && strings.TrimSpace(out) == "started" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("crictl exec: %q %v", out, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if o := c.MustCrictl(t, ctx, "exec", "-s", cid, "sh", "-c", "cat /etc/hostname >/dev/null && echo hosts-ok"); strings.TrimSpace(o) != "hosts-ok" {
		t.Errorf("the pod's /etc/hostname in the box: %q", o)
	}
	if o := c.MustCrictl(t, ctx, "exec", "-s", cid, "cat", "/proc/sys/kernel/random/boot_id"); strings.TrimSpace(o) == "" || o == hostBootID(t) {
		t.Errorf("the pod's container runs on the host's kernel (boot id %q)", o)
	}
	if o := c.MustCrictl(t, ctx, "inspect", "-o", "go-template", "--template", "{{.status.state}}", cid); !strings.Contains(o, "RUNNING") {
		t.Errorf("container state: %s", o)
	}
	// A second container in the pod: the same box (one VM), its own root
	// filesystem, the first one's server on localhost.
	web := filepath.Join(dir, "web.json")
	writeJSON(t, web, map[string]any{
		"metadata": map[string]any{"name": "web"},
		"image":    map[string]any{"image": img},
		"command": []string{"sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && " +
			"echo only-web > /tmp/only-web && (setsid sleep 7777 &) && exec httpd -f -p 127.0.0.1:8080 -h /www"},
		"log_path": "web.log",
		"linux":    map[string]any{},
	})
	wid := strings.TrimSpace(c.MustCrictl(t, ctx, "create", podID, web, pod))
	c.MustCrictl(t, ctx, "start", wid)
	deadline = time.Now().Add(30 * time.Second)
	for {
		o, _, err := c.Crictl(ctx, "exec", "-s", cid, "wget", "-qO-", "http://127.0.0.1:8080/")
		if err == nil && strings.TrimSpace(o) == "hello-from-web" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("app -> web over the pod's localhost: %q %v", o, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if n := len(vmmProcesses(shimRoot.dir)); n != 1 {
		t.Errorf("VMs of a pod of two containers: %d; want 1", n)
	}
	bootApp := c.MustCrictl(t, ctx, "exec", "-s", cid, "cat", "/proc/sys/kernel/random/boot_id")
	bootWeb := c.MustCrictl(t, ctx, "exec", "-s", wid, "cat", "/proc/sys/kernel/random/boot_id")
	if bootApp != bootWeb {
		t.Errorf("the pod's containers run on two kernels: %q %q", bootApp, bootWeb)
	}
	if o, _, err := c.Crictl(ctx, "exec", "-s", cid, "cat", "/tmp/only-web"); err == nil && strings.Contains(o, "only-web") {
		t.Errorf("the app container sees the web container's /tmp: %q", o)
	}
	if o := c.MustCrictl(t, ctx, "exec", "-s", wid, "cat", "/tmp/only-web"); strings.TrimSpace(o) != "only-web" {
		t.Errorf("web's own file: %q", o)
	}
	daemons := func() string {
		return strings.TrimSpace(c.MustCrictl(t, ctx, "exec", "-s", cid, "sh", "-c", "ps -o args | grep -c '^sleep 777[7]' || true"))
	}
	if n := daemons(); n != "1" {
		t.Errorf("web's daemon, seen from app (one process space): %q", n)
	}
	// One container stopped and removed: the other runs on.
	c.MustCrictl(t, ctx, "stop", wid)
	c.MustCrictl(t, ctx, "rm", wid)
	if o := c.MustCrictl(t, ctx, "exec", "-s", cid, "cat", "/tmp/mark"); strings.TrimSpace(o) != "started" {
		t.Errorf("app after web was removed: %q", o)
	}
	// The pod shares a process space: web's daemon (a session of its
	// own) went with web.
	if n := daemons(); n != "0" {
		t.Errorf("web's daemon outlived web: %q", n)
	}
	c.MustCrictl(t, ctx, "stopp", podID)
	c.MustCrictl(t, ctx, "rmp", podID)
	if o := c.MustCrictl(t, ctx, "pods", "-q"); strings.TrimSpace(o) != "" {
		t.Errorf("pods left: %s", o)
	}
	noLeftovers(t, c, sockets)
}

func hostBootID(t *testing.T) string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func writeJSON(t *testing.T, path string, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// shimSockets lists the shim sockets that may be this containerd's: its
// own socket dir (2.x) and /run/containerd/s (1.6).
func shimSockets(c *testenv.Containerd) map[string]bool {
	out := map[string]bool{}
	for _, d := range []string{filepath.Join(c.Dir, "s"), "/run/containerd/s"} {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			out[filepath.Join(d, e.Name())] = true
		}
	}
	return out
}

// noLeftovers checks, after the containers were removed, that no shim,
// VMM, mount, socket or task dir of theirs is left.
func noLeftovers(t *testing.T, c *testenv.Containerd, before map[string]bool) {
	t.Helper()
	var left []string
	deadline := time.Now().Add(15 * time.Second)
	for {
		left = left[:0]
		for _, pid := range processes(func(p proc) bool { return isShimOf(p, c) }) {
			left = append(left, fmt.Sprintf("shim: %d", pid))
		}
		for _, pid := range vmmProcesses(shimRoot.dir) {
			left = append(left, fmt.Sprintf("VMM: %d", pid))
		}
		for s := range shimSockets(c) {
			if !before[s] {
				left = append(left, "socket: "+s)
			}
		}
		if mounts, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
			for _, l := range strings.Split(string(mounts), "\n") {
				if strings.Contains(l, shimRoot.dir) || strings.Contains(l, filepath.Join(c.State, "io.containerd.runtime.v2.task")) {
					left = append(left, "mount: "+l)
				}
			}
		}
		tasks, _ := filepath.Glob(filepath.Join(shimRoot.dir, "tasks", "*", "*"))
		for _, d := range tasks {
			left = append(left, "task dir: "+d)
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Errorf("left after the containers were removed:\n%s", strings.Join(left, "\n"))
	}
}
