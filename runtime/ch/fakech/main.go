//go:build linux

// Command fakech is a stand-in for cloud-hypervisor in tests on hosts that
// cannot run it (no binary, no KVM). It speaks CH's real protocols: the
// REST API on --api-socket (vmm.ping, vm.create, vm.boot, vm.info,
// vm.shutdown, vm.delete, vmm.shutdown, vm.pause, vm.resume, vm.snapshot,
// vm.restore; errors as CH's JSON arrays of strings), the hybrid vsock socket ("CONNECT <port>\n" -> "OK <n>\n",
// or the connection closed while nothing listens on the port) and the
// serial port on a Unix socket. There is no VM behind them: at vm.boot it
// runs the real guest agent, taken from the initramfs of the VM's payload
// (its /init), as a host process in the agent's host mode, on a box root
// extracted from the VM's first (read-only) disk with debugfs. The
// agent's port comes from boxrun.vsock= on the payload's command line; its
// log goes to the serial port. Like CH, fakech exits when its "guest"
// powers off (the agent exits after a Shutdown).
//
// What it does not do: the writable disk (vdb) is not used (the root is a
// copy of the base disk's files, kept across boots in the VM's directory),
// and there is no NIC or virtio-fs (a VmConfig with "net" or "fs" is
// refused at boot). A first disk without a file system (a warm-start
// template's stand-in) gives the agent an empty root: such a VM only
// answers pings before it is snapshotted.
//
// Snapshots: vm.pause stops the agent (SIGSTOP), vm.snapshot (of a paused
// VM, into an existing directory) writes config.json (the VmConfig),
// state.json (each disk's capacity, as CH's virtio-blk state keeps it) and
// memory-ranges. A host process cannot be snapshotted, so vm.restore
// starts a fresh agent, which is the same thing for an agent that was
// waiting for its Hello. vm.restore refuses what CH would get wrong or
// refuse: a state.json or memory-ranges it cannot read, and a disk whose
// size differs from the capacity in state.json (CH would show the guest
// the snapshot's capacity). With FAKECH_FAIL_RESTORE set, every
// vm.restore fails; with FAKECH_NO_ONDEMAND, every one in OnDemand memory
// mode (as a CH that may not use userfaultfd).
//
// Run as "virtiofsd" (a link named so), it plays the Rust virtiofsd for
// the driver: it says it has --shared-dir and --readonly, creates its
// --socket-path socket and waits to be killed.
//
// With FAKECH_UPSTREAM set, fakech only forwards every connection to its
// API socket to that socket, for contract tests that answer in-process.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/boxrun/boxrun/runtime/ch"
)

const version = "v53.0"

func main() {
	if filepath.Base(os.Args[0]) == "virtiofsd" {
		fakeVirtiofsd(os.Args[1:])
		return
	}
	var api string
	var showVersion bool
	flag.StringVar(&api, "api-socket", "", "path=PATH of the API socket")
	flag.BoolVar(&showVersion, "version", false, "print the version")
	flag.Parse()
	if showVersion {
		fmt.Println("cloud-hypervisor " + version + " (fakech)")
		return
	}
	api = strings.TrimPrefix(api, "path=")
	if i := strings.IndexByte(api, ','); i >= 0 {
		api = api[:i]
	}
	if api == "" {
		fatal(errors.New("--api-socket path=PATH is required"))
	}
	os.Remove(api)
	l, err := net.Listen("unix", api)
	if err != nil {
		fatal(err)
	}
	if up := os.Getenv("FAKECH_UPSTREAM"); up != "" {
		proxy(l, up)
		return
	}
	f := &fake{}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		f.exit(0)
	}()
	srv := &http.Server{Handler: f}
	srv.Serve(l)
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "fakech:", err)
	os.Exit(1)
}

// proxy forwards each API connection to upstream.
func proxy(l net.Listener, upstream string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("unix", upstream)
			if err != nil {
				return
			}
			defer u.Close()
			go func() {
				io.Copy(u, c)
				u.(*net.UnixConn).CloseWrite()
			}()
			io.Copy(c, u)
		}()
	}
}

type fake struct {
	mu      sync.Mutex
	cfg     *ch.VmConfig
	state   string
	serial  net.Listener
	console net.Conn // the serial client, if any
	vsock   net.Listener
	agent   *exec.Cmd
	port    int    // the agent's vsock port
	agentSk string // the agent's socket
}

// apiError answers as CH does: a status and a JSON array of strings.
func apiError(w http.ResponseWriter, status int, msgs ...string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(msgs)
}

func (f *fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ep := strings.TrimPrefix(r.URL.Path, "/api/v1/")
	want := map[string]string{
		"vmm.ping": "GET", "vm.info": "GET", "vm.create": "PUT", "vm.boot": "PUT",
		"vm.shutdown": "PUT", "vm.delete": "PUT", "vmm.shutdown": "PUT",
		"vm.pause": "PUT", "vm.resume": "PUT", "vm.snapshot": "PUT", "vm.restore": "PUT",
	}
	m, ok := want[ep]
	if !ok {
		apiError(w, http.StatusNotFound, "Error from API", "unknown endpoint "+r.URL.Path)
		return
	}
	if r.Method != m {
		apiError(w, http.StatusBadRequest, "Error from API", "method "+r.Method+" not allowed on "+ep)
		return
	}
	switch ep {
	case "vmm.ping":
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(ch.VmmPingResponse{Version: version, BuildVersion: version + "-fakech", PID: int64(os.Getpid())})
	case "vm.create":
		if f.cfg != nil {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be created", "VM is already created")
			return
		}
		var cfg ch.VmConfig
		if err := json.NewDecoder(r.Body).Decode(&cfg); err != nil {
			apiError(w, http.StatusBadRequest, "Error from API", "Invalid VM configuration", err.Error())
			return
		}
		if err := f.create(&cfg); err != nil {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be created", err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.boot":
		if f.cfg == nil {
			apiError(w, http.StatusNotFound, "Error from API", "The VM could not boot", "VM is not created")
			return
		}
		if err := f.boot(); err != nil {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not boot", err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.info":
		if f.cfg == nil {
			apiError(w, http.StatusNotFound, "Error from API", "The VM information could not be retrieved", "VM is not created")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(ch.VmInfo{Config: *f.cfg, State: f.state, MemoryActualSize: f.cfg.Memory.Size})
	case "vm.shutdown":
		if f.cfg == nil {
			apiError(w, http.StatusNotFound, "Error from API", "The VM could not shut down", "VM is not created")
			return
		}
		f.stopGuest()
		f.state = ch.StateShutdown
		w.WriteHeader(http.StatusNoContent)
	case "vm.delete":
		f.stopGuest()
		f.cfg, f.state = nil, ""
		w.WriteHeader(http.StatusNoContent)
	case "vm.pause", "vm.resume":
		from, to, sig := ch.StateRunning, ch.StatePaused, syscall.SIGSTOP
		if ep == "vm.resume" {
			from, to, sig = ch.StatePaused, ch.StateRunning, syscall.SIGCONT
		}
		if f.cfg == nil || f.state != from {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be "+strings.TrimPrefix(ep, "vm.")+"d",
				fmt.Sprintf("VM is %q, not %s", f.state, from))
			return
		}
		if f.agent != nil {
			f.agent.Process.Signal(sig)
		}
		f.state = to
		w.WriteHeader(http.StatusNoContent)
	case "vm.snapshot":
		var sc ch.VmSnapshotConfig
		if err := json.NewDecoder(r.Body).Decode(&sc); err != nil {
			apiError(w, http.StatusBadRequest, "Error from API", "Invalid snapshot configuration", err.Error())
			return
		}
		if f.cfg == nil || f.state != ch.StatePaused {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be snapshotted", "VM is not paused")
			return
		}
		if err := f.snapshot(sc.DestinationURL); err != nil {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be snapshotted", err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vm.restore":
		var rc ch.RestoreConfig
		if err := json.NewDecoder(r.Body).Decode(&rc); err != nil {
			apiError(w, http.StatusBadRequest, "Error from API", "Invalid restore configuration", err.Error())
			return
		}
		if f.cfg != nil {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be restored", "VM is already created")
			return
		}
		if err := f.restore(rc); err != nil {
			apiError(w, http.StatusInternalServerError, "Error from API", "The VM could not be restored", err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case "vmm.shutdown":
		w.WriteHeader(http.StatusOK) // as v53 does (the document says 204)
		if fl, ok := w.(http.Flusher); ok {
			fl.Flush()
		}
		go f.exit(0)
	}
}

func (f *fake) create(cfg *ch.VmConfig) error {
	for _, p := range []string{cfg.Payload.Kernel, cfg.Payload.Initramfs} {
		if _, err := os.Stat(p); err != nil {
			return err
		}
	}
	if len(cfg.Disks) == 0 {
		return errors.New("fakech needs a disk: the box's base")
	}
	for _, d := range cfg.Disks {
		if _, err := os.Stat(d.Path); err != nil {
			return err
		}
	}
	if cfg.Vsock == nil {
		return errors.New("fakech needs a vsock device: the agent's channel")
	}
	for _, kv := range strings.Fields(cfg.Payload.Cmdline) {
		if v, ok := strings.CutPrefix(kv, "boxrun.vsock="); ok {
			f.port, _ = strconv.Atoi(v)
		}
	}
	if f.port == 0 {
		return errors.New("no boxrun.vsock= on the command line")
	}
	if cfg.Serial != nil && cfg.Serial.Mode == "Socket" {
		os.Remove(cfg.Serial.Socket)
		l, err := net.Listen("unix", cfg.Serial.Socket)
		if err != nil {
			return err
		}
		f.serial = l
		go f.acceptSerial(l)
	}
	os.Remove(cfg.Vsock.Socket)
	l, err := net.Listen("unix", cfg.Vsock.Socket)
	if err != nil {
		return err
	}
	f.vsock = l
	go f.acceptVsock(l)
	f.cfg, f.state = cfg, ch.StateCreated
	return nil
}

func (f *fake) acceptSerial(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		if f.console != nil {
			f.console.Close() // CH shuts the previous client down
		}
		f.console = c
		f.mu.Unlock()
	}
}

// consoleWriter is the serial port: what the guest writes goes to the
// connected client, or nowhere.
type consoleWriter struct{ f *fake }

func (w consoleWriter) Write(p []byte) (int, error) {
	w.f.mu.Lock()
	c := w.f.console
	w.f.mu.Unlock()
	if c != nil {
		c.Write(p)
	}
	return len(p), nil
}

func (f *fake) boot() error {
	if len(f.cfg.Net) > 0 || len(f.cfg.Fs) > 0 {
		return errors.New("fakech has no network or virtio-fs devices")
	}
	root, err := filepath.Abs("fakech-root")
	if err != nil {
		return err
	}
	if !hasExt4(f.cfg.Disks[0].Path) {
		// A template's stand-in: nothing to extract.
		if root, err = filepath.Abs("fakech-empty-root"); err != nil {
			return err
		}
		if err := os.MkdirAll(root, 0o755); err != nil {
			return err
		}
	} else if _, err := os.Stat(root); err != nil {
		tmp := root + ".tmp"
		os.RemoveAll(tmp)
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return err
		}
		out, err := exec.Command("debugfs", "-R", "rdump / "+tmp, f.cfg.Disks[0].Path).CombinedOutput()
		if err != nil {
			return fmt.Errorf("debugfs rdump of %s: %v: %s", f.cfg.Disks[0].Path, err, out)
		}
		if err := os.Rename(tmp, root); err != nil {
			return err
		}
	}
	init, err := extractInit(f.cfg.Payload.Initramfs)
	if err != nil {
		return err
	}
	bin := "fakech-init"
	if err := os.WriteFile(bin, init, 0o755); err != nil {
		return err
	}
	f.agentSk = "fakech-agent.sock"
	os.Remove(f.agentSk)
	cmd := exec.Command("./" + bin)
	cmd.Env = append(os.Environ(), "BOXRUN_AGENT_HOST_SOCKET="+f.agentSk, "BOXRUN_AGENT_HOST_ROOT="+root)
	cmd.Stdout, cmd.Stderr = consoleWriter{f}, consoleWriter{f}
	// A session of its own: stopping the "VM" kills every process in it,
	// the commands the agent started included.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	f.agent = cmd
	f.state = ch.StateRunning
	go func() {
		cmd.Wait()
		f.mu.Lock()
		mine := f.agent == cmd
		f.mu.Unlock()
		if mine {
			// The guest powered off on its own: CH exits.
			f.exit(0)
		}
	}()
	return nil
}

// stopGuest kills the agent and what it runs (the VM stops). Called with
// f.mu held.
func (f *fake) stopGuest() {
	if f.agent != nil {
		sid := f.agent.Process.Pid
		f.agent = nil
		killSession(sid)
	}
}

// killSession kills every process of session sid.
func killSession(sid int) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		// After the command: state ppid pgrp session
		if f := strings.Fields(s[i+1:]); len(f) > 3 && f[3] == strconv.Itoa(sid) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func (f *fake) exit(code int) {
	f.mu.Lock()
	f.stopGuest()
	for _, p := range []string{"fakech-agent.sock", "fakech-init", "fakech-empty-root"} {
		os.Remove(p)
	}
	if f.cfg != nil {
		if f.cfg.Vsock != nil {
			os.Remove(f.cfg.Vsock.Socket)
		}
		if f.cfg.Serial != nil && f.cfg.Serial.Socket != "" {
			os.Remove(f.cfg.Serial.Socket)
		}
	}
	os.Exit(code)
}

// acceptVsock serves the hybrid vsock socket: each connection names the
// guest port it wants; it is spliced to the agent when the agent listens
// there, else closed (the guest answered with a reset).
func (f *fake) acceptVsock(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go f.vsockConn(c)
	}
}

func (f *fake) vsockConn(c net.Conn) {
	br := bufio.NewReader(io.LimitReader(c, 64))
	line, err := br.ReadString('\n')
	var port int
	if err == nil {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "CONNECT "); ok {
			port, _ = strconv.Atoi(p)
		}
	}
	f.mu.Lock()
	sock, running, want := f.agentSk, f.state == ch.StateRunning && f.agent != nil, f.port
	f.mu.Unlock()
	if port == 0 || port != want || !running {
		c.Close()
		return
	}
	a, err := net.Dial("unix", sock)
	if err != nil {
		c.Close()
		return
	}
	if _, err := fmt.Fprintf(c, "OK %d\n", 1073741824); err != nil {
		c.Close()
		a.Close()
		return
	}
	go func() {
		io.Copy(a, c)
		a.(*net.UnixConn).CloseWrite()
	}()
	io.Copy(c, a)
	c.Close()
	a.Close()
}

// hasExt4 reports whether the disk at path holds an ext4 file system (its
// superblock's magic).
func hasExt4(path string) bool {
	fh, err := os.Open(path)
	if err != nil {
		return false
	}
	defer fh.Close()
	b := make([]byte, 2)
	_, err = fh.ReadAt(b, 1024+56)
	return err == nil && b[0] == 0x53 && b[1] == 0xef
}

// fakeState is the fake's state.json: what CH's device states would keep
// that matters to a restore.
type fakeState struct {
	Fakech string      `json:"fakech"`
	Disks  []diskState `json:"disks"`
}

type diskState struct {
	ID       string `json:"id"`
	Nsectors int64  `json:"disk_nsectors"`
}

const memoryMagic = "FAKECH-MEMORY-RANGES\n"

// fileDir is the directory a file:// URL names.
func fileDir(url string) (string, error) {
	dir, ok := strings.CutPrefix(url, "file://")
	if !ok || !filepath.IsAbs(dir) {
		return "", fmt.Errorf("%q is not a file:// URL of an absolute path", url)
	}
	return dir, nil
}

// snapshot writes the paused VM into the directory url names. Called with
// f.mu held.
func (f *fake) snapshot(url string) error {
	dir, err := fileDir(url)
	if err != nil {
		return err
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("destination %s is not a directory", dir)
	}
	st := fakeState{Fakech: version}
	for i, d := range f.cfg.Disks {
		info, err := os.Stat(d.Path)
		if err != nil {
			return err
		}
		id := d.ID
		if id == "" {
			id = fmt.Sprintf("_disk%d", i)
		}
		st.Disks = append(st.Disks, diskState{ID: id, Nsectors: info.Size() / 512})
	}
	cfg, _ := json.Marshal(f.cfg)
	state, _ := json.Marshal(st)
	for name, data := range map[string][]byte{
		"config.json": cfg, "state.json": state,
		"memory-ranges": append([]byte(memoryMagic), make([]byte, 4096)...),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// restore makes the VM of a snapshot, paused unless rc.Resume. Called with
// f.mu held.
func (f *fake) restore(rc ch.RestoreConfig) error {
	if os.Getenv("FAKECH_FAIL_RESTORE") != "" {
		return errors.New("Error restoring VM: FAKECH_FAIL_RESTORE is set")
	}
	switch rc.MemoryRestoreMode {
	case "", "Copy":
	case "OnDemand":
		if os.Getenv("FAKECH_NO_ONDEMAND") != "" { // as CH without userfaultfd
			return errors.New("Error restoring VM: Failed to create userfaultfd: Operation not permitted")
		}
	default:
		return fmt.Errorf("unknown memory_restore_mode %q", rc.MemoryRestoreMode)
	}
	dir, err := fileDir(rc.SourceURL)
	if err != nil {
		return err
	}
	var cfg ch.VmConfig
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err == nil {
		err = json.Unmarshal(b, &cfg)
	}
	if err != nil {
		return fmt.Errorf("config.json: %w", err)
	}
	var st fakeState
	b, err = os.ReadFile(filepath.Join(dir, "state.json"))
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err == nil && st.Fakech == "" {
		err = errors.New("not a snapshot's state")
	}
	if err != nil {
		return fmt.Errorf("state.json: %w", err)
	}
	if mem, err := os.ReadFile(filepath.Join(dir, "memory-ranges")); err != nil || !bytes.HasPrefix(mem, []byte(memoryMagic)) {
		return fmt.Errorf("memory-ranges: unreadable or not this snapshot's (%v)", err)
	}
	if len(st.Disks) != len(cfg.Disks) {
		return fmt.Errorf("config.json has %d disks, state.json %d", len(cfg.Disks), len(st.Disks))
	}
	for i, d := range cfg.Disks {
		info, err := os.Stat(d.Path)
		if err != nil {
			return err
		}
		if info.Size()/512 != st.Disks[i].Nsectors {
			return fmt.Errorf("disk %s holds %d sectors, its restored device %d: the guest would see the snapshot's capacity",
				d.Path, info.Size()/512, st.Disks[i].Nsectors)
		}
	}
	if err := f.create(&cfg); err != nil {
		return err
	}
	if err := f.boot(); err != nil {
		return err
	}
	if !rc.Resume {
		f.agent.Process.Signal(syscall.SIGSTOP)
		f.state = ch.StatePaused
	}
	return nil
}

// extractInit returns /init of a newc cpio archive.
func extractInit(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	off := 0
	for off+110 <= len(data) {
		hdr := data[off : off+110]
		if !bytes.HasPrefix(hdr, []byte("070701")) {
			return nil, fmt.Errorf("%s: not a newc cpio archive at %d", path, off)
		}
		field := func(i int) int {
			v, _ := strconv.ParseUint(string(hdr[6+8*i:6+8*i+8]), 16, 32)
			return int(v)
		}
		size, nameLen := field(6), field(11)
		nameStart := off + 110
		if nameStart+nameLen > len(data) {
			break
		}
		name := string(data[nameStart : nameStart+nameLen-1])
		dataStart := (nameStart + nameLen + 3) &^ 3
		if dataStart+size > len(data) {
			break
		}
		if name == "init" {
			return data[dataStart : dataStart+size], nil
		}
		if name == "TRAILER!!!" {
			break
		}
		off = (dataStart + size + 3) &^ 3
	}
	return nil, fmt.Errorf("%s: no /init", path)
}

// fakeVirtiofsd listens on --socket-path until killed.
func fakeVirtiofsd(args []string) {
	var sock string
	for _, a := range args {
		switch {
		case a == "--help":
			fmt.Println("virtiofsd (fakech)\n  --shared-dir <DIR>\n  --socket-path <PATH>\n  --readonly")
			return
		case strings.HasPrefix(a, "--socket-path="):
			sock = strings.TrimPrefix(a, "--socket-path=")
		}
	}
	if sock == "" {
		fatal(errors.New("virtiofsd: --socket-path= is required"))
	}
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		fatal(err)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}
