package boxrund

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBadInput sends what a broken or hostile client sends. Every answer
// is a JSON error with the right status, never a 5xx; the server keeps
// answering; and no half-made box is left.
func TestBadInput(t *testing.T) {
	box := sharedBox(t)
	c := fx.clients["tcp"]
	boxesBefore := len(c.do(t, "GET", "/v1/boxes", "").array(t))
	raw := func(method, path, ctype, body string) *resp {
		return c.send(t, c.req(t, method, path, ctype, strings.NewReader(body)))
	}
	big := `{"image":"` + strings.Repeat("a", 2<<20) + `"}`
	for _, tc := range []struct {
		name, method, path, ctype, body string
		status                          int
		msg                             string
	}{
		{"malformed", "POST", "/v1/boxes", "application/json", `{"image":`, 400, "malformed JSON"},
		{"not json", "POST", "/v1/boxes", "application/json", `image=x`, 400, "malformed JSON"},
		{"two values", "POST", "/v1/boxes", "application/json", `{"image":"x"} {}`, 400, "more than one JSON value"},
		{"array", "POST", "/v1/boxes", "application/json", `[]`, 422, "must be an object"},
		{"wrong type", "POST", "/v1/boxes", "application/json", `{"image":5}`, 422, "image must be a string"},
		{"wrong nested type", "POST", "/v1/boxes", "application/json", `{"image":"x","volumes":[{"readonly":"yes"}]}`, 422, "must be a boolean"},
		{"cmd not list", "POST", "/v1/boxes/" + box.ID + "/exec", "application/json", `{"cmd":"ls"}`, 422, "cmd must be a list"},
		{"cmd of numbers", "POST", "/v1/boxes/" + box.ID + "/exec", "application/json", `{"cmd":[1,2]}`, 422, "must be a string"},
		{"huge number", "POST", "/v1/boxes", "application/json", `{"image":"x","cpu":1e30}`, 422, "cpu must be an integer"},
		{"oversized", "POST", "/v1/boxes", "application/json", big, 413, "larger than"},
		{"oversized run", "POST", "/v1/run", "application/json", big, 413, "larger than"},
		{"text/plain", "POST", "/v1/boxes", "text/plain", `{"image":"x"}`, 415, "Content-Type must be application/json"},
		{"form", "POST", "/v1/boxes/" + box.ID + "/exec", "application/x-www-form-urlencoded", `cmd=ls`, 415, "Content-Type"},
		{"no content type", "POST", "/v1/gc", "", `{}`, 415, "Content-Type"},
		{"empty create", "POST", "/v1/boxes", "application/json", ``, 400, "JSON request body is required"},
		{"upload not multipart", "POST", "/v1/boxes/" + box.ID + "/files/upload", "application/json", `{}`, 400, "multipart/form-data"},
		{"upload no boundary", "POST", "/v1/boxes/" + box.ID + "/files/upload", "multipart/form-data", `--x\r\n`, 400, "multipart"},
		{"upload broken", "POST", "/v1/boxes/" + box.ID + "/files/upload", "multipart/form-data; boundary=xyz", "--xyz\r\nContent-Disposition: form-data; name=\"dest\"\r\n\r\n/root/a\r\n--xyz\r\nContent-Disp", 400, "malformed multipart"},
		{"upload truncated file", "POST", "/v1/boxes/" + box.ID + "/files/upload", "multipart/form-data; boundary=xyz", "--xyz\r\nContent-Disposition: form-data; name=\"dest\"\r\n\r\n/root/trunc\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nsome bytes and no end", 400, ""},
		{"unknown route", "GET", "/v1/boxes/a/b/c/d", "", ``, 404, "no route"},
		{"unknown version", "GET", "/v2/info", "", ``, 404, "no route"},
		{"method", "PATCH", "/v1/boxes/" + box.ID, "", ``, 405, "PATCH is not allowed"},
		{"method on exec", "DELETE", "/v1/boxes/" + box.ID + "/exec", "", ``, 405, "not allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := raw(tc.method, tc.path, tc.ctype, tc.body)
			if r.status >= 500 {
				t.Fatalf("5xx for bad input: %d %s", r.status, r.body)
			}
			m := r.object(t)
			code, _ := m["code"].(string)
			msg, _ := m["message"].(string)
			if r.status != tc.status || code == "" || !strings.Contains(msg, tc.msg) {
				t.Errorf("%d %s, want %d with message containing %q", r.status, r.body, tc.status, tc.msg)
			}
		})
	}
	// The truncated upload left nothing at its destination.
	if st, err := fx.eng.Stat(ctxT(t, time.Minute), box.ID, "/root/trunc"); err != nil || st.Exists {
		t.Errorf("truncated upload: exists %v, err %v", st.Exists, err)
	}

	// Half-sent requests (headers, or a body, that never finish) do not
	// hold the server: others are answered meanwhile.
	var conns []net.Conn
	for i := range 20 {
		conn, err := net.Dial("tcp", fx.srv.TCPAddr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		if i%2 == 0 {
			fmt.Fprintf(conn, "POST /v1/boxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image\":")
		} else {
			fmt.Fprintf(conn, "GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
		}
	}
	c.do(t, "GET", "/v1/info", "").want(t, 200)
	fx.clients["unix"].do(t, "GET", "/v1/info", "").want(t, 200)
	for _, conn := range conns {
		conn.Close()
	}

	// A client that gives up during a create leaves no box behind. The
	// box has a shape of its own (224 MiB), so its create first boots the
	// shape's warm-start template: seconds, not the restore's fraction of
	// a second, and the client gives up in the middle.
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	body := `{"image":` + quote("docker://"+fx.image) + `,"cpu":1,"memory_mb":224,"disk_size_gb":1,"name":"abandoned"}`
	req := c.req(t, "POST", "/v1/boxes", "application/json", strings.NewReader(body)).WithContext(ctx)
	if res, err := c.http.Do(req); err == nil {
		res.Body.Close()
		t.Logf("create answered before the client gave up: %d", res.StatusCode)
	}
	cancel()
	deadline := time.Now().Add(time.Minute)
	for {
		r := c.do(t, "GET", "/v1/boxes/abandoned", "")
		if r.status == 404 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("abandoned create still there after a minute: %s", r.body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if n := len(c.do(t, "GET", "/v1/boxes", "").array(t)); n != boxesBefore {
		t.Errorf("%d boxes after the bad input, %d before", n, boxesBefore)
	}
}

// TestIdleConnections: connections that send nothing are dropped at the
// header timeout, and the hard connection cap makes the rest wait rather
// than exhaust the server. Idle keep-alive connections past MaxIdle are
// closed, longest idle first, so they never hold the slots.
func TestIdleConnections(t *testing.T) {
	srv, err := Listen(New(fx.eng, Options{}), ListenConfig{Port: freePort(), MaxConns: 4, MaxIdle: 2, HeaderTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, srv)
	var idle []net.Conn
	for range 4 {
		conn, err := net.Dial("tcp", srv.TCPAddr())
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, conn)
	}
	t.Cleanup(func() {
		for _, c := range idle {
			c.Close()
		}
	})
	c := tcpClient(srv.TCPAddr(), "")
	c.http.Timeout = 30 * time.Second
	start := time.Now()
	c.do(t, "GET", "/v1/info", "").want(t, 200)
	t.Logf("answered %v after 4 idle connections filled the cap", time.Since(start).Round(time.Millisecond))
	// The idle connections were closed by the server.
	for _, conn := range idle {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("idle connection: read %v, want EOF (closed by the server)", err)
		}
	}
	c.http.Transport.(*http.Transport).CloseIdleConnections()

	// Four keep-alive connections, each idle after one request: the two
	// longest idle are closed, the newest two stay open; a fifth client
	// is answered at once although four connections were opened.
	var kept []net.Conn
	for i := range 4 {
		conn, err := net.Dial("tcp", srv.TCPAddr())
		if err != nil {
			t.Fatal(err)
		}
		kept = append(kept, conn)
		fmt.Fprintf(conn, "GET /v1/info HTTP/1.1\r\nHost: %s\r\n\r\n", srv.TCPAddr())
		res, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil || res.StatusCode != 200 {
			t.Fatalf("keep-alive request %d: %v", i, err)
		}
		io.Copy(io.Discard, res.Body)
		time.Sleep(100 * time.Millisecond) // idle in the order sent
	}
	t.Cleanup(func() {
		for _, c := range kept {
			c.Close()
		}
	})
	for i, conn := range kept {
		wantOpen := i >= 2
		d := 5 * time.Second
		if wantOpen {
			d = 300 * time.Millisecond
		}
		conn.SetReadDeadline(time.Now().Add(d))
		_, err := conn.Read(make([]byte, 1))
		if open := errors.Is(err, os.ErrDeadlineExceeded); open != wantOpen {
			t.Errorf("keep-alive connection %d: read %v, want open %v", i, err, wantOpen)
		}
	}
	start = time.Now()
	c.do(t, "GET", "/v1/info", "").want(t, 200)
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("a new client waited %v with two keep-alive connections open", d)
	}
}

// serve runs srv until the test ends.
func serve(t *testing.T, srv *Server) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, time.Second) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
}

// TestToken: with a token, TCP requests need it (401 JSON otherwise, and
// logged like any request); the 0600 socket does not. A non-loopback host
// is refused without a token.
func TestToken(t *testing.T) {
	dir := t.TempDir()
	var logBuf syncBuffer
	logger := slog.New(slog.NewTextHandler(&logBuf, nil))
	srv, err := Listen(New(fx.eng, Options{Logger: logger}), ListenConfig{Socket: filepath.Join(dir, "s.sock"), Port: freePort(), Token: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, srv)
	for _, tc := range []struct{ header string }{{""}, {"Bearer wrong"}, {"s3cret"}, {"Basic s3cret"}, {"Bearer s3cret2"}} {
		c := tcpClient(srv.TCPAddr(), "")
		req := c.req(t, "GET", "/v1/boxes", "", nil)
		if tc.header != "" {
			req.Header.Set("Authorization", tc.header)
		}
		r := c.send(t, req)
		r.wantError(t, 401, "UNAUTHORIZED", "token")
		if r.header.Get("WWW-Authenticate") == "" {
			t.Errorf("401 without WWW-Authenticate")
		}
	}
	tcpClient(srv.TCPAddr(), "s3cret").do(t, "GET", "/v1/boxes", "").want(t, 200)
	lower := tcpClient(srv.TCPAddr(), "")
	req := lower.req(t, "GET", "/v1/info", "", nil)
	req.Header.Set("Authorization", "bearer s3cret") // the scheme is case-insensitive
	lower.send(t, req).want(t, 200)
	tcpClient(srv.TCPAddr(), "s3cret").do(t, "GET", "/v1/nope", "").wantError(t, 404, "NOT_FOUND", "")
	unixClient(srv.Socket()).do(t, "GET", "/v1/info", "").want(t, 200)
	// With a token any Host will do (the token is the guard); a foreign
	// Origin is still refused.
	tc := tcpClient(srv.TCPAddr(), "s3cret")
	req = tc.req(t, "GET", "/v1/info", "", nil)
	req.Host = "boxes.example.com:9090"
	tc.send(t, req).want(t, 200)
	req = tc.req(t, "POST", "/v1/gc", "application/json", strings.NewReader("{}"))
	req.Header.Set("Origin", "http://evil.example")
	tc.send(t, req).wantError(t, 403, "FORBIDDEN", "evil.example")
	// Every request is logged, the refused ones too.
	deadline := time.Now().Add(5 * time.Second)
	for strings.Count(logBuf.String(), "status=401") < 5 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := strings.Count(logBuf.String(), "status=401"); n != 5 {
		t.Errorf("%d log lines with status=401 for 5 refused requests:\n%s", n, logBuf.String())
	}

	for _, host := range []string{"0.0.0.0", "::", "192.0.2.1"} {
		_, err := Listen(New(fx.eng, Options{}), ListenConfig{Host: host, Port: freePort()})
		if err == nil || !strings.Contains(err.Error(), "without a token") {
			t.Errorf("host %s without token: %v", host, err)
		}
	}
}

// TestHostOrigin: without a token, TCP requests must name a loopback host
// (DNS rebinding), and a request from another Origin is refused (CSRF);
// what the SDK's clients send passes: httpx over TCP sends Host
// 127.0.0.1:PORT, over the socket "localhost". The socket is not guarded.
func TestHostOrigin(t *testing.T) {
	c := fx.clients["tcp"]
	addr := fx.srv.TCPAddr()
	_, port, _ := net.SplitHostPort(addr)
	send := func(c *client, method, path, host, origin string) *resp {
		var body io.Reader
		ctype := ""
		if method == "POST" {
			body, ctype = strings.NewReader("{}"), "application/json"
		}
		req := c.req(t, method, path, ctype, body)
		if host != "" {
			req.Host = host
		}
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		return c.send(t, req)
	}
	for _, host := range []string{addr, "127.0.0.1", "localhost:" + port, "LocalHost", "127.8.9.10:" + port, "[::1]:" + port, "[::1]", "localhost."} {
		if r := send(c, "GET", "/v1/info", host, ""); r.status != 200 {
			t.Errorf("Host %q: %d %s", host, r.status, r.body)
		}
	}
	for _, host := range []string{"evil.example", "evil.example:" + port, "127.0.0.1.evil.example", "localhost.evil.example:" + port, "10.0.0.1"} {
		send(c, "GET", "/v1/info", host, "").wantError(t, 403, "FORBIDDEN", "loopback")
		send(c, "POST", "/v1/gc", host, "").wantError(t, 403, "FORBIDDEN", "loopback")
	}
	for _, origin := range []string{"http://evil.example", "null", "http://localhost:" + port, "https://" + addr, "http://" + addr + ".evil.example"} {
		send(c, "POST", "/v1/gc", "", origin).wantError(t, 403, "FORBIDDEN", "cross-origin")
	}
	send(c, "POST", "/v1/gc", "", "http://"+addr).want(t, 200)
	send(c, "POST", "/v1/gc", "localhost:"+port, "http://localhost:"+port).want(t, 200)
	u := fx.clients["unix"]
	send(u, "GET", "/v1/info", "", "").want(t, 200)
	send(u, "POST", "/v1/gc", "evil.example", "http://evil.example").want(t, 200)
}

// syncBuffer is a bytes.Buffer safe for a logger and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestSocket: the socket is 0600; a stale one is replaced, a live one or
// a non-socket file is not touched; it is removed when serving ends.
func TestSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "boxrun.sock")
	// A stale socket, as a killed server leaves it.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	srv, err := Listen(New(fx.eng, Options{}), ListenConfig{Socket: sock})
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	fi, err := os.Lstat(sock)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v, err %v; want a 0600 socket", fi.Mode(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, time.Second) }()
	unixClient(sock).do(t, "GET", "/v1/info", "").want(t, 200)
	if _, err := Listen(New(fx.eng, Options{}), ListenConfig{Socket: sock}); err == nil || !strings.Contains(err.Error(), "served by another process") {
		t.Errorf("second server on a live socket: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after Serve: %v", err)
	}
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("keep"), 0o644)
	if _, err := Listen(New(fx.eng, Options{}), ListenConfig{Socket: plain}); err == nil {
		t.Errorf("a regular file was taken for a socket")
	}
	if b, _ := os.ReadFile(plain); string(b) != "keep" {
		t.Errorf("regular file changed")
	}
	if _, err := Listen(New(fx.eng, Options{}), ListenConfig{}); err == nil {
		t.Errorf("no socket and no port accepted")
	}
}
