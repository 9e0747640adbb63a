package boxrund

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// wsDial opens the attach WebSocket of box through client c.
func wsDial(t *testing.T, c *client, box, query string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := strings.Replace(c.base, "http://", "ws://", 1) + "/v1/boxes/" + box + "/attach" + query
	return websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: c.http})
}

// term reads the session's output until want shows up (or the exit frame).
type term struct {
	t    *testing.T
	conn *websocket.Conn
	out  strings.Builder
	exit map[string]any
}

func (s *term) send(text string) {
	s.t.Helper()
	if err := s.conn.Write(context.Background(), websocket.MessageBinary, []byte(text)); err != nil {
		s.t.Fatalf("send %q: %v", text, err)
	}
}

// expect reads until the output contains want.
func (s *term) expect(want string) {
	s.t.Helper()
	for !strings.Contains(s.out.String(), want) {
		if s.next() {
			s.t.Fatalf("session ended (%v) before %q; output %q", s.exit, want, s.out.String())
		}
	}
}

// end reads until the final text frame (exit or error) and returns it.
func (s *term) end() map[string]any {
	s.t.Helper()
	for !s.next() {
	}
	return s.exit
}

// next reads one frame; true when it was the final text frame.
func (s *term) next() bool {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	typ, data, err := s.conn.Read(ctx)
	if err != nil {
		s.t.Fatalf("reading the session: %v; output so far %q", err, s.out.String())
	}
	if typ == websocket.MessageText {
		s.exit = nil
		json.Unmarshal(data, &s.exit)
		return s.exit["type"] == "exit" || s.exit["type"] == "error"
	}
	s.out.Write(data)
	return false
}

// TestAttachWebSocket drives the attach route as a browser or the CLI
// does: type, read, resize, exit with a code that comes back.
func TestAttachWebSocket(t *testing.T) {
	box := sharedBox(t)
	for _, name := range []string{"unix", "tcp"} {
		t.Run(name, func(t *testing.T) {
			c := fx.clients[name]
			conn, _, err := wsDial(t, c, box.ID, "?cols=100&rows=30")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.CloseNow()
			s := &term{t: t, conn: conn}
			s.send("stty size; echo T=$TERM\n")
			s.expect("30 100")
			s.expect("T=xterm-256color")
			resize, _ := json.Marshal(map[string]any{"type": "resize", "cols": 120, "rows": 40})
			conn.Write(context.Background(), websocket.MessageText, resize)
			conn.Write(context.Background(), websocket.MessageText, []byte("not json: ignored"))
			time.Sleep(200 * time.Millisecond)
			s.send("stty size\n")
			s.expect("40 120")
			s.send("exit 3\n")
			if end := s.end(); end["type"] != "exit" || end["code"] != float64(3) {
				t.Errorf("final frame %v, want exit code 3", end)
			}
			// Then the server closes the connection.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, _, err := conn.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
				t.Errorf("after the exit frame: %v, want a normal close", err)
			}
		})
	}
	// A session whose client leaves is ended; the box keeps running.
	conn, _, err := wsDial(t, fx.clients["unix"], box.ID, "?shell=/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	s := &term{t: t, conn: conn}
	s.send("sleep 1000 & echo started\n")
	s.expect("started")
	conn.CloseNow()
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, execSpec("sh", "-c", "sleep 2; pgrep -f 'sleep 1000' || echo gone"))
	if err != nil || !strings.Contains(res.Stdout, "gone") {
		t.Errorf("after the client left: %v %q (the session's processes must be hung up)", err, res.Stdout)
	}
	// Errors: before the upgrade for bad sizes, as a frame after it.
	if _, res, err := wsDial(t, fx.clients["unix"], box.ID, "?cols=70000"); err == nil || res == nil || res.StatusCode != 400 {
		t.Errorf("bad cols: %v %v", res, err)
	}
	conn, _, err = wsDial(t, fx.clients["unix"], "no-such-box", "")
	if err != nil {
		t.Fatal(err)
	}
	s = &term{t: t, conn: conn}
	if end := s.end(); end["type"] != "error" || end["code"] != "BOX_NOT_FOUND" || end["message"] == "" {
		t.Errorf("attach to a missing box: %v", end)
	}
}
