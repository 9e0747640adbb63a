package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/boxrund/client"
)

func TestRemoteSpec(t *testing.T) {
	for _, tc := range []struct {
		arg, box, path string
		remote         bool
	}{
		{"dev:/root/a", "dev", "/root/a", true},
		{"box_x:rel/p", "box_x", "rel/p", true},
		{"/abs:path", "", "/abs:path", false},
		{"./a:b", "", "./a:b", false},
		{"../up:x", "", "../up:x", false},
		{"plain", "", "plain", false},
		{"-", "", "-", false},
		{":nobox", "", "nobox", true},
	} {
		box, p, remote := remoteSpec(tc.arg)
		if box != tc.box || p != tc.path || remote != tc.remote {
			t.Errorf("%q: %q %q %v", tc.arg, box, p, remote)
		}
	}
}

func TestFlagParsing(t *testing.T) {
	var detach bool
	var timeout int
	var env []string
	f := newFlags(nil, "exec")
	f.bool(&detach, "d,detach", "")
	f.int(&timeout, "t,timeout", 0, "", "")
	f.list(&env, "e,env", "", "")
	// Flags before the command are exec's; the command's own are not.
	pos, rest, err := f.parse([]string{"-t", "5", "box", "--env", "A=1", "sh", "-c", "exit 3"}, 1)
	if err != nil || strings.Join(pos, ",") != "box" || strings.Join(rest, ",") != "sh,-c,exit 3" || timeout != 5 || strings.Join(env, ",") != "A=1" {
		t.Errorf("exec without --: %v %v %v %d %v", pos, rest, err, timeout, env)
	}
	env = nil
	pos, rest, err = f.parse([]string{"box", "-d", "--env", "A=1", "--", "ls", "-l"}, 1)
	if err != nil || strings.Join(pos, ",") != "box" || strings.Join(rest, ",") != "ls,-l" || !detach || strings.Join(env, ",") != "A=1" {
		t.Errorf("exec with --: %v %v %v %v %v", pos, rest, err, detach, env)
	}
	var force bool
	g := newFlags(nil, "rm")
	g.bool(&force, "f,force", "")
	pos, _, err = g.parse([]string{"a", "-f", "b", "--", "-weird"}, -1)
	if err != nil || strings.Join(pos, ",") != "a,b,-weird" || !force {
		t.Errorf("rm: %v %v %v", pos, err, force)
	}
	if _, _, err := g.parse([]string{"--nope"}, -1); !errors.As(err, new(usageError)) {
		t.Errorf("unknown flag: %v", err)
	}
}

func TestExitOf(t *testing.T) {
	i := func(n int) *int { return &n }
	for _, tc := range []struct {
		st   client.ExitStatus
		code int
		msg  string
	}{
		{client.ExitStatus{ExitCode: i(0)}, 0, ""},
		{client.ExitStatus{ExitCode: i(3)}, 3, ""},
		{client.ExitStatus{ExitCode: nil, Error: "canceled"}, 1, "CANCELED"},
		{client.ExitStatus{ExitCode: i(-1), TimedOut: true, Signal: "SIGKILL"}, 124, "TIMEOUT"},
		{client.ExitStatus{ExitCode: i(-1), Signal: "SIGTERM"}, 143, "SIGTERM"},
		{client.ExitStatus{ExitCode: i(-1), Error: "agent gone"}, 1, "agent gone"},
		{client.ExitStatus{ExitCode: i(-1)}, 1, "status -1"},
	} {
		code, msg := exitOf(&tc.st)
		if code != tc.code || !strings.Contains(msg, tc.msg) || (tc.msg == "") != (msg == "") {
			t.Errorf("%+v: %d %q", tc.st, code, msg)
		}
	}
}

// tarOf builds a tar stream.
func tarOf(t *testing.T, entries ...tar.Header) io.Reader {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range entries {
		body := ""
		if h.Typeflag == tar.TypeReg {
			body = "content of " + h.Name
			h.Size = int64(len(body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, body)
	}
	tw.Close()
	return &buf
}

func TestExtractTar(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "out")
	mt := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	err := extractTar(tarOf(t,
		tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o750},
		tar.Header{Name: "d/a.txt", Typeflag: tar.TypeReg, Mode: 0o4755, ModTime: mt},
		tar.Header{Name: "d/sub/", Typeflag: tar.TypeDir, Mode: 0o555},
		tar.Header{Name: "d/sub/b", Typeflag: tar.TypeReg, Mode: 0o600},
		tar.Header{Name: "d/sub/link", Typeflag: tar.TypeSymlink, Linkname: "../a.txt"},
		tar.Header{Name: "d/hard", Typeflag: tar.TypeLink, Linkname: "d/a.txt"},
		tar.Header{Name: "d/fifo", Typeflag: tar.TypeFifo},
	), target, "d", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(target, "a.txt"))
	if err != nil || fi.Mode() != 0o755 || !fi.ModTime().Equal(mt) {
		t.Errorf("a.txt: %v %v (setuid must go, mtime kept)", fi.Mode(), err)
	}
	if b, _ := os.ReadFile(filepath.Join(target, "sub", "link")); string(b) != "content of d/a.txt" {
		t.Errorf("link: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(target, "hard")); string(b) != "content of d/a.txt" {
		t.Errorf("hard link: %q", b)
	}
	if fi, _ := os.Stat(filepath.Join(target, "sub")); fi.Mode().Perm() != 0o755 {
		t.Errorf("sub mode %v (0555 plus owner write)", fi.Mode().Perm())
	}
	if _, err := os.Lstat(filepath.Join(target, "fifo")); err == nil {
		t.Error("fifo extracted")
	}
	os.Chmod(filepath.Join(target, "sub"), 0o755)

	// Hostile archives: each is refused and nothing lands outside.
	outside := filepath.Join(dir, "outside")
	for name, entries := range map[string][]tar.Header{
		"dotdot":       {{Name: "d/../../outside", Typeflag: tar.TypeReg}},
		"absolute":     {{Name: "/tmp/outside", Typeflag: tar.TypeReg}},
		"other top":    {{Name: "d/", Typeflag: tar.TypeDir}, {Name: "e/x", Typeflag: tar.TypeReg}},
		"abs link":     {{Name: "d/l", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}},
		"escape link":  {{Name: "d/l", Typeflag: tar.TypeSymlink, Linkname: "../../outside"}},
		"hard outside": {{Name: "d/h", Typeflag: tar.TypeLink, Linkname: "../outside"}},
		// A link that stays inside cannot be written through to outside:
		// os.Root refuses to follow the "up" link out of the target.
		"write through link": {
			{Name: "d/up", Typeflag: tar.TypeSymlink, Linkname: "."},
			{Name: "d/up/../../outside", Typeflag: tar.TypeReg},
		},
	} {
		tgt := filepath.Join(dir, "t-"+strings.ReplaceAll(name, " ", "-"))
		if err := extractTar(tarOf(t, entries...), tgt, "d", io.Discard); err == nil {
			t.Errorf("%s: accepted", name)
		}
		if _, err := os.Lstat(outside); err == nil {
			t.Fatalf("%s: wrote %s", name, outside)
		}
	}
	// A symlinked directory inside the tree pointing out of the target:
	// the link itself is refused, and a later entry under it cannot follow.
	tgt := filepath.Join(dir, "t-through")
	os.MkdirAll(tgt, 0o755)
	os.Symlink(dir, filepath.Join(tgt, "esc")) // planted locally, as a pre-existing link
	if err := extractTar(tarOf(t, tar.Header{Name: "d/esc/outside", Typeflag: tar.TypeReg}), tgt, "d", io.Discard); err == nil {
		t.Error("wrote through a pre-existing link out of the target")
	}
	if _, err := os.Lstat(outside); err == nil {
		t.Fatal("wrote outside through a link")
	}
}

// fakeTerm is a terminal for runSession.
type fakeTerm struct {
	mu       sync.Mutex
	in       io.Reader
	out      bytes.Buffer
	raw      bool
	restored int
	isTTY    bool
	rows     int
	resized  chan struct{}
	sigs     chan os.Signal
}

func newFakeTerm(in io.Reader, isTTY bool) *fakeTerm {
	return &fakeTerm{in: in, isTTY: isTTY, rows: 24, resized: make(chan struct{}, 1), sigs: make(chan os.Signal, 1)}
}

func (f *fakeTerm) Input() io.Reader { return f.in }
func (f *fakeTerm) Output() io.Writer {
	return writerFunc(func(p []byte) (int, error) { f.mu.Lock(); defer f.mu.Unlock(); return f.out.Write(p) })
}
func (f *fakeTerm) IsTerminal() bool { return f.isTTY }
func (f *fakeTerm) MakeRaw() (func(), error) {
	f.mu.Lock()
	f.raw = true
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		if f.raw {
			f.raw = false
			f.restored++
		}
		f.mu.Unlock()
	}, nil
}
func (f *fakeTerm) Size() (int, int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rows, 80, true
}
func (f *fakeTerm) Resized() (<-chan struct{}, func())      { return f.resized, func() {} }
func (f *fakeTerm) Interrupted() (<-chan os.Signal, func()) { return f.sigs, func() {} }
func (f *fakeTerm) output() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.out.String()
}

type writerFunc func([]byte) (int, error)

func (w writerFunc) Write(p []byte) (int, error) { return w(p) }

// fakeSession is a session whose end the test controls.
type fakeSession struct {
	pr      *io.PipeReader
	pw      *io.PipeWriter
	mu      sync.Mutex
	input   bytes.Buffer
	resizes []string
	done    chan struct{}
	once    sync.Once
	code    int
	err     error
	closed  bool
}

func newFakeSession() *fakeSession {
	pr, pw := io.Pipe()
	return &fakeSession{pr: pr, pw: pw, done: make(chan struct{})}
}

func (s *fakeSession) Read(p []byte) (int, error) { return s.pr.Read(p) }
func (s *fakeSession) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.input.Write(p)
}
func (s *fakeSession) Resize(r, c int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.resizes = append(s.resizes, fmt.Sprintf("%dx%d", r, c))
	return nil
}
func (s *fakeSession) Done() <-chan struct{} { return s.done }
func (s *fakeSession) Wait() (int, error)    { <-s.done; return s.code, s.err }
func (s *fakeSession) end(code int, err error) {
	s.once.Do(func() {
		s.code, s.err = code, err
		s.pw.Close()
		close(s.done)
	})
}
func (s *fakeSession) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.end(-1, client.ErrConnectionLost)
	return nil
}

func TestRunSession(t *testing.T) {
	// Normal end: output shown, resizes forwarded, exit code, restored.
	term := newFakeTerm(strings.NewReader("typed"), true)
	sess := newFakeSession()
	go func() {
		sess.pw.Write([]byte("prompt$ "))
		// The window changes once the session has its first size: the
		// output above can be read before runSession asks for it.
		for {
			sess.mu.Lock()
			n := len(sess.resizes)
			sess.mu.Unlock()
			if n > 0 {
				break
			}
			time.Sleep(time.Millisecond)
		}
		term.mu.Lock()
		term.rows = 50
		term.mu.Unlock()
		term.resized <- struct{}{}
		time.Sleep(50 * time.Millisecond)
		sess.end(5, nil)
	}()
	code, err := runSession(sess, term)
	if code != 5 || err != nil || term.output() != "prompt$ " || term.restored != 1 || term.raw {
		t.Errorf("end: %d %v %q restored %d", code, err, term.output(), term.restored)
	}
	if strings.Join(sess.resizes, " ") != "24x80 50x80" {
		t.Errorf("resizes %v", sess.resizes)
	}

	// A signal: the session is closed, the terminal restored.
	term = newFakeTerm(blockingReader{}, true)
	sess = newFakeSession()
	term.sigs <- syscall.SIGTERM
	code, err = runSession(sess, term)
	if code != 128+15 || err == nil || !sess.closed || term.restored != 1 {
		t.Errorf("signal: %d %v closed %v restored %d", code, err, sess.closed, term.restored)
	}

	// A dropped connection: its error, the terminal restored.
	term = newFakeTerm(blockingReader{}, true)
	sess = newFakeSession()
	go sess.end(-1, fmt.Errorf("%w: EOF", client.ErrConnectionLost))
	if _, err = runSession(sess, term); !errors.Is(err, client.ErrConnectionLost) || term.restored != 1 {
		t.Errorf("dropped: %v restored %d", err, term.restored)
	}

	// Input from a pipe: its end sends Ctrl-D.
	term = newFakeTerm(strings.NewReader("echo hi\n"), false)
	sess = newFakeSession()
	go func() {
		for {
			sess.mu.Lock()
			in := sess.input.String()
			sess.mu.Unlock()
			if in == "echo hi\n\x04" {
				sess.end(0, nil)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	if code, err := runSession(sess, term); code != 0 || err != nil {
		t.Errorf("pipe: %d %v", code, err)
	}
}

type blockingReader struct{}

func (blockingReader) Read([]byte) (int, error) { select {} }

// fakeServer is a small BoxRun API: one box "dev" (running), "off"
// (stopped); execs answer from a script; files live in a map.
type fakeServer struct {
	mu      sync.Mutex
	files   map[string][]byte
	cmds    [][]string
	srv     *httptest.Server
	getenv  func(string) string
	tarDirs map[string][]byte
}

func newFakeServer(t *testing.T) *fakeServer {
	fs := &fakeServer{files: map[string][]byte{}, tarDirs: map[string][]byte{}}
	mux := http.NewServeMux()
	writeJSON := func(w http.ResponseWriter, status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(v)
	}
	apiErr := func(w http.ResponseWriter, status int, code, msg string) {
		writeJSON(w, status, map[string]string{"code": code, "message": msg})
	}
	box := func(id, status string) map[string]any {
		return map[string]any{"id": "box_" + id, "name": id, "status": status, "image": "alpine:3.20", "cpu": 2, "memory_mb": 1024,
			"disk_size_gb": 8, "network": false, "workdir": "/root", "env": nil, "volumes": nil, "boxlite_id": "x", "error_code": nil,
			"error_message": nil, "created_at": time.Now().Add(-5 * time.Minute).UTC().Format(time.RFC3339), "started_at": nil, "stopped_at": nil}
	}
	lookup := func(w http.ResponseWriter, name string, running bool) bool {
		switch strings.TrimPrefix(name, "box_") {
		case "dev":
			return true
		case "off":
			if running {
				apiErr(w, 400, "BOX_NOT_RUNNING", "Box 'off' is not running")
				return false
			}
			return true
		}
		apiErr(w, 404, "BOX_NOT_FOUND", fmt.Sprintf("Box '%s' not found", name))
		return false
	}
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, map[string]any{"max_cpu": 8, "max_memory_mb": 4096, "used_cpu": 2, "used_memory_mb": 1024, "running_boxes": 1, "version": "test"})
	})
	mux.HandleFunc("GET /v1/boxes", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, []any{box("dev", "running"), box("off", "stopped")})
	})
	mux.HandleFunc("GET /v1/boxes/{seg}", func(w http.ResponseWriter, r *http.Request) {
		if lookup(w, r.PathValue("seg"), false) {
			writeJSON(w, 200, box(strings.TrimPrefix(r.PathValue("seg"), "box_"), "running"))
		}
	})
	mux.HandleFunc("POST /v1/boxes/{seg}", func(w http.ResponseWriter, r *http.Request) {
		id, verb, _ := strings.Cut(r.PathValue("seg"), ":")
		if !lookup(w, id, false) {
			return
		}
		if verb == "start" && id == "dev" {
			apiErr(w, 409, "BOX_ALREADY_RUNNING", "Box 'dev' is already running")
			return
		}
		writeJSON(w, 200, box(id, "running"))
	})
	mux.HandleFunc("POST /v1/boxes/{box}/exec", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Cmd []string }
		json.NewDecoder(r.Body).Decode(&req)
		if !lookup(w, r.PathValue("box"), true) {
			return
		}
		fs.mu.Lock()
		fs.cmds = append(fs.cmds, req.Cmd)
		n := len(fs.cmds) - 1
		fs.mu.Unlock()
		writeJSON(w, 201, map[string]any{"id": fmt.Sprintf("exec_%d", n), "status": "running", "cmd": req.Cmd})
	})
	mux.HandleFunc("GET /v1/boxes/{box}/exec/{id}/events", func(w http.ResponseWriter, r *http.Request) {
		var n int
		fmt.Sscanf(r.PathValue("id"), "exec_%d", &n)
		fs.mu.Lock()
		cmd := fs.cmds[n]
		fs.mu.Unlock()
		w.Header().Set("Content-Type", "text/event-stream")
		ev := func(typ string, stream any, data string, seq int) {
			b, _ := json.Marshal(map[string]any{"stream": stream, "data": data, "seq": seq})
			fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, b)
			w.(http.Flusher).Flush()
		}
		if cmd[0] == "script" { // script: out, err, out, exit 3
			ev("log", "stdout", "one\n", 0)
			ev("log", "stderr", "two\n", 1)
			ev("log", "stdout", "three\n", 2)
			ev("exit", nil, `{"exit_code":3}`, 3)
			return
		}
		ev("exit", nil, `{"exit_code":0}`, 0)
	})
	mux.HandleFunc("POST /v1/boxes/{box}/files/upload", func(w http.ResponseWriter, r *http.Request) {
		if !lookup(w, r.PathValue("box"), true) {
			return
		}
		mr, _ := r.MultipartReader()
		var dest string
		for {
			p, err := mr.NextPart()
			if err != nil {
				break
			}
			b, _ := io.ReadAll(p)
			if p.FormName() == "dest" {
				dest = string(b)
			} else {
				fs.mu.Lock()
				fs.files[dest] = b
				fs.mu.Unlock()
			}
		}
		writeJSON(w, 200, map[string]any{"ok": true, "dest": dest})
	})
	mux.HandleFunc("POST /v1/boxes/{box}/files/download", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Path string }
		json.NewDecoder(r.Body).Decode(&req)
		if !lookup(w, r.PathValue("box"), true) {
			return
		}
		fs.mu.Lock()
		defer fs.mu.Unlock()
		if b, ok := fs.tarDirs[req.Path]; ok {
			w.Header().Set("Content-Type", "application/x-tar")
			w.Write(b)
			return
		}
		b, ok := fs.files[req.Path]
		if !ok {
			apiErr(w, 400, "RUNTIME_ERROR", fmt.Sprintf("File '%s' not found in box", req.Path))
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(b)
	})
	fs.srv = httptest.NewServer(mux)
	t.Cleanup(fs.srv.Close)
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(fs.srv.URL, "http://"))
	state := t.TempDir()
	fs.getenv = func(k string) string {
		return map[string]string{"BOXRUN_STATE_DIR": state, "BOXRUN_PORT": port}[k]
	}
	return fs
}

// cli runs the command line against the fake server.
func (fs *fakeServer) cli(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	a := &app{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, getenv: fs.getenv, noAutostart: true}
	code = a.main(args)
	return code, out.String(), errb.String()
}

func TestCLI(t *testing.T) {
	fs := newFakeServer(t)

	// exec: output in order into one stream, the command's exit code.
	var both bytes.Buffer
	a := &app{stdin: strings.NewReader(""), stdout: &both, stderr: &both, getenv: fs.getenv, noAutostart: true}
	if code := a.main([]string{"exec", "dev", "--", "script"}); code != 3 || both.String() != "one\ntwo\nthree\n" {
		t.Errorf("exec: %d %q", code, both.String())
	}
	if code, out, _ := fs.cli("exec", "-d", "dev", "true"); code != 0 || !strings.HasPrefix(out, "exec_") {
		t.Errorf("exec -d: %d %q", code, out)
	}

	// Errors: code, message, hint, exit 1.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"exec", "off", "--", "true"}, "Error: [BOX_NOT_RUNNING] Box 'off' is not running\nHint: the box is stopped: start it with `boxrun start off`\n"},
		{[]string{"start", "dev"}, "Error: [BOX_ALREADY_RUNNING] Box 'dev' is already running\nHint: the box is running: stop it with `boxrun stop dev`, or remove it anyway with `boxrun rm -f dev`\n"},
		{[]string{"stop", "nope"}, "Error: [BOX_NOT_FOUND] Box 'nope' not found\nHint: list the boxes with `boxrun ls`\n"},
	} {
		code, _, stderr := fs.cli(tc.args...)
		if code != 1 || stderr != tc.want {
			t.Errorf("%v: %d\n%s\nwant\n%s", tc.args, code, stderr, tc.want)
		}
	}
	if code, _, stderr := fs.cli("exec", "dev"); code != 2 || !strings.Contains(stderr, "Usage: boxrun exec") {
		t.Errorf("usage error: %d %q", code, stderr)
	}

	// ls: table and JSON.
	code, out, _ := fs.cli("ls")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 3 || strings.Join(strings.Fields(lines[0]), " ") != "ID NAME STATUS IMAGE CPU MEM DISK CREATED" ||
		strings.Join(strings.Fields(lines[1]), " ") != "box_dev dev running alpine:3.20 2 1024MB 8GB 5m ago" {
		t.Errorf("ls:\n%s", out)
	}
	code, out, _ = fs.cli("ls", "-o", "json")
	var boxes []map[string]any
	if err := json.Unmarshal([]byte(out), &boxes); code != 0 || err != nil || len(boxes) != 2 || boxes[1]["status"] != "stopped" || len(boxes[0]) < 17 {
		t.Errorf("ls -o json: %v %q", err, out)
	}
	if code, out, _ := fs.cli("info", "-o", "json"); code != 0 || !json.Valid([]byte(out)) || !strings.Contains(out, `"max_cpu": 8`) {
		t.Errorf("info -o json: %d %q", code, out)
	}
	if code, out, _ := fs.cli("images", "-o", "json"); code != 0 || !strings.Contains(out, `"name": "python"`) {
		t.Errorf("images -o json: %d %q", code, out)
	}

	// cp: a file both ways; a directory up (file by file, then mkdir and
	// chmod in the box) and down (tar, extracted).
	dir := t.TempDir()
	bin := []byte{0, 1, 2, 255, '\n', 0}
	os.WriteFile(filepath.Join(dir, "bin"), bin, 0o644)
	if code, out, errs := fs.cli("cp", filepath.Join(dir, "bin"), "dev:/root/bin"); code != 0 || out != "Uploaded to dev:/root/bin\n" {
		t.Fatalf("cp up: %d %q %q", code, out, errs)
	}
	if code, out, _ := fs.cli("cp", "dev:/root/bin", dir+"/sub/"); code != 0 || out != "Downloaded to "+filepath.Join(dir, "sub", "bin")+"\n" {
		t.Fatalf("cp down: %d %q", code, out)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "sub", "bin")); !bytes.Equal(b, bin) {
		t.Errorf("downloaded %q", b)
	}
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "a", "empty"), 0o755)
	os.WriteFile(filepath.Join(tree, "a", "x.sh"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(tree, "top"), []byte("top"), 0o644)
	fs.cmds = nil
	if code, out, errs := fs.cli("cp", tree, "dev:/root/"); code != 0 || out != "Uploaded 2 file(s) to dev:/root/tree\n" {
		t.Fatalf("cp dir up: %d %q %q", code, out, errs)
	}
	if string(fs.files["/root/tree/a/x.sh"]) != "#!/bin/sh\n" || string(fs.files["/root/tree/top"]) != "top" {
		t.Errorf("files uploaded: %v", fs.files)
	}
	var cmds []string
	for _, c := range fs.cmds {
		cmds = append(cmds, strings.Join(c, " "))
	}
	if strings.Join(cmds, "|") != "mkdir -p /root/tree /root/tree/a /root/tree/a/empty|chmod 755 /root/tree/a/x.sh" {
		t.Errorf("fix-ups in the box: %q", cmds)
	}
	fs.tarDirs["/root/tree"] = tarBytes(t,
		tar.Header{Name: "tree/", Typeflag: tar.TypeDir, Mode: 0o755},
		tar.Header{Name: "tree/f", Typeflag: tar.TypeReg, Mode: 0o644})
	os.MkdirAll(filepath.Join(dir, "into"), 0o755)
	if code, out, _ := fs.cli("cp", "dev:tree", filepath.Join(dir, "into")); code != 0 || out != "Downloaded to "+filepath.Join(dir, "into", "tree")+"\n" {
		t.Errorf("cp dir down: %d %q", code, out)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "into", "tree", "f")); string(b) != "content of tree/f" {
		t.Errorf("extracted %q", b)
	}
	if code, _, stderr := fs.cli("cp", "a", "b"); code != 2 || !strings.Contains(stderr, "exactly one") {
		t.Errorf("cp local local: %d %q", code, stderr)
	}

	// No server, no auto-start: a clear error.
	var out2, err2 bytes.Buffer
	a = &app{stdout: &out2, stderr: &err2, getenv: func(k string) string {
		return map[string]string{"BOXRUN_STATE_DIR": dir, "BOXRUN_PORT": "1"}[k]
	}, noAutostart: true}
	if code := a.main([]string{"ls"}); code != 1 || !strings.Contains(err2.String(), "no boxrun server answers") {
		t.Errorf("no server: %d %q", code, err2.String())
	}
}

func tarBytes(t *testing.T, entries ...tar.Header) []byte {
	b, _ := io.ReadAll(tarOf(t, entries...))
	return b
}

func TestCompletion(t *testing.T) {
	a := &app{getenv: func(string) string { return "" }, noAutostart: true}
	for _, sh := range []string{"bash", "zsh", "fish"} {
		var out bytes.Buffer
		a.stdout, a.stderr = &out, io.Discard
		if code := a.main([]string{"completion", sh}); code != 0 || !strings.Contains(out.String(), "attach") || !strings.Contains(out.String(), "--keep") {
			t.Errorf("%s: %d %q", sh, code, out.String())
		}
	}
}

func TestProgressBar(t *testing.T) {
	var out bytes.Buffer
	p := newProgressBar(&out, "alpine:3.20")
	p.interval = 0
	p.update(client.PullProgress{Layer: "a", Event: "start", Total: 1 << 20})
	p.update(client.PullProgress{Layer: "a", Event: "progress", Offset: 1 << 19, Total: 1 << 20})
	if !strings.Contains(out.String(), "512.0 kB / 1.0 MB") || !strings.Contains(out.String(), "[===============               ]") {
		t.Errorf("bar %q", out.String())
	}
	p.update(client.PullProgress{Layer: "a", Event: "done", Offset: 1 << 20, Total: 1 << 20})
	p.finish(nil)
	if !strings.HasSuffix(out.String(), "\r\x1b[KPulled alpine:3.20 (1.0 MB)\n") {
		t.Errorf("end %q", out.String())
	}
	var nilBar *progressBar // stderr not a terminal: nothing, no panic
	nilBar.update(client.PullProgress{})
	nilBar.finish(nil)
}
