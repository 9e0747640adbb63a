package runtime

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
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

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun/runtime/ch"
)

// The contract tests drive the Cloud Hypervisor driver against an HTTP
// server that checks every request (method, path, JSON body) against CH's
// own API document and answers as CH does. The driver starts fakech (built
// by the test) as its "cloud-hypervisor": in proxy mode it forwards each
// API connection to the test's server, so the requests are the driver's,
// over a real Unix socket, from a real child process in its own session.

// chSpecPath is CH's OpenAPI document (v53.0), in the workspace's shared/.
const chSpecPath = "../../shared/spec/cloud-hypervisor/cloud-hypervisor-v53.0.yaml"

// loadCHSpec loads the API document for validation. Every object schema
// that does not say otherwise is closed (additionalProperties: false), so
// that a field the document does not define (a misspelt one) fails too.
func loadCHSpec(t *testing.T) routers.Router {
	t.Helper()
	path := chSpecPath
	if p := os.Getenv("BOXRUN_CH_SPEC"); p != "" {
		path = p
	}
	if _, err := os.Stat(path); err != nil {
		t.Skipf("CH API document not found (%v): set BOXRUN_CH_SPEC", err)
	}
	doc, err := openapi3.NewLoader().LoadFromFile(path)
	if err != nil {
		t.Fatalf("load %s: %v", path, err)
	}
	no := false
	for _, ref := range doc.Components.Schemas {
		s := ref.Value
		if s != nil && s.Type.Is(openapi3.TypeObject) && len(s.Properties) > 0 &&
			s.AdditionalProperties.Has == nil && s.AdditionalProperties.Schema == nil {
			s.AdditionalProperties.Has = &no
		}
	}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatalf("router: %v", err)
	}
	return router
}

// answer is a scripted reply: status and body (a value to encode as JSON,
// or raw bytes).
type answer struct {
	status int
	body   any
}

// chServer plays cloud-hypervisor's API for the contract tests.
type chServer struct {
	t      *testing.T
	router routers.Router
	sock   string

	mu        sync.Mutex
	calls     []string // "PUT vm.create", in order
	bodies    map[string][]byte
	script    map[string][]answer // endpoint -> replies to give first
	cfg       json.RawMessage
	state     string
	violation []string
	version   string

	restored      []byte   // the config.json of the last vm.restore
	restoredFiles []string // the files of its directory
}

type peerKey struct{}

func newCHServer(t *testing.T) *chServer {
	s := &chServer{t: t, router: loadCHSpec(t), bodies: map[string][]byte{}, script: map[string][]answer{}, version: "v53.0"}
	s.sock = filepath.Join(t.TempDir(), "up.sock")
	l, err := net.Listen("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler: s,
		// The peer's pid: the fakech process, which vmm.shutdown ends.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if uc, ok := c.(*net.UnixConn); ok {
				if raw, err := uc.SyscallConn(); err == nil {
					raw.Control(func(fd uintptr) {
						if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
							ctx = context.WithValue(ctx, peerKey{}, int(cred.Pid))
						}
					})
				}
			}
			return ctx
		},
	}
	go srv.Serve(l)
	t.Cleanup(func() {
		srv.Close()
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, v := range s.violation {
			t.Errorf("contract violation: %s", v)
		}
	})
	return s
}

// then scripts the next replies of an endpoint.
func (s *chServer) then(endpoint string, a ...answer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.script[endpoint] = append(s.script[endpoint], a...)
}

// reset forgets the VM and the calls, as a new CH process would.
func (s *chServer) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg, s.state, s.calls = nil, "", nil
}

// take returns the calls made since the last take.
func (s *chServer) take() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.calls
	s.calls = nil
	return c
}

func chErr(msgs ...string) []string { return append([]string{"Error from API"}, msgs...) }

func (s *chServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	ep := strings.TrimPrefix(r.URL.Path, "/api/v1/")
	// The document's server is http://localhost/api/v1.
	r.URL.Scheme, r.URL.Host = "http", r.Host
	r.Body = io.NopCloser(bytes.NewReader(body))
	route, params, err := s.router.FindRoute(r)
	var in *openapi3filter.RequestValidationInput
	if err != nil {
		s.violate("%s %s: no such operation in the document: %v", r.Method, r.URL.Path, err)
	} else {
		in = &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route,
			Options: &openapi3filter.Options{MultiError: true}}
		if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
			s.violate("%s %s %s: %v", r.Method, r.URL.Path, body, err)
		}
		if route.Operation.RequestBody == nil && len(bytes.TrimSpace(body)) > 0 {
			s.violate("%s %s: a body (%s) where the document has none", r.Method, r.URL.Path, body)
		}
	}
	s.mu.Lock()
	s.calls = append(s.calls, r.Method+" "+ep)
	s.bodies[ep] = body
	var a *answer
	if q := s.script[ep]; len(q) > 0 {
		a = &q[0]
		s.script[ep] = q[1:]
	}
	if a == nil {
		a = s.defaultAnswer(ep, body)
	}
	s.mu.Unlock()
	var out []byte
	switch b := a.body.(type) {
	case nil:
	case []byte:
		out = b
	default:
		out, _ = json.Marshal(b)
	}
	if len(out) > 0 {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(a.status)
	w.Write(out)
	// Answers with a documented body are checked against the document too.
	if in != nil && a.status == http.StatusOK && len(out) > 0 && ep != "vmm.shutdown" {
		err := openapi3filter.ValidateResponse(context.Background(), &openapi3filter.ResponseValidationInput{
			RequestValidationInput: in, Status: a.status, Header: w.Header(), Body: io.NopCloser(bytes.NewReader(out)),
		})
		if err != nil && !bytes.HasPrefix(out, []byte("not json")) {
			s.violate("the test's own answer to %s: %v", ep, err)
		}
	}
	if ep == "vmm.shutdown" && a.status/100 == 2 {
		if fl, ok := w.(http.Flusher); ok {
			fl.Flush()
		}
		if pid, ok := r.Context().Value(peerKey{}).(int); ok {
			go func() { time.Sleep(20 * time.Millisecond); syscall.Kill(pid, syscall.SIGTERM) }()
		}
	}
}

func (s *chServer) violate(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.violation = append(s.violation, fmt.Sprintf(format, args...))
}

// defaultAnswer answers as CH v53 does. Called with s.mu held.
func (s *chServer) defaultAnswer(ep string, body []byte) *answer {
	switch ep {
	case "vmm.ping":
		return &answer{200, ch.VmmPingResponse{Version: s.version, BuildVersion: s.version, PID: 1, Features: []string{"kvm"}}}
	case "vm.create":
		if s.cfg != nil {
			return &answer{500, chErr("The VM could not be created", "VM is already created")}
		}
		s.cfg, s.state = json.RawMessage(body), ch.StateCreated
		return &answer{204, nil}
	case "vm.boot":
		if s.cfg == nil {
			return &answer{404, chErr("The VM could not boot", "VM is not created")}
		}
		s.state = ch.StateRunning
		return &answer{204, nil}
	case "vm.info":
		if s.cfg == nil {
			return &answer{404, chErr("The VM information could not be retrieved", "VM is not created")}
		}
		return &answer{200, map[string]any{"config": s.cfg, "state": s.state}}
	case "vm.shutdown":
		if s.cfg == nil {
			return &answer{404, chErr("The VM could not shut down", "VM is not created")}
		}
		s.state = ch.StateShutdown
		return &answer{204, nil}
	case "vm.delete":
		s.cfg, s.state = nil, ""
		return &answer{204, nil}
	case "vmm.shutdown":
		s.cfg, s.state = nil, ""
		return &answer{200, nil} // v53 answers 200 (the document: 204)
	case "vm.pause", "vm.resume":
		if s.cfg != nil {
			s.state = map[string]string{"vm.pause": ch.StatePaused, "vm.resume": ch.StateRunning}[ep]
		}
		return &answer{204, nil}
	case "vm.snapshot":
		// As CH does: the VM's configuration, state and memory into the
		// destination directory.
		var sc ch.VmSnapshotConfig
		json.Unmarshal(body, &sc)
		if dir, ok := strings.CutPrefix(sc.DestinationURL, "file://"); ok && s.cfg != nil {
			// CH's config.json has more than the create's body: fields it
			// filled in, such as the TAP's own MAC.
			var conf map[string]any
			json.Unmarshal(s.cfg, &conf)
			conf["platform"] = map[string]any{"num_pci_segments": 1}
			if nets, ok := conf["net"].([]any); ok {
				for _, n := range nets {
					n.(map[string]any)["host_mac"] = "fe:00:00:00:00:01"
				}
			}
			b, _ := json.Marshal(conf)
			os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600)
			os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"snapshot_data":{}}`), 0o600)
			os.WriteFile(filepath.Join(dir, "memory-ranges"), make([]byte, 4096), 0o600)
		}
		return &answer{204, nil}
	case "vm.restore":
		if s.cfg != nil {
			return &answer{500, chErr("The VM could not be restored", "VM is already created")}
		}
		var rc ch.RestoreConfig
		json.Unmarshal(body, &rc)
		if dir, ok := strings.CutPrefix(rc.SourceURL, "file://"); ok {
			if b, err := os.ReadFile(filepath.Join(dir, "config.json")); err == nil {
				s.cfg, s.state = json.RawMessage(b), ch.StatePaused
				s.restored = b
				s.restoredFiles, _ = filepath.Glob(filepath.Join(dir, "*"))
			}
		}
		return &answer{204, nil}
	}
	return &answer{404, chErr("unknown endpoint " + ep)}
}

// fakeCHBinaries builds fakech and returns it as "cloud-hypervisor" and
// as "virtiofsd".
func fakeCHBinaries(t *testing.T) (chBin, fsBin string) {
	t.Helper()
	dir := t.TempDir()
	chBin = filepath.Join(dir, "cloud-hypervisor")
	build := exec.Command("go", "build", "-o", chBin, "github.com/boxrun/boxrun/runtime/ch/fakech")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build fakech: %v\n%s", err, out)
	}
	fsBin = filepath.Join(dir, "virtiofsd")
	if err := os.Symlink(chBin, fsBin); err != nil {
		t.Fatal(err)
	}
	return chBin, fsBin
}

// canTap reports whether this process may create TAP devices.
func canTap() bool {
	if os.Geteuid() != 0 {
		return false
	}
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// contractVM is a VM configuration with one of everything.
func contractVM(t *testing.T, id string, network bool) VMConfig {
	dir := t.TempDir()
	files := t.TempDir()
	write := func(name string) string {
		p := filepath.Join(files, name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	vol := t.TempDir()
	return VMConfig{
		ID: id, Dir: dir, CPUs: 2, MemoryMB: 512,
		Kernel: write("vmlinux"), Initramfs: write("initramfs.cpio"),
		Cmdline: "boxrun.base=/dev/vda boxrun.data=/dev/vdb",
		Disks:   []Disk{{Path: write("base.ext4"), ReadOnly: true}, {Path: write("disk.ext4")}},
		Volumes: []Volume{{Tag: "vol0", HostPath: vol, ReadOnly: true}, {Tag: "vol1", HostPath: vol}},
		Network: network, MAC: "52:54:00:12:34:56",
	}
}

func wantCalls(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, ", ") != strings.Join(want, ", ") {
		t.Errorf("%s: API calls\n got %q\nwant %q", what, got, want)
	}
}

// gone waits until pid is no longer running.
func gone(pid int) bool {
	return waitFor(context.Background(), 10*time.Second, func() bool { return !processAlive(pid) })
}

func TestCHContractLifecycle(t *testing.T) {
	srv := newCHServer(t)
	chBin, fsBin := fakeCHBinaries(t)
	t.Setenv("FAKECH_UPSTREAM", srv.sock)
	network := canTap()
	cfg := contractVM(t, "box_contract1", network)
	drv := &CloudHypervisor{Binary: chBin, Virtiofsd: fsBin}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// Create, boot, info.
	vm, err := drv.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, "start", srv.take(), "GET vmm.ping", "PUT vm.create", "PUT vm.boot", "GET vm.info")
	var vc ch.VmConfig
	if err := json.Unmarshal(srv.bodies["vm.create"], &vc); err != nil {
		t.Fatal(err)
	}
	checkVMConfig(t, &vc, cfg, network)
	for _, f := range []string{chAPISock, chPidFile, "fs-vol0.sock", "fs-vol1.sock", "virtiofsd-vol0.pid"} {
		if _, err := os.Stat(filepath.Join(cfg.Dir, f)); err != nil {
			t.Errorf("after start: %v", err)
		}
	}
	tap, _ := tapNames(cfg.ID)
	if network && !linkExists(tap) {
		t.Errorf("no tap %s", tap)
	}
	pid := vm.PID()
	if c, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); !bytes.Contains(c, []byte("--api-socket\x00path=api.sock")) {
		t.Errorf("cloud-hypervisor command line %q", c)
	}
	if sid, _ := unix.Getsid(pid); sid != pid {
		t.Errorf("cloud-hypervisor runs in session %d, not its own", sid)
	}

	// The engine restarts: a new driver finds the VM through its API.
	vm2, err := (&CloudHypervisor{Binary: chBin, Virtiofsd: fsBin}).Attach(ctx, cfg.Dir, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, "attach", srv.take(), "GET vmm.ping", "GET vm.info")
	if vm2.PID() != pid {
		t.Errorf("attached pid %d, want %d", vm2.PID(), pid)
	}
	if network {
		conn, err := vm2.DialNetwork(ctx)
		if err != nil {
			t.Errorf("DialNetwork after attach: %v", err)
		} else {
			conn.Close()
		}
	}

	// Shutdown and removal: vm.shutdown, vmm.shutdown; nothing left.
	if err := vm2.Kill(); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, "kill", srv.take(), "PUT vm.shutdown", "PUT vmm.shutdown")
	select {
	case <-vm.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the first handle did not see the VMM exit")
	}
	vm.Kill() // reaps; no API calls for a VMM that is gone
	wantCalls(t, "kill of an exited VM", srv.take())
	left, _ := filepath.Glob(filepath.Join(cfg.Dir, "*"))
	for _, f := range left {
		if b := filepath.Base(f); strings.HasSuffix(b, ".sock") || strings.HasSuffix(b, ".pid") {
			t.Errorf("left behind: %s", b)
		}
	}
	if network && linkExists(tap) {
		t.Errorf("tap %s left behind", tap)
	}
	if _, err := (&CloudHypervisor{Binary: chBin}).Attach(ctx, cfg.Dir, cfg.ID); err == nil {
		t.Error("attach after removal succeeded")
	}
	wantCalls(t, "attach without a VM", srv.take())
}

// checkVMConfig checks what the driver asked CH for.
func checkVMConfig(t *testing.T, vc *ch.VmConfig, cfg VMConfig, network bool) {
	t.Helper()
	if vc.Cpus == nil || vc.Cpus.BootVcpus != 2 || vc.Cpus.MaxVcpus != 2 {
		t.Errorf("cpus %+v", vc.Cpus)
	}
	if vc.Memory == nil || vc.Memory.Size != 512<<20 || !vc.Memory.Shared {
		t.Errorf("memory %+v (virtio-fs needs it shared)", vc.Memory)
	}
	p := vc.Payload
	if p.Kernel != cfg.Kernel || p.Initramfs != cfg.Initramfs {
		t.Errorf("payload %+v", p)
	}
	for _, w := range []string{"console=ttyS0", "boxrun.vsock=1024", "boxrun.halt=poweroff", "boxrun.volumes=virtiofs", "boxrun.base=/dev/vda boxrun.data=/dev/vdb"} {
		if !strings.Contains(p.Cmdline, w) {
			t.Errorf("cmdline %q lacks %q", p.Cmdline, w)
		}
	}
	if len(vc.Disks) != 2 || vc.Disks[0].Path != cfg.Disks[0].Path || !vc.Disks[0].Readonly || vc.Disks[1].Readonly || vc.Disks[1].ImageType != "Raw" {
		t.Errorf("disks %+v", vc.Disks)
	}
	if len(vc.Fs) != 2 || vc.Fs[0].Tag != "vol0" || vc.Fs[0].Socket != "fs-vol0.sock" {
		t.Errorf("fs %+v", vc.Fs)
	}
	if vc.Serial == nil || vc.Serial.Mode != "Socket" || vc.Serial.Socket != consoleSock || vc.Console == nil || vc.Console.Mode != "Off" {
		t.Errorf("serial %+v console %+v", vc.Serial, vc.Console)
	}
	if vc.Vsock == nil || vc.Vsock.Cid != 3 || vc.Vsock.Socket != chVsockSock {
		t.Errorf("vsock %+v", vc.Vsock)
	}
	if vc.Rng == nil || vc.Rng.Src != "/dev/urandom" {
		t.Errorf("rng %+v", vc.Rng)
	}
	if !network {
		if len(vc.Net) != 0 {
			t.Errorf("net %+v without network", vc.Net)
		}
		return
	}
	tap, _ := tapNames(cfg.ID)
	if len(vc.Net) != 1 || vc.Net[0].Tap != tap || vc.Net[0].Mac != cfg.MAC || vc.Net[0].Mtu != chNetMTU ||
		vc.Net[0].OffloadTSO == nil || *vc.Net[0].OffloadTSO || vc.Net[0].OffloadCsum == nil || *vc.Net[0].OffloadCsum {
		t.Errorf("net %+v", vc.Net)
	}
}

// contractDriver is the driver on fakech in front of a new contract server.
func contractDriver(t *testing.T) (srv *chServer, drv *CloudHypervisor, network bool, ctx context.Context) {
	srv = newCHServer(t)
	chBin, fsBin := fakeCHBinaries(t)
	t.Setenv("FAKECH_UPSTREAM", srv.sock)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return srv, &CloudHypervisor{Binary: chBin, Virtiofsd: fsBin}, canTap(), ctx
}

// nothingLeft checks that a VM that failed to start left nothing: no
// process in its dir, no socket, pid file or restore dir, no TAP.
func nothingLeft(t *testing.T, cfg VMConfig) {
	t.Helper()
	time.Sleep(50 * time.Millisecond)
	if left := processesIn(cfg.Dir); len(left) > 0 {
		t.Errorf("processes left: %v", left)
	}
	ents, _ := os.ReadDir(cfg.Dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".sock") || strings.HasSuffix(e.Name(), ".pid") || e.Name() == "restore" {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if tap, _ := tapNames(cfg.ID); linkExists(tap) {
		t.Errorf("tap %s left behind", tap)
	}
}

// TestCHContractErrors checks the driver's handling of CH's error answers:
// each failure of Start leaves no process, socket or TAP behind and names
// CH's message.
func TestCHContractErrors(t *testing.T) {
	srv, drv, network, ctx := contractDriver(t)

	startFails := func(t *testing.T, id, want string, calls ...string) {
		t.Helper()
		cfg := contractVM(t, id, network)
		_, err := drv.Start(ctx, cfg)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("start: got %v, want %q", err, want)
		}
		wantCalls(t, "start", srv.take(), calls...)
		nothingLeft(t, cfg)
		srv.reset()
	}

	t.Run("create 500", func(t *testing.T) {
		srv.then("vm.create", answer{500, chErr("The VM could not be created", "Error validating configuration", "Disk path does not exist")})
		startFails(t, "box_err1", "The VM could not be created: Error validating configuration: Disk path does not exist",
			"GET vmm.ping", "PUT vm.create")
	})
	t.Run("boot 404", func(t *testing.T) {
		srv.then("vm.boot", answer{404, chErr("The VM could not boot", "VM is not created")})
		startFails(t, "box_err2", "404: Error from API: The VM could not boot: VM is not created",
			"GET vmm.ping", "PUT vm.create", "PUT vm.boot")
	})
	t.Run("boot 500 not json", func(t *testing.T) {
		srv.then("vm.boot", answer{500, []byte("internal failure\n")})
		startFails(t, "box_err3", "500: internal failure", "GET vmm.ping", "PUT vm.create", "PUT vm.boot")
	})
	t.Run("too old", func(t *testing.T) {
		srv.then("vmm.ping", answer{200, ch.VmmPingResponse{Version: "v38.0"}})
		startFails(t, "box_err4", "cloud-hypervisor v38.0 is too old: boxrun needs v39 or newer", "GET vmm.ping")
	})
	t.Run("not running after boot", func(t *testing.T) {
		srv.then("vm.info", answer{200, map[string]any{"config": json.RawMessage(`{"payload":{}}`), "state": "Shutdown"}})
		startFails(t, "box_err5", `reports the VM "Shutdown" after boot`, "GET vmm.ping", "PUT vm.create", "PUT vm.boot", "GET vm.info")
	})
	t.Run("info not json", func(t *testing.T) {
		srv.then("vm.info", answer{200, []byte("not json")})
		startFails(t, "box_err6", "decoding the answer", "GET vmm.ping", "PUT vm.create", "PUT vm.boot", "GET vm.info")
	})

	t.Run("attach to a VMM that fails info is killed", func(t *testing.T) {
		srv.reset()
		cfg := contractVM(t, "box_err7", false)
		vm, err := drv.Start(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		srv.take()
		srv.then("vm.info", answer{500, chErr("The VM information could not be retrieved")})
		if _, err := drv.Attach(ctx, cfg.Dir, cfg.ID); err == nil || !strings.Contains(err.Error(), "could not be retrieved") {
			t.Fatalf("attach: %v", err)
		}
		wantCalls(t, "attach", srv.take(), "GET vmm.ping", "GET vm.info")
		if !gone(vm.PID()) {
			t.Error("the VMM still runs")
		}
		vm.Kill()
		srv.take()
	})

	t.Run("kill when shutdown fails", func(t *testing.T) {
		srv.reset()
		cfg := contractVM(t, "box_err8", false)
		vm, err := drv.Start(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		srv.take()
		srv.then("vm.shutdown", answer{500, chErr("The VM could not shut down")})
		start := time.Now()
		if err := vm.Kill(); err != nil {
			t.Fatal(err)
		}
		wantCalls(t, "kill", srv.take(), "PUT vm.shutdown")
		if d := time.Since(start); d > 8*time.Second {
			t.Errorf("kill took %v", d)
		}
		if processAlive(vm.PID()) {
			t.Error("the VMM still runs")
		}
	})

	// The client's calls on their own, and an error answer of each.
	t.Run("client", func(t *testing.T) {
		srv.reset()
		c := ch.NewClient(srv.sock)
		for _, call := range []func() error{
			func() error { return c.PauseVM(ctx) },
			func() error { return c.Snapshot(ctx, "file:///var/lib/boxrun/snap") },
			func() error { return c.ResumeVM(ctx) },
			func() error { return c.DeleteVM(ctx) },
			func() error {
				return c.Restore(ctx, &ch.RestoreConfig{SourceURL: "file:///var/lib/boxrun/snap", Prefault: true})
			},
		} {
			if err := call(); err != nil {
				t.Error(err)
			}
		}
		wantCalls(t, "client", srv.take(), "PUT vm.pause", "PUT vm.snapshot", "PUT vm.resume", "PUT vm.delete", "PUT vm.restore")
		srv.then("vm.pause", answer{405, chErr("The VM could not be paused", "VM is not running")})
		err := c.PauseVM(ctx)
		var ae *ch.APIError
		if !errors.As(err, &ae) || ae.Status != 405 || len(ae.Messages) != 3 || ae.Messages[2] != "VM is not running" {
			t.Errorf("pause error %#v", err)
		}
		if _, err := c.Info(ctx); !ch.IsNotFound(err) {
			t.Errorf("info without a VM: %v, want a 404", err)
		}
		srv.take()
	})
}

// processesIn lists the pids of processes whose working directory is dir.
func processesIn(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		if cwd, _ := os.Readlink(filepath.Join("/proc", e.Name(), "cwd")); cwd == dir && processAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestCHContractWarmStart drives the driver's warm start through the API
// document: a template booted, paused and snapshotted; a box restored from
// it with its own disks, TAP and MAC written into the restored
// config.json; the template key; and a restore that CH refuses.
func TestCHContractWarmStart(t *testing.T) {
	srv, drv, network, ctx := contractDriver(t)

	// Volumes boot cold on CH (a restored virtio-fs device hangs with
	// today's virtiofsd): no key for them.
	if _, _, err := drv.TemplateKey(contractVM(t, "box_vol", network)); err == nil {
		t.Error("a template key for a VM with volumes")
	}
	noVolumes := func(c VMConfig) VMConfig { c.Volumes = nil; return c }
	tpl := noVolumes(contractVM(t, "tpl-contract", network))
	vm, err := drv.StartTemplate(ctx, tpl)
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, "template start", srv.take(), "GET vmm.ping", "PUT vm.create", "PUT vm.boot", "GET vm.info")
	if err := drv.SaveTemplate(ctx, vm); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, "save", srv.take(), "PUT vm.pause", "PUT vm.snapshot", "PUT vm.shutdown", "PUT vmm.shutdown")
	var sc ch.VmSnapshotConfig
	json.Unmarshal(srv.bodies["vm.snapshot"], &sc)
	if sc.DestinationURL != "file://"+filepath.Join(tpl.Dir, chSnapshotDir+".tmp") {
		t.Errorf("snapshot destination %q", sc.DestinationURL)
	}
	for _, f := range []string{"config.json", "state.json", "memory-ranges"} {
		if _, err := os.Stat(filepath.Join(tpl.Dir, chSnapshotDir, f)); err != nil {
			t.Errorf("template: %v", err)
		}
	}
	if left := processesIn(tpl.Dir); len(left) > 0 {
		t.Errorf("processes left by the template: %v", left)
	}
	srv.reset()

	// A box of the same shape: its own disks (same sizes), id and MAC.
	box := noVolumes(contractVM(t, "box_warm1", network))
	box.MAC = "52:54:00:ab:cd:ef"
	k1, f1, err := drv.TemplateKey(tpl)
	if err != nil {
		t.Fatal(err)
	}
	if k2, f2, _ := drv.TemplateKey(box); k2 != k1 || f2 != f1 {
		t.Errorf("template key depends on per-box values: %s vs %s", k1, k2)
	}
	rvm, err := drv.Restore(ctx, box, tpl.Dir)
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, "restore", srv.take(), "GET vmm.ping", "PUT vm.restore", "PUT vm.resume", "GET vm.info")
	var rc ch.RestoreConfig
	json.Unmarshal(srv.bodies["vm.restore"], &rc)
	restoreDir := filepath.Join(box.Dir, "restore")
	if rc.SourceURL != "file://"+restoreDir || rc.MemoryRestoreMode != "OnDemand" {
		t.Errorf("restore source %q, memory mode %q (want OnDemand)", rc.SourceURL, rc.MemoryRestoreMode)
	}
	var vc ch.VmConfig
	if err := json.Unmarshal(srv.restored, &vc); err != nil {
		t.Fatalf("restored config.json: %v", err)
	}
	if len(vc.Disks) != 2 || vc.Disks[0].Path != box.Disks[0].Path || vc.Disks[1].Path != box.Disks[1].Path || !vc.Disks[0].Readonly {
		t.Errorf("restored disks %+v, want the box's %+v", vc.Disks, box.Disks)
	}
	if vc.Vsock == nil || vc.Vsock.Socket != chVsockSock || vc.Serial == nil || vc.Serial.Socket != consoleSock {
		t.Errorf("restored sockets must stay relative to the box's dir: vsock %+v serial %+v", vc.Vsock, vc.Serial)
	}
	if network {
		tap, _ := tapNames(box.ID)
		if len(vc.Net) != 1 || vc.Net[0].Tap != tap || vc.Net[0].Mac != box.MAC {
			t.Errorf("restored net %+v, want tap %s mac %s", vc.Net, tap, box.MAC)
		}
	}
	if bytes.Contains(srv.restored, []byte("host_mac")) || !bytes.Contains(srv.restored, []byte(`"platform":{"num_pci_segments":1}`)) {
		t.Errorf("restored config.json must drop the template TAP's host_mac and keep what it does not know: %s", srv.restored)
	}
	if len(srv.restoredFiles) != 3 {
		t.Errorf("restore dir held %v", srv.restoredFiles)
	}
	if _, err := os.Stat(restoreDir); !os.IsNotExist(err) {
		t.Errorf("restore dir left: %v", err)
	}
	if err := rvm.Kill(); err != nil {
		t.Fatal(err)
	}
	srv.take()
	srv.reset()

	// The key changes with what the template holds.
	for name, change := range map[string]func(c *VMConfig){
		"cpus":      func(c *VMConfig) { c.CPUs = 3 },
		"memory":    func(c *VMConfig) { c.MemoryMB = 1024 },
		"disk size": func(c *VMConfig) { os.Truncate(c.Disks[1].Path, 3<<30) },
		"read-only": func(c *VMConfig) { c.Disks[1].ReadOnly = true },
		"network":   func(c *VMConfig) { c.Network = !c.Network },
		"cmdline":   func(c *VMConfig) { c.Cmdline += " x=1" },
	} {
		c := noVolumes(contractVM(t, "box_key", network))
		change(&c)
		if k, f, err := drv.TemplateKey(c); err != nil || k == k1 || f == f1 {
			t.Errorf("%s: key %s, %v (the template's %s)", name, k, err, k1)
		}
	}

	// CH refuses the snapshot, on demand and copied: the restore fails
	// and leaves nothing.
	refusal := answer{500, chErr("The VM could not be restored", "Error restoring VM: Failed to restore virtio-block")}
	srv.then("vm.restore", refusal, refusal)
	bad := noVolumes(contractVM(t, "box_warm2", network))
	if _, err := drv.Restore(ctx, bad, tpl.Dir); err == nil || !strings.Contains(err.Error(), "Failed to restore virtio-block") {
		t.Fatalf("restore refused: %v", err)
	}
	wantCalls(t, "refused restore", srv.take(), "GET vmm.ping", "PUT vm.restore", "GET vmm.ping", "PUT vm.restore")
	nothingLeft(t, bad)
	srv.reset()

	// A CH without userfaultfd refuses the on-demand restore: the box is
	// restored by copying, and later ones are copied at once.
	srv.then("vm.restore", answer{500, chErr("The VM could not be restored", "Error restoring VM: userfaultfd: Operation not permitted")})
	for i, want := range [][]string{
		{"GET vmm.ping", "PUT vm.restore", "GET vmm.ping", "PUT vm.restore", "PUT vm.resume", "GET vm.info"},
		{"GET vmm.ping", "PUT vm.restore", "PUT vm.resume", "GET vm.info"},
	} {
		b := noVolumes(contractVM(t, fmt.Sprintf("box_copy%d", i), network))
		v, err := drv.Restore(ctx, b, tpl.Dir)
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		wantCalls(t, fmt.Sprintf("restore %d without userfaultfd", i), srv.take(), want...)
		json.Unmarshal(srv.bodies["vm.restore"], &rc)
		if rc.MemoryRestoreMode != "Copy" {
			t.Errorf("restore %d: memory mode %q, want Copy", i, rc.MemoryRestoreMode)
		}
		v.Kill()
		srv.take()
		srv.reset()
	}
}
