package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The CLI tests run the boxrun command as a user would, against a
// `boxrun serve` child on its own state dir (real VMs), and once with no
// server at all (auto-start).

var cli struct {
	once sync.Once
	bin  string
	err  error
}

// cliBinary builds boxrund/cmd/boxrun once into the package's temp dir.
func cliBinary(t *testing.T) string {
	t.Helper()
	cli.once.Do(func() {
		dir := filepath.Join(filepath.Dir(fx.dataDir), "cli")
		cli.bin = filepath.Join(dir, "boxrun")
		out, err := exec.Command("go", "build", "-o", cli.bin, "../boxrund/cmd/boxrun").CombinedOutput()
		if err != nil {
			cli.err = fmt.Errorf("go build boxrun: %v\n%s", err, out)
		}
	})
	if cli.err != nil {
		t.Fatal(cli.err)
	}
	return cli.bin
}

// cliEnv is the environment of the CLI and its server: the process's
// without any BOXRUN_ variable, then vars.
func cliEnv(vars ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BOXRUN_") && !strings.HasPrefix(kv, "CONTAINERS_REGISTRIES_CONF=") {
			env = append(env, kv)
		}
	}
	return append(append(env,
		"CONTAINERS_REGISTRIES_CONF="+fx.registriesConf,
		"BOXRUN_MAX_CPU=64", "BOXRUN_MAX_MEMORY_MB=65536"), vars...)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// boxrunCLI runs the CLI with a fixed environment.
type boxrunCLI struct {
	bin string
	env []string
	dir string // working directory
}

// run runs the CLI and returns its exit code, stdout and stderr.
func (c *boxrunCLI) run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := c.runTo(t, &out, &errb, args...)
	return code, out.String(), errb.String()
}

// combined runs the CLI with stdout and stderr on one pipe.
func (c *boxrunCLI) combined(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var both bytes.Buffer
	code := c.runTo(t, &both, &both, args...)
	return code, both.String()
}

func (c *boxrunCLI) runTo(t *testing.T, stdout, stderr *bytes.Buffer, args ...string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env, cmd.Dir = c.env, c.dir
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("boxrun %v: timed out", args)
	}
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		t.Fatalf("boxrun %v: %v", args, err)
	}
	return 0
}

// must runs the CLI and fails the test unless it exits 0.
func (c *boxrunCLI) must(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errs := c.run(t, args...)
	if code != 0 {
		t.Fatalf("boxrun %v: exit %d\nstdout: %s\nstderr: %s", args, code, out, errs)
	}
	return out
}

// startServe starts `boxrun serve` on state and a free port and returns
// the port; the server is stopped (SIGTERM) when the test ends.
func startServe(t *testing.T, bin, state string) int {
	t.Helper()
	port := freePort(t)
	var log bytes.Buffer
	cmd := exec.Command(bin, "serve", "--port", strconv.Itoa(port))
	cmd.Env = cliEnv("BOXRUN_STATE_DIR=" + state)
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("boxrun serve log:\n%s", log.String())
		}
		if left := vmmProcesses(state); len(left) > 0 {
			t.Errorf("VMM processes left: %v", left)
		}
	})
	sock := filepath.Join(state, "boxrun.sock")
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return port
		}
		select {
		case err := <-done:
			t.Fatalf("boxrun serve exited: %v\n%s", err, log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("boxrun serve did not listen in 30 s:\n%s", log.String())
		}
	}
}

// TestCLI drives one box through the CLI: create, exec (exit codes, output
// order, timeout, detach), cp both ways (a binary file, a directory), ls
// (table, JSON, over the socket and TCP), the errors with their hints,
// stop and rm; then run (a second, throwaway box) and gc.
func TestCLI(t *testing.T) {
	bin := cliBinary(t)
	tmp := t.TempDir()
	state := filepath.Join(tmp, "state")
	port := startServe(t, bin, state)
	c := &boxrunCLI{bin: bin, dir: tmp, env: cliEnv("BOXRUN_STATE_DIR="+state, "BOXRUN_PORT="+strconv.Itoa(port), "BOXRUN_NO_AUTOSTART=1")}
	image := fx.regRef

	out := c.must(t, "create", image, "-n", "cli", "--cpu", "1", "-m", "256", "-d", "1")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "box_") || lines[1] != "Name: cli" || lines[2] != "Status: running" {
		t.Fatalf("create printed %q", out)
	}
	id := lines[0]
	defer c.run(t, "rm", "-f", id)

	t.Run("exec", func(t *testing.T) {
		script := "echo out1; sleep 0.3; echo err1 >&2; sleep 0.3; echo out2; exit 3"
		if code, both := c.combined(t, "exec", "cli", "--", "sh", "-c", script); code != 3 || both != "out1\nerr1\nout2\n" {
			t.Errorf("exec, one pipe: exit %d, %q", code, both)
		}
		if code, o, e := c.run(t, "exec", "cli", "sh", "-c", script); code != 3 || o != "out1\nout2\n" || e != "err1\n" {
			t.Errorf("exec, two pipes: exit %d, %q, %q", code, o, e)
		}
		if code, o, e := c.run(t, "exec", "cli", "--", "true"); code != 0 || o != "" || e != "" {
			t.Errorf("exec true: %d %q %q", code, o, e)
		}
		if code, _, e := c.run(t, "exec", "-t", "1", "cli", "--", "sleep", "30"); code == 0 || !strings.Contains(e, "TIMEOUT") {
			t.Errorf("exec -t 1 sleep 30: %d %q", code, e)
		}
		xid := strings.TrimSpace(c.must(t, "exec", "--detach", "cli", "--", "sh", "-c", "echo later; exit 5"))
		if !strings.HasPrefix(xid, "exec_") {
			t.Fatalf("exec --detach printed %q", xid)
		}
		if code, o, _ := c.run(t, "logs", xid); code != 5 || o != "later\n" {
			t.Errorf("logs %s: %d %q", xid, code, o)
		}
		var xs []map[string]any
		if err := json.Unmarshal([]byte(c.must(t, "execs", "cli", "-o", "json")), &xs); err != nil || len(xs) != 5 || xs[0]["id"] != xid {
			t.Errorf("execs -o json: %v %v", xs, err)
		}
	})

	t.Run("cp", func(t *testing.T) {
		local := filepath.Join(tmp, "local")
		os.MkdirAll(local, 0o755)
		bin := make([]byte, 300<<10)
		rand.Read(bin)
		for i := range 256 {
			bin[i] = byte(i)
		}
		os.WriteFile(filepath.Join(local, "blob.bin"), bin, 0o755)
		if o := c.must(t, "cp", filepath.Join(local, "blob.bin"), "cli:/root/blob.bin"); o != "Uploaded to cli:/root/blob.bin\n" {
			t.Errorf("cp up printed %q", o)
		}
		if o := strings.TrimSpace(c.must(t, "exec", "cli", "--", "stat", "-c", "%a %s", "/root/blob.bin")); o != fmt.Sprintf("755 %d", len(bin)) {
			t.Errorf("in the box: %q", o)
		}
		back := filepath.Join(tmp, "back", "blob.bin")
		if o := c.must(t, "cp", "cli:blob.bin", back); o != "Downloaded to "+back+"\n" { // relative: from the box's workdir
			t.Errorf("cp down printed %q", o)
		}
		if b, err := os.ReadFile(back); err != nil || !bytes.Equal(b, bin) {
			t.Errorf("binary file came back different (%d bytes, %v)", len(b), err)
		}

		// A directory: nested files, an empty dir, an executable, a link.
		tree := filepath.Join(local, "tree")
		os.MkdirAll(filepath.Join(tree, "sub", "deeper"), 0o755)
		os.MkdirAll(filepath.Join(tree, "empty"), 0o755)
		os.WriteFile(filepath.Join(tree, "a.txt"), []byte("alpha\n"), 0o644)
		os.WriteFile(filepath.Join(tree, "sub", "run.sh"), []byte("#!/bin/sh\necho ran\n"), 0o755)
		os.WriteFile(filepath.Join(tree, "sub", "deeper", "b.bin"), bin[:1000], 0o644)
		os.Symlink("../a.txt", filepath.Join(tree, "sub", "link"))
		if o := c.must(t, "cp", tree, "cli:/root/"); o != "Uploaded 3 file(s) to cli:/root/tree\n" {
			t.Errorf("cp dir up printed %q", o)
		}
		if o := c.must(t, "exec", "cli", "--", "sh", "-c", "cd /root/tree && find . | sort && sub/run.sh && cat sub/link"); o != ".\n./a.txt\n./empty\n./sub\n./sub/deeper\n./sub/deeper/b.bin\n./sub/link\n./sub/run.sh\nran\nalpha\n" {
			t.Errorf("tree in the box:\n%s", o)
		}
		down := filepath.Join(tmp, "down")
		if o := c.must(t, "cp", "cli:/root/tree", down); o != "Downloaded to "+down+"\n" {
			t.Errorf("cp dir down printed %q", o)
		}
		if got, want := listTree(t, down), listTree(t, tree); got != want {
			t.Errorf("tree came back as\n%s\nwant\n%s", got, want)
		}
	})

	t.Run("ls", func(t *testing.T) {
		out := c.must(t, "ls")
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 2 || strings.Join(strings.Fields(lines[0]), " ") != "ID NAME STATUS IMAGE CPU MEM DISK CREATED" {
			t.Fatalf("ls:\n%s", out)
		}
		if f := strings.Fields(lines[1]); len(f) < 8 || f[0] != id || f[1] != "cli" || f[2] != "running" || f[3] != image || f[4] != "1" || f[5] != "256MB" || f[6] != "1GB" {
			t.Errorf("ls row %q", lines[1])
		}
		// JSON, over the socket and over TCP (no socket in that state dir).
		tcp := &boxrunCLI{bin: bin, dir: tmp, env: cliEnv("BOXRUN_STATE_DIR="+filepath.Join(tmp, "nostate"), "BOXRUN_PORT="+strconv.Itoa(port), "BOXRUN_NO_AUTOSTART=1")}
		for name, cl := range map[string]*boxrunCLI{"socket": c, "tcp": tcp} {
			var boxes []map[string]any
			if err := json.Unmarshal([]byte(cl.must(t, "ls", "-o", "json")), &boxes); err != nil || len(boxes) != 1 ||
				boxes[0]["id"] != id || boxes[0]["name"] != "cli" || boxes[0]["status"] != "running" || len(boxes[0]) < 17 {
				t.Errorf("ls -o json over %s: %v %v", name, boxes, err)
			}
		}
		if o := c.must(t, "ls", "-s", "stopped"); o != "No boxes found.\n" {
			t.Errorf("ls -s stopped: %q", o)
		}
		var info map[string]any
		if err := json.Unmarshal([]byte(c.must(t, "info", "-o", "json")), &info); err != nil || info["max_cpu"] != float64(64) || info["running_boxes"] != float64(1) {
			t.Errorf("info -o json: %v %v", info, err)
		}
	})

	t.Run("errors", func(t *testing.T) {
		check := func(want string, args ...string) {
			t.Helper()
			code, out, errs := c.run(t, args...)
			if code != 1 || !strings.HasPrefix(errs, want) || !strings.Contains(errs, "\nHint: ") {
				t.Errorf("boxrun %v: exit %d, stdout %q, stderr %q; want exit 1 and %q with a hint", args, code, out, errs, want)
			}
		}
		check("Error: [NAME_ALREADY_EXISTS] ", "create", image, "-n", "cli", "--cpu", "1", "-m", "256", "-d", "1")
		check("Error: [BOX_ALREADY_RUNNING] ", "start", "cli")
		check("Error: [BOX_ALREADY_RUNNING] ", "rm", "cli")
		check("Error: [BOX_NOT_FOUND] Box 'nope' not found", "stop", "nope")
		check("Error: [BOX_NOT_FOUND] ", "exec", "nope", "--", "true")
		if o := c.must(t, "stop", "cli"); o != "Stopped "+id+"\n" {
			t.Errorf("stop printed %q", o)
		}
		check("Error: [BOX_NOT_RUNNING] ", "exec", "cli", "--", "true")
		check("Error: [BOX_NOT_RUNNING] ", "stop", "cli")
		check("Error: [BOX_NOT_RUNNING] ", "cp", "cli:/root/blob.bin", filepath.Join(tmp, "x"))
		if o := c.must(t, "rm", "cli"); o != "Removed cli\n" {
			t.Errorf("rm printed %q", o)
		}
		if o := c.must(t, "ls"); o != "No boxes found.\n" {
			t.Errorf("ls after rm: %q", o)
		}
	})

	t.Run("run", func(t *testing.T) {
		code, o, e := c.run(t, "run", "--cpu", "1", "-m", "256", "-d", "1", image, "--", "sh", "-c", "echo hi; echo oops >&2; exit 4")
		if code != 4 || o != "hi\n" || !strings.Contains(e, "oops\n") {
			t.Errorf("run: exit %d, %q, %q", code, o, e)
		}
		if o := c.must(t, "gc"); o != "Removed 0 box(es)\n" {
			t.Errorf("gc: %q", o)
		}
		if o := c.must(t, "ls", "-q"); o != "" {
			t.Errorf("boxes left after run: %q", o)
		}
	})
}

// listTree describes a local tree: paths, types, modes, file contents'
// sizes, link targets.
func listTree(t *testing.T, root string) string {
	t.Helper()
	var lines []string
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, p)
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			lines = append(lines, fmt.Sprintf("%s -> %s", rel, target))
		case fi.IsDir():
			lines = append(lines, fmt.Sprintf("%s/ %o", rel, fi.Mode().Perm()))
		default:
			b, _ := os.ReadFile(p)
			lines = append(lines, fmt.Sprintf("%s %o %d %x", rel, fi.Mode().Perm(), len(b), b[:min(len(b), 8)]))
		}
		return nil
	})
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestCLIAutostart: with no server, a command starts `boxrun serve`
// (detached, in its own session, its log in the state dir), waits for it
// and answers; the next command finds it; the test stops it.
func TestCLIAutostart(t *testing.T) {
	bin := cliBinary(t)
	tmp := t.TempDir()
	state := filepath.Join(tmp, "state")
	port := freePort(t)
	c := &boxrunCLI{bin: bin, dir: tmp, env: cliEnv("BOXRUN_STATE_DIR="+state, "BOXRUN_PORT="+strconv.Itoa(port))}

	code, out, errs := c.run(t, "ls", "-o", "json")
	m := regexp.MustCompile(`Started a boxrun server \(pid (\d+), log (\S+)\)`).FindStringSubmatch(errs)
	if m != nil {
		pid, _ := strconv.Atoi(m[1])
		t.Cleanup(func() { stopPid(t, pid, state) })
	}
	if code != 0 || strings.TrimSpace(out) != "[]" || m == nil {
		t.Fatalf("ls with no server: exit %d, %q, %q", code, out, errs)
	}
	if m[2] != filepath.Join(state, "boxrun.log") {
		t.Errorf("log at %s", m[2])
	}
	// The server is in its own session, and serves the socket and TCP.
	pid, _ := strconv.Atoi(m[1])
	if sid, err := unix.Getsid(pid); err != nil || sid != pid {
		t.Errorf("server session %d (%v), want its own (%d)", sid, err, pid)
	}
	code, out, errs = c.run(t, "info", "-o", "json")
	if code != 0 || errs != "" || !strings.Contains(out, `"max_cpu": 64`) {
		t.Errorf("second command: exit %d, %q, %q", code, out, errs)
	}
	if conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
		t.Errorf("TCP: %v", err)
	} else {
		conn.Close()
	}
	stopPid(t, pid, state)
	if _, err := os.Stat(filepath.Join(state, "boxrun.sock")); !os.IsNotExist(err) {
		t.Errorf("socket left after the server stopped: %v", err)
	}
	// With auto-start off, no server: a clear error, exit 1.
	off := &boxrunCLI{bin: bin, dir: tmp, env: append(c.env, "BOXRUN_NO_AUTOSTART=1")}
	if code, _, errs := off.run(t, "ls"); code != 1 || !strings.Contains(errs, "no boxrun server answers") {
		t.Errorf("no server, no auto-start: %d %q", code, errs)
	}
}

// stopPid stops a server that is not this process's child: SIGTERM, then
// waits until it is gone (or a zombie nobody reaps), then SIGKILL.
func stopPid(t *testing.T, pid int, state string) {
	t.Helper()
	if gone(pid) {
		return
	}
	syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(time.Minute)
	for !gone(pid) {
		if time.Now().After(deadline) {
			t.Errorf("server %d still running a minute after SIGTERM; killing it", pid)
			syscall.Kill(pid, syscall.SIGKILL)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if left := vmmProcesses(state); len(left) > 0 {
		t.Errorf("VMM processes left: %v", left)
	}
}

// gone reports whether pid has exited (a zombie counts).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z'
}
