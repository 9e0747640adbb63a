package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/coder/websocket"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// tcpServer serves h on TCP and returns a client of it.
func tcpServer(t *testing.T, h http.Handler, token string) *Client {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return New(Options{URL: srv.URL, Token: token})
}

// unixServer serves h on a Unix socket at p.
func unixServer(t *testing.T, p string, h http.Handler) {
	t.Helper()
	ln, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

func TestErrorDecoding(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/boxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		switch r.PathValue("id") {
		case "gone":
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(404)
			io.WriteString(w, `{"code":"BOX_NOT_FOUND","message":"Box 'gone' not found"}`)
		case "plain":
			w.WriteHeader(422)
			io.WriteString(w, "Failed to deserialize the JSON body\n")
		case "empty":
			w.WriteHeader(404)
		default:
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"id":"box_1","name":null,"status":"running","image":"alpine","cpu":2,"memory_mb":1024,"disk_size_gb":8,"network":false,"workdir":"/root","env":null,"volumes":null,"boxlite_id":"x","error_code":null,"error_message":null,"created_at":"2026-01-01T00:00:00+00:00","started_at":null,"stopped_at":null}`)
		}
	})
	c := tcpServer(t, mux, "")
	ctx := ctxT(t)

	_, err := c.GetBox(ctx, "gone")
	var ae *Error
	if !errors.As(err, &ae) || ae.Status != 404 || ae.Code != errdefs.BoxNotFound || ae.Message != "Box 'gone' not found" {
		t.Fatalf("got %#v", err)
	}
	if err.Error() != "[BOX_NOT_FOUND] Box 'gone' not found" {
		t.Errorf("Error() = %q", err.Error())
	}
	if CodeOf(err) != errdefs.BoxNotFound || !errdefs.Is(err, errdefs.BoxNotFound) || !errors.Is(err, &errdefs.Error{Code: errdefs.BoxNotFound}) {
		t.Errorf("the code does not reach errdefs: %v", err)
	}

	_, err = c.GetBox(ctx, "plain")
	if !errors.As(err, &ae) || ae.Code != errdefs.RuntimeError || ae.Message != "Failed to deserialize the JSON body" || ae.Status != 422 {
		t.Errorf("plain-text error: %#v", err)
	}
	_, err = c.GetBox(ctx, "empty")
	if !errors.As(err, &ae) || ae.Code != errdefs.RuntimeError || ae.Message != "404 Not Found" {
		t.Errorf("empty error: %#v", err)
	}
	b, err := c.GetBox(ctx, "box_1")
	if err != nil || b.ID != "box_1" || b.DisplayName() != "" || b.MemoryMB != 1024 {
		t.Errorf("box: %+v %v", b, err)
	}
	if CodeOf(nil) != "" || CodeOf(errors.New("x")) != errdefs.RuntimeError {
		t.Error("CodeOf of nil / a plain error")
	}
}

func TestSSEReader(t *testing.T) {
	stream := ": keep-alive\n\n" +
		"event: log\r\ndata: {\"a\":1}\r\n\r\n" + // CRLF
		"event: log\rdata: x\rdata: y\r\r" + // CR only, two data lines
		"id: 7\nevent: exit\ndata:nospace\n\n" +
		"event: ignored-no-data\n\n" +
		"retry: 10\ndata: last\n\n" +
		"event: cut\ndata: never"
	r := NewSSEReader(strings.NewReader(stream))
	want := []SSEMessage{
		{Event: "log", Data: `{"a":1}`},
		{Event: "log", Data: "x\ny"},
		{Event: "exit", Data: "nospace", ID: "7"},
		{Data: "last"},
	}
	for i, w := range want {
		m, err := r.Next()
		if err != nil || m != w {
			t.Fatalf("event %d: %+v %v, want %+v", i, m, err, w)
		}
	}
	if _, err := r.Next(); err != io.ErrUnexpectedEOF {
		t.Errorf("cut-off event: %v", err)
	}
	// A long line, read in small pieces.
	long := strings.Repeat("z", 200<<10)
	r = NewSSEReader(io.MultiReader(strings.NewReader("data: "+long[:100]), iotestHalf(strings.NewReader(long[100:]+"\n\n"))))
	if m, err := r.Next(); err != nil || m.Data != long {
		t.Errorf("long line: %d bytes, %v", len(m.Data), err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Errorf("end: %v", err)
	}
}

// iotestHalf reads at most 7 bytes at a time.
func iotestHalf(r io.Reader) io.Reader {
	return readerFunc(func(p []byte) (int, error) { return r.Read(p[:min(len(p), 7)]) })
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// sseHandler answers an exec's events with body, as boxrund frames them.
func sseHandler(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("id") != "exec_1" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(404)
			io.WriteString(w, `{"code":"EXEC_NOT_FOUND","message":"Exec 'x' not found"}`)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, body)
	}
}

func TestEvents(t *testing.T) {
	full := "event: log\ndata: {\"stream\":\"stdout\",\"data\":\"hello\\n\",\"seq\":0}\n\n" +
		":\n\n" +
		"event: log\ndata: {\"stream\":\"stderr\",\"data\":\"warn\\n\",\"seq\":1}\n\n" +
		"event: log\ndata: {\"stream\":\"stdout\",\"data\":\"bye\\n\",\"seq\":2}\n\n" +
		"event: exit\ndata: {\"stream\":null,\"data\":\"{\\\"exit_code\\\":3}\",\"seq\":3}\n\n" +
		"event: log\ndata: {\"stream\":\"stdout\",\"data\":\"after exit\",\"seq\":4}\n\n"
	mux := http.NewServeMux()
	mux.Handle("GET /v1/boxes/{box}/exec/{id}/events", sseHandler(full))
	c := tcpServer(t, mux, "")
	ctx := ctxT(t)

	s, err := c.Events(ctx, "exec_1")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		ev, err := s.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%s/%s/%q/%d", ev.Type, ev.Stream, ev.Data, ev.Seq))
		if ev.Type == "exit" && (ev.Exit == nil || ev.Exit.ExitCode == nil || *ev.Exit.ExitCode != 3) {
			t.Errorf("exit status %+v", ev.Exit)
		}
	}
	want := []string{`log/stdout/"hello\n"/0`, `log/stderr/"warn\n"/1`, `log/stdout/"bye\n"/2`, `exit//"{\"exit_code\":3}"/3`}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("events:\n%v\nwant\n%v", got, want)
	}

	// Wait: output in order, into one writer; the exit status.
	var out bytes.Buffer
	st, err := c.Wait(ctx, "exec_1", &out, &out)
	if err != nil || *st.ExitCode != 3 || out.String() != "hello\nwarn\nbye\n" {
		t.Errorf("Wait: %q %+v %v", out.String(), st, err)
	}

	// Unknown exec: the JSON error, before any stream.
	if _, err := c.Events(ctx, "nope"); CodeOf(err) != errdefs.ExecNotFound {
		t.Errorf("unknown exec: %v", err)
	}
}

func TestEventsEndWithoutExit(t *testing.T) {
	mux := http.NewServeMux()
	mux.Handle("GET /v1/boxes/{box}/exec/{id}/events", sseHandler("event: log\ndata: {\"stream\":\"stdout\",\"data\":\"x\",\"seq\":0}\n\n"))
	c := tcpServer(t, mux, "")
	_, err := c.Wait(ctxT(t), "exec_1", io.Discard, io.Discard)
	if !errors.Is(err, ErrStreamEnded) {
		t.Errorf("got %v, want ErrStreamEnded", err)
	}
}

func TestParseEventExitVariants(t *testing.T) {
	for _, tc := range []struct {
		data string
		want string
	}{
		{`{"stream":null,"data":"{\"exit_code\":null,\"error\":\"canceled\"}","seq":5}`, "<nil> canceled false"},
		{`{"stream":null,"data":"{\"exit_code\":-1,\"signal\":\"SIGKILL\",\"timed_out\":true}","seq":5}`, "-1  true"},
		{`{"stream":null,"data":"not json","seq":5}`, "-1 not json false"},
	} {
		ev, err := ParseEvent(SSEMessage{Event: "exit", Data: tc.data})
		if err != nil {
			t.Fatal(err)
		}
		code := "<nil>"
		if ev.Exit.ExitCode != nil {
			code = strconv.Itoa(*ev.Exit.ExitCode)
		}
		if got := fmt.Sprintf("%s %s %v", code, ev.Exit.Error, ev.Exit.TimedOut); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.data, got, tc.want)
		}
	}
	// The type from event_type when the SSE message names none.
	ev, err := ParseEvent(SSEMessage{Data: `{"event_type":"log","stream":"stdout","data":"d","seq":1}`})
	if err != nil || ev.Type != "log" {
		t.Errorf("event_type: %+v %v", ev, err)
	}
	if _, err := ParseEvent(SSEMessage{Event: "log", Data: "{"}); err == nil {
		t.Error("malformed data accepted")
	}
}

// TestAuthHeader: the bearer token goes with every kind of request: JSON,
// event streams, uploads, downloads, pulls and the WebSocket upgrade.
func TestAuthHeader(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]string{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.Method+" "+r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(401)
			io.WriteString(w, `{"code":"UNAUTHORIZED","message":"missing or wrong bearer token"}`)
			return
		}
		switch {
		case strings.HasSuffix(r.URL.Path, "/attach"):
			conn, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			conn.Write(r.Context(), websocket.MessageText, []byte(`{"type":"exit","code":0}`))
			conn.Close(websocket.StatusNormalClosure, "")
		case strings.HasSuffix(r.URL.Path, "/events"):
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "event: exit\ndata: {\"stream\":null,\"data\":\"{\\\"exit_code\\\":0}\",\"seq\":0}\n\n")
		case r.URL.Path == "/v1/images/pull":
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "event: done\ndata: {\"image\":\"alpine\",\"id\":\"abc\"}\n\n")
		default:
			io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"ok":true,"max_cpu":1}`)
		}
	})
	c := tcpServer(t, h, "s3cret")
	ctx := ctxT(t)
	if _, err := c.Info(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, "exec_1", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Upload(ctx, "b", "/root/f", strings.NewReader("x")); err != nil {
		t.Fatal(err)
	}
	if d, err := c.Download(ctx, "b", "/root/f"); err != nil {
		t.Fatal(err)
	} else {
		d.Close()
	}
	if _, err := c.Pull(ctx, "alpine", nil); err != nil {
		t.Fatal(err)
	}
	s, err := c.Attach(ctx, "b", AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if code, err := s.Wait(); code != 0 || err != nil {
		t.Errorf("attach: %d %v", code, err)
	}
	for k, v := range seen {
		if v != "Bearer s3cret" {
			t.Errorf("%s: Authorization %q", k, v)
		}
	}
	if len(seen) != 6 {
		t.Errorf("requests seen: %v", seen)
	}
	// Without the token: the server's 401 as an *Error.
	c2 := New(Options{URL: c.BaseURL()})
	if _, err := c2.Info(ctx); CodeOf(err) != "UNAUTHORIZED" {
		t.Errorf("no token: %v", err)
	}
	if _, err := c2.Attach(ctx, "b", AttachOptions{}); CodeOf(err) != "UNAUTHORIZED" {
		t.Errorf("attach without token: %v", err)
	}
}

func infoHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"max_cpu":4,"max_memory_mb":1024,"version":%q}`, name)
	})
}

// TestDiscover: the socket when it exists and answers; TCP when the
// socket is missing, stale, or the host is remote; ErrNoServer when
// nothing answers.
func TestDiscover(t *testing.T) {
	ctx := ctxT(t)
	dir, err := os.MkdirTemp("", "bxc-") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	tcp := httptest.NewServer(infoHandler("tcp"))
	t.Cleanup(tcp.Close)
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(tcp.URL, "http://"))
	env := func(extra map[string]string) Env {
		vars := map[string]string{"BOXRUN_STATE_DIR": dir, "BOXRUN_PORT": port}
		for k, v := range extra {
			vars[k] = v
		}
		return EnvFrom(func(k string) string { return vars[k] })
	}
	which := func(e Env) string {
		t.Helper()
		c, err := Discover(ctx, e, 0)
		if err != nil {
			return "error: " + err.Error()
		}
		in, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return in.Version
	}

	e := env(nil)
	if e.Socket != filepath.Join(dir, "boxrun.sock") || e.URL() != "http://127.0.0.1:"+port || e.Remote {
		t.Fatalf("env %+v", e)
	}
	if got := which(e); got != "tcp" {
		t.Errorf("no socket: %s", got)
	}
	// A stale socket (nobody listens): TCP.
	ln, err := net.Listen("unix", e.Socket)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if got := which(e); got != "tcp" {
		t.Errorf("stale socket: %s", got)
	}
	os.Remove(e.Socket)
	// A live socket: preferred.
	unixServer(t, e.Socket, infoHandler("unix"))
	if got := which(e); got != "unix" {
		t.Errorf("live socket: %s", got)
	}
	// BOXRUN_SOCKET overrides the path.
	if got := which(env(map[string]string{"BOXRUN_SOCKET": filepath.Join(dir, "other.sock")})); got != "tcp" {
		t.Errorf("BOXRUN_SOCKET elsewhere: %s", got)
	}
	// A remote host: never the local socket.
	r := env(map[string]string{"BOXRUN_HOST": "192.0.2.1"})
	if !r.Remote {
		t.Error("192.0.2.1 is not remote?")
	}
	r.Host = "127.0.0.1" // keep it answerable, still marked remote
	if got := which(r); got != "tcp" {
		t.Errorf("remote: %s", got)
	}
	// Nothing answers.
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	_, free, _ := net.SplitHostPort(ln2.Addr().String())
	ln2.Close()
	none := env(map[string]string{"BOXRUN_PORT": free, "BOXRUN_STATE_DIR": filepath.Join(dir, "nothing")})
	if _, err := Discover(ctx, none, 200*time.Millisecond); !errors.Is(err, ErrNoServer) {
		t.Errorf("nothing: %v", err)
	}
	// A server that answers with an error is still there.
	deny := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(401)
	}))
	t.Cleanup(deny.Close)
	_, dport, _ := net.SplitHostPort(strings.TrimPrefix(deny.URL, "http://"))
	if _, err := Discover(ctx, env(map[string]string{"BOXRUN_PORT": dport, "BOXRUN_STATE_DIR": filepath.Join(dir, "nothing")}), 0); err != nil {
		t.Errorf("401 server: %v", err)
	}
	// Defaults.
	d := EnvFrom(func(k string) string { return map[string]string{"HOME": "/h"}[k] })
	if d.StateDir != "/h/.boxrun" || d.Socket != "/h/.boxrun/boxrun.sock" || d.Port != 9090 || d.Host != "127.0.0.1" {
		t.Errorf("defaults %+v", d)
	}
}

func TestUploadDownload(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	var got []byte
	var order []string
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/boxes/{box}/files/upload", func(w http.ResponseWriter, r *http.Request) {
		mr, err := r.MultipartReader()
		if err != nil {
			t.Error(err)
			return
		}
		for {
			p, err := mr.NextPart()
			if err != nil {
				break
			}
			order = append(order, p.FormName())
			b, _ := io.ReadAll(p)
			if p.FormName() == "file" {
				got = b
			} else if string(b) != "/root/big.bin" && string(b) != "/root/x" {
				t.Errorf("dest %q", b)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok":true,"dest":"/root/big.bin"}`)
	})
	mux.HandleFunc("POST /v1/boxes/{box}/files/download", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Path string }
		json.NewDecoder(r.Body).Decode(&req)
		if req.Path == "/dir" {
			w.Header().Set("Content-Type", "application/x-tar")
			w.Header().Set("Content-Disposition", `attachment; filename="dir.tar"`)
			io.WriteString(w, "tar bytes")
			return
		}
		if r.PathValue("box") == "stopped" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(400)
			io.WriteString(w, `{"code":"BOX_NOT_RUNNING","message":"Box is not running"}`)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Disposition", `attachment; filename="big.bin"`)
		w.Header().Set("Content-Length", strconv.Itoa(len(big)))
		w.Write(big)
	})
	c := tcpServer(t, mux, "")
	ctx := ctxT(t)
	if err := c.Upload(ctx, "b", "/root/big.bin", bytes.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, big) || strings.Join(order, ",") != "dest,file" {
		t.Errorf("upload: %d bytes, parts %v", len(got), order)
	}
	d, err := c.Download(ctx, "b", "/root/big.bin")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(d)
	d.Close()
	if !bytes.Equal(b, big) || d.Dir || d.Size != int64(len(big)) || d.Name != "big.bin" {
		t.Errorf("download: %d bytes, %+v", len(b), d)
	}
	d, err = c.Download(ctx, "b", "/dir")
	if err != nil || !d.Dir || d.Name != "dir.tar" {
		t.Errorf("dir download: %+v %v", d, err)
	}
	d.Close()
	if _, err := c.Download(ctx, "stopped", "/x"); CodeOf(err) != errdefs.BoxNotRunning {
		t.Errorf("stopped: %v", err)
	}
	// An upload whose reader fails is not sent as complete.
	err = c.Upload(ctx, "b", "/root/x", io.MultiReader(strings.NewReader("part"), readerFunc(func([]byte) (int, error) { return 0, errors.New("disk on fire") })))
	if err == nil {
		t.Error("failing reader: upload succeeded")
	}
}

func TestPull(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/images/pull", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Image string }
		json.NewDecoder(r.Body).Decode(&req)
		w.Header().Set("Content-Type", "text/event-stream")
		if req.Image == "bad" {
			io.WriteString(w, "event: progress\ndata: {\"layer\":\"sha256:a\",\"event\":\"start\",\"offset\":0,\"total\":10}\n\n")
			io.WriteString(w, "event: error\ndata: {\"code\":\"IMAGE_PULL_FAILED\",\"message\":\"pull bad: not found\"}\n\n")
			return
		}
		for _, ev := range []string{
			`{"layer":"sha256:a","event":"start","offset":0,"total":10}`,
			`{"layer":"sha256:a","event":"progress","offset":5,"total":10}`,
			`{"layer":"sha256:a","event":"done","offset":10,"total":10}`,
			`{"layer":"sha256:b","event":"skipped","offset":0,"total":3}`,
		} {
			fmt.Fprintf(w, "event: progress\ndata: %s\n\n", ev)
		}
		io.WriteString(w, "event: done\ndata: {\"image\":\"alpine:3.20\",\"id\":\"abc123\"}\n\n")
	})
	c := tcpServer(t, mux, "")
	ctx := ctxT(t)
	var evs []string
	img, err := c.Pull(ctx, "alpine:3.20", func(p PullProgress) {
		evs = append(evs, fmt.Sprintf("%s:%s:%d/%d", p.Layer, p.Event, p.Offset, p.Total))
	})
	if err != nil || img.ID != "abc123" || img.Image != "alpine:3.20" {
		t.Fatalf("pull: %+v %v", img, err)
	}
	if want := "sha256:a:start:0/10 sha256:a:progress:5/10 sha256:a:done:10/10 sha256:b:skipped:0/3"; strings.Join(evs, " ") != want {
		t.Errorf("progress %v", evs)
	}
	if _, err := c.Pull(ctx, "bad", nil); CodeOf(err) != errdefs.ImagePullFailed || !strings.Contains(err.Error(), "not found") {
		t.Errorf("bad image: %v", err)
	}
	// A server without the route (boxrund's JSON 404, upstream's empty one).
	old := tcpServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(404)
		io.WriteString(w, `{"code":"NOT_FOUND","message":"no route"}`)
	}), "")
	if _, err := old.Pull(ctx, "alpine", nil); !errors.Is(err, ErrPullUnsupported) {
		t.Errorf("old server: %v", err)
	}
	upstream := tcpServer(t, http.NotFoundHandler(), "")
	if _, err := upstream.Pull(ctx, "alpine", nil); !errors.Is(err, ErrPullUnsupported) {
		t.Errorf("upstream: %v", err)
	}
}

// attachServer is a fake attach route: it echoes input in upper case,
// reports resizes as output, and ends with exit code 7 on "exit".
func attachServer(t *testing.T, mode string) *Client {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/boxes/{box}/attach", func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		ctx := r.Context()
		switch mode {
		case "error":
			conn.Write(ctx, websocket.MessageText, []byte(`{"type":"error","code":"BOX_NOT_RUNNING","message":"Box is not running"}`))
			conn.Close(websocket.StatusNormalClosure, "")
			return
		case "drop":
			conn.Write(ctx, websocket.MessageBinary, []byte("$ "))
			conn.CloseNow()
			return
		}
		q := r.URL.Query()
		conn.Write(ctx, websocket.MessageBinary, []byte(fmt.Sprintf("shell=%s rows=%s cols=%s term=%s\n", q.Get("shell"), q.Get("rows"), q.Get("cols"), q.Get("term"))))
		for {
			typ, b, err := conn.Read(ctx)
			if err != nil {
				return
			}
			if typ == websocket.MessageText {
				conn.Write(ctx, websocket.MessageBinary, append([]byte("ctl:"), b...))
				continue
			}
			if string(b) == "exit" {
				conn.Write(ctx, websocket.MessageText, []byte(`{"type":"exit","code":7}`))
				conn.Close(websocket.StatusNormalClosure, "")
				return
			}
			conn.Write(ctx, websocket.MessageBinary, bytes.ToUpper(b))
		}
	})
	return tcpServer(t, mux, "")
}

func TestAttach(t *testing.T) {
	ctx := ctxT(t)
	c := attachServer(t, "ok")
	s, err := c.Attach(ctx, "b", AttachOptions{Shell: "/bin/sh", Rows: 30, Cols: 100, Term: "xterm"})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	copied := make(chan struct{})
	go func() { io.Copy(&out, s); close(copied) }()
	s.Write([]byte("hi"))
	s.Resize(40, 120)
	time.Sleep(100 * time.Millisecond) // let the server answer in order
	s.Write([]byte("exit"))
	code, err := s.Wait()
	<-copied
	if code != 7 || err != nil {
		t.Errorf("wait: %d %v", code, err)
	}
	want := "shell=/bin/sh rows=30 cols=100 term=xterm\nHIctl:{\"cols\":120,\"rows\":40,\"type\":\"resize\"}"
	if out.String() != want {
		t.Errorf("output %q\nwant %q", out.String(), want)
	}

	// An error message from the server: Read ends, Wait has the *Error.
	s, err = attachServer(t, "error").Attach(ctx, "b", AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, s)
	if _, err := s.Wait(); CodeOf(err) != errdefs.BoxNotRunning {
		t.Errorf("error message: %v", err)
	}

	// A dropped connection.
	s, err = attachServer(t, "drop").Attach(ctx, "b", AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(s)
	if _, err := s.Wait(); !errors.Is(err, ErrConnectionLost) || string(b) != "$ " {
		t.Errorf("dropped: %q %v", b, err)
	}

	// A server without the route.
	if _, err := tcpServer(t, http.NotFoundHandler(), "").Attach(ctx, "b", AttachOptions{}); err == nil {
		t.Error("attach to a server without the route succeeded")
	}
}

// TestSocketTransport: every kind of request also works over the socket,
// the WebSocket upgrade included.
func TestSocketTransport(t *testing.T) {
	dir, err := os.MkdirTemp("", "bxc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	mux := http.NewServeMux()
	mux.Handle("GET /v1/info", infoHandler("unix"))
	mux.HandleFunc("GET /v1/boxes/{box}/attach", func(w http.ResponseWriter, r *http.Request) {
		if r.Host != "localhost" {
			t.Errorf("Host %q", r.Host)
		}
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		conn.Write(r.Context(), websocket.MessageBinary, []byte("over the socket"))
		conn.Write(r.Context(), websocket.MessageText, []byte(`{"type":"exit","code":0}`))
		conn.Close(websocket.StatusNormalClosure, "")
	})
	unixServer(t, sock, mux)
	c := New(Options{Socket: sock})
	ctx := ctxT(t)
	if in, err := c.Info(ctx); err != nil || in.Version != "unix" || c.Endpoint() != "unix:"+sock {
		t.Fatalf("info over socket: %+v %v", in, err)
	}
	s, err := c.Attach(ctx, "b", AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(s)
	if code, err := s.Wait(); string(b) != "over the socket" || code != 0 || err != nil {
		t.Errorf("attach over socket: %q %d %v", b, code, err)
	}
}
