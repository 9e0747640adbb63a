package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/boxrund/client"
)

// The boxrund tests run the release binary as a user would: built by
// scripts/build.sh (agent embedded), started with no Go toolchain on PATH
// and an empty module cache, driven over its Unix socket and TCP.

var release struct {
	once sync.Once
	dir  string // removed when the suite ends (133 MB)
	bin  string // the boxrund binary
	err  error
}

func boxrundBinary(t *testing.T) string {
	t.Helper()
	release.once.Do(func() {
		dir, err := os.MkdirTemp("", "boxrun-release-")
		if err != nil {
			release.err = err
			return
		}
		release.dir = dir
		out, err := exec.Command("../scripts/build.sh", dir).CombinedOutput()
		if err != nil {
			release.err = fmt.Errorf("scripts/build.sh: %v\n%s", err, out)
			return
		}
		release.bin = filepath.Join(dir, "boxrund")
	})
	if release.err != nil {
		t.Fatal(release.err)
	}
	return release.bin
}

// daemon is a running boxrund process.
type daemon struct {
	cmd    *exec.Cmd
	state  string // BOXRUN_STATE_DIR
	socket string
	addr   string // host:port
	log    *bytes.Buffer
	done   chan error
}

// pathWithoutGo is a PATH with the system's tools (QEMU, mkfs.ext4, ...)
// and no go command.
func pathWithoutGo(t *testing.T) string {
	t.Helper()
	p := "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
	if g, err := lookPathIn("go", p); err == nil {
		t.Fatalf("%s is on the system PATH: this test needs a PATH without go", g)
	}
	return p
}

func lookPathIn(name, path string) (string, error) {
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 && !fi.IsDir() {
			return p, nil
		}
	}
	return "", os.ErrNotExist
}

// startDaemon starts boxrund on state with a free TCP port; env adds to
// its environment. The process is killed when the test ends, if still up.
func startDaemon(t *testing.T, bin, state string, env ...string) *daemon {
	t.Helper()
	d := &daemon{state: state, socket: filepath.Join(state, "boxrun.sock"), log: &bytes.Buffer{}, done: make(chan error, 1)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.addr = ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(d.addr)
	d.cmd = exec.Command(bin, "--port", port)
	home := filepath.Join(filepath.Dir(state), "home")
	os.MkdirAll(home, 0o700)
	gomod := filepath.Join(filepath.Dir(state), "empty-gomodcache")
	os.MkdirAll(gomod, 0o700)
	d.cmd.Env = append([]string{
		"PATH=" + pathWithoutGo(t), "HOME=" + home, "BOXRUN_STATE_DIR=" + state,
		"GOMODCACHE=" + gomod, "GOPATH=" + gomod, "GOFLAGS=-mod=mod", "GOPROXY=off",
		"BOXRUN_MAX_CPU=64", "BOXRUN_MAX_MEMORY_MB=65536",
	}, env...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(30 * time.Second):
				d.cmd.Process.Kill()
				<-d.done
			}
		}
		if t.Failed() {
			t.Logf("boxrund log:\n%s", d.log)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if res, err := d.client("unix").Get("http://localhost/v1/info"); err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return d
			}
		}
		select {
		case err := <-d.done:
			t.Fatalf("boxrund exited: %v\n%s", err, d.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("boxrund did not answer on %s in 30 s:\n%s", d.socket, d.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *daemon) client(transport string) *http.Client {
	if transport == "tcp" {
		return &http.Client{Transport: &http.Transport{}}
	}
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "unix", d.socket)
	}}}
}

// call sends a JSON request over the socket and decodes the answer.
func (d *daemon) call(t *testing.T, method, path, body string, want int) map[string]any {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, "http://localhost"+path, r)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := d.client("unix").Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != want {
		t.Fatalf("%s %s: %d %s, want %d", method, path, res.StatusCode, b, want)
	}
	var m map[string]any
	json.Unmarshal(b, &m)
	return m
}

// wait waits for the process to exit and returns its exit code.
func (d *daemon) wait(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-d.done:
		return d.cmd.ProcessState.ExitCode()
	case <-time.After(within):
		t.Fatalf("boxrund still running %v after the signal:\n%s", within, d.log)
		return -1
	}
}

// TestBoxrundRelease runs the release boxrund with no Go toolchain and
// drives it with the Python compatibility test over the socket and over
// TCP; then kill -9 and a restart re-attach a running box; then SIGTERM
// ends open streams, stops the boxes with their disks kept, and removes
// the socket.
func TestBoxrundRelease(t *testing.T) {
	python := "/usr/bin/python3"
	if err := exec.Command(python, "-c", "import httpx").Run(); err != nil {
		t.Fatalf("%s with httpx is needed (Debian's python3-httpx; scripts/setup.sh installs it): %v", python, err)
	}
	bin := boxrundBinary(t)
	tmp := t.TempDir()
	state := filepath.Join(tmp, "state")
	// The SDK creates boxes of "python": a short name, resolved through
	// registries.conf to a (busybox) image in the local registry.
	ref, err := fx.registry.PushLayout(ctxT(t, time.Minute), filepath.Join(filepath.Dir(fx.dataDir), "busybox"), "library/python:latest")
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(tmp, "registries.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n\n[aliases]\n\"python\" = %q\n",
		fx.registry.Addr, strings.TrimSuffix(ref, ":latest"))), 0o644)
	d := startDaemon(t, bin, state, "CONTAINERS_REGISTRIES_CONF="+conf)

	if fi, err := os.Stat(d.socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v: %v", fi, err)
	}
	for _, transport := range []string{"unix", "tcp"} {
		t.Run("compat-"+transport, func(t *testing.T) {
			cmd := exec.Command(python, "testdata/boxrun_compat.py")
			work := filepath.Join(tmp, "py-"+transport)
			os.MkdirAll(work, 0o755)
			cmd.Env = append(os.Environ(), "BOXRUN_TEST_IMAGE=python", "BOXRUN_TEST_TMP="+work, "BOXRUN_TEST_PREFIX="+transport+"-", "PYTHONUNBUFFERED=1")
			if transport == "unix" {
				cmd.Env = append(cmd.Env, "BOXRUN_TEST_SOCKET="+d.socket)
			} else {
				cmd.Env = append(cmd.Env, "BOXRUN_TEST_URL=http://"+d.addr)
			}
			out, err := cmd.CombinedOutput()
			t.Logf("python compat over %s:\n%s", transport, out)
			if err != nil {
				t.Fatalf("python compat over %s failed: %v", transport, err)
			}
			if !strings.Contains(string(out), "checks ok") || strings.Contains(string(out), "FAIL ") {
				t.Fatalf("python compat over %s: no clean summary", transport)
			}
		})
	}
	// The agent came from the binary: nothing was built.
	if m, _ := filepath.Glob(filepath.Join(state, "cache", "agent-embedded-*")); len(m) == 0 {
		t.Errorf("no embedded agent in the cache")
	}
	agents, _ := filepath.Glob(filepath.Join(state, "cache", "agent-*"))
	for _, a := range agents {
		if !strings.HasPrefix(filepath.Base(a), "agent-embedded-") {
			t.Errorf("an agent was built: %s", a)
		}
	}
	if t.Failed() {
		return
	}

	// kill -9, restart: the running box is re-attached, usable, with its
	// files; an exec from before the crash replays.
	// With network: a host port it may reach and a published port, both
	// to survive the restart.
	hostPort := httpServer(t, listen(t, "127.0.0.1:0"), "host")
	pubLn := listen(t, "127.0.0.1:0")
	pub := pubLn.Addr().(*net.TCPAddr).Port
	pubLn.Close()
	box := d.call(t, "POST", "/v1/boxes", fmt.Sprintf(`{"image":"python","name":"survivor","cpu":1,"memory_mb":256,"disk_size_gb":1,
		"network":true,"network_policy":{"allow_host_ports":[%d],"deny":["203.0.113.0/24"]},"ports":[{"host_port":%d,"guest_port":8000}]}`, hostPort, pub), 201)
	id := box["id"].(string)
	if np, _ := box["network_policy"].(map[string]any); np == nil || fmt.Sprint(np["allow_host_ports"]) != fmt.Sprintf("[%d]", hostPort) || fmt.Sprint(np["deny"]) != "[203.0.113.0/24]" {
		t.Errorf("network_policy in box JSON: %v", box["network_policy"])
	}
	if ports, _ := box["ports"].([]any); len(ports) != 1 || ports[0].(map[string]any)["host_port"] != float64(pub) {
		t.Errorf("ports in box JSON: %v", box["ports"])
	}
	x := d.call(t, "POST", "/v1/boxes/survivor/exec", `{"cmd":["sh","-c","echo kept > /root/mark; echo before"]}`, 201)
	waitExecDone(t, d, x["id"].(string))
	d.cmd.Process.Kill()
	<-d.done
	if _, err := os.Stat(d.socket); err != nil {
		t.Fatalf("a killed boxrund should leave its socket (stale): %v", err)
	}
	d2 := startDaemon(t, bin, state, "CONTAINERS_REGISTRIES_CONF="+conf)
	got := d2.call(t, "GET", "/v1/boxes/"+id, "", 200)
	if got["status"] != "running" {
		t.Fatalf("after kill -9 and restart: %v", got)
	}
	y := d2.call(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["cat","/root/mark"]}`, 201)
	if out := sseOutput(t, d2, y["id"].(string)); out != "kept\n" {
		t.Errorf("re-attached box: %q", out)
	}
	if out := sseOutput(t, d2, x["id"].(string)); out != "before\n" {
		t.Errorf("replay of an exec from before the crash: %q", out)
	}
	// Its network came back: the host port it may reach, and its published
	// port (served by httpd in the box).
	w := d2.call(t, "POST", "/v1/boxes/"+id+"/exec", fmt.Sprintf(`{"cmd":["wget","-qO-","http://10.0.2.2:%d/"]}`, hostPort), 201)
	if out := sseOutput(t, d2, w["id"].(string)); out != "hello host" {
		t.Errorf("host port after re-attach: %q", out)
	}
	d2.call(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["httpd","-f","-p","8000","-h","/root"]}`, 201)
	var page string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && page != "kept\n"; time.Sleep(200 * time.Millisecond) {
		if res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/mark", pub)); err == nil {
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			page = string(b)
		}
	}
	if page != "kept\n" {
		t.Errorf("published port after re-attach: %q", page)
	}

	// SIGTERM: an open stream ends, the process exits 0, the box is
	// stopped with its disk kept, the socket is gone, no VMM is left.
	long := d2.call(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["sh","-c","echo start; sleep 600"]}`, 201)
	res, err := d2.client("tcp").Get("http://" + d2.addr + "/v1/boxes/x/exec/" + long["id"].(string) + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	br := bufio.NewReader(res.Body)
	if line, _ := br.ReadString('\n'); !strings.HasPrefix(line, "event: log") {
		t.Fatalf("first line of stream %q", line)
	}
	d2.cmd.Process.Signal(syscall.SIGTERM)
	ended := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, br); ended <- err }()
	select {
	case <-ended:
	case <-time.After(20 * time.Second):
		t.Errorf("open event stream did not end after SIGTERM")
	}
	if code := d2.wait(t, time.Minute); code != 0 {
		t.Errorf("boxrund exit code %d after SIGTERM:\n%s", code, d2.log)
	}
	if _, err := os.Stat(d2.socket); !os.IsNotExist(err) {
		t.Errorf("socket left after SIGTERM: %v", err)
	}
	if left := vmmProcesses(state); len(left) > 0 {
		t.Errorf("VMM processes left after SIGTERM: %v", left)
	}
	if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", pub)); err != nil {
		t.Errorf("published port not released when the box stopped: %v", err)
	} else {
		l.Close()
	}
	eng, err := boxrun.New(ctxT(t, time.Minute), boxrun.Config{DataDir: state})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	b, err := eng.Get(ctxT(t, time.Minute), id)
	if err != nil || b.Status != "stopped" {
		t.Errorf("box after SIGTERM: %+v %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(state, "boxes", id, "disk.ext4")); err != nil {
		t.Errorf("disk not kept: %v", err)
	}
	if err := eng.Remove(ctxT(t, time.Minute), id, boxrun.Force); err != nil {
		t.Error(err)
	}
}

func waitExecDone(t *testing.T, d *daemon, id string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		x := d.call(t, "GET", "/v1/boxes/x/exec/"+id, "", 200)
		if x["status"] != "running" {
			return x
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec %s still running", id)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sseOutput follows an exec's event stream over the socket to its exit
// event (the stream must end with one) and returns its stdout.
func sseOutput(t *testing.T, d *daemon, id string) string {
	t.Helper()
	var out strings.Builder
	if _, err := client.New(client.Options{Socket: d.socket}).Wait(ctxT(t, time.Minute), id, &out, nil); err != nil {
		t.Errorf("stream of %s: %v", id, err)
	}
	return out.String()
}
