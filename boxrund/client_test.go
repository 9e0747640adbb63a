package boxrund

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"
)

// resp is a finished answer.
type resp struct {
	status int
	header http.Header
	body   []byte
}

func (c *client) req(t *testing.T, method, path, ctype string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, c.base+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	return req
}

// do sends a request with a JSON body ("" for none) and reads the answer.
func (c *client) do(t *testing.T, method, path, body string) *resp {
	t.Helper()
	var r io.Reader
	ctype := ""
	if body != "" {
		r, ctype = strings.NewReader(body), "application/json"
	}
	return c.send(t, c.req(t, method, path, ctype, r))
}

func (c *client) send(t *testing.T, req *http.Request) *resp {
	t.Helper()
	res, err := c.http.Do(req)
	if err != nil {
		t.Fatalf("%s %s over %s: %v", req.Method, req.URL.Path, c.name, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", req.Method, req.URL.Path, err)
	}
	return &resp{status: res.StatusCode, header: res.Header, body: b}
}

func (r *resp) want(t *testing.T, status int) *resp {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.body)
	}
	return r
}

// wantError checks an error answer: the status, exactly {code, message}
// as JSON, the code, and that the message contains msg.
func (r *resp) wantError(t *testing.T, status int, code, msg string) {
	t.Helper()
	r.want(t, status)
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q", ct)
	}
	m := r.object(t)
	if keys := keysOf(m); strings.Join(keys, ",") != "code,message" {
		t.Errorf("error keys %v, want code,message: %s", keys, r.body)
	}
	if m["code"] != code {
		t.Errorf("code %v, want %s: %s", m["code"], code, r.body)
	}
	if s, _ := m["message"].(string); s == "" || !strings.Contains(s, msg) {
		t.Errorf("message %q, want it to contain %q", s, msg)
	}
}

func (r *resp) object(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("body is not a JSON object: %v: %s", err, r.body)
	}
	return m
}

func (r *resp) array(t *testing.T) []map[string]any {
	t.Helper()
	var a []map[string]any
	if err := json.Unmarshal(r.body, &a); err != nil {
		t.Fatalf("body is not a JSON array: %v: %s", err, r.body)
	}
	return a
}

func keysOf(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func wantKeys(t *testing.T, what string, m map[string]any, want string) {
	t.Helper()
	w := strings.Split(want, ",")
	sort.Strings(w)
	if got := keysOf(m); strings.Join(got, ",") != strings.Join(w, ",") {
		t.Errorf("%s keys\n got %v\nwant %v", what, got, w)
	}
}

const (
	boxKeys  = "id,name,status,image,cpu,memory_mb,disk_size_gb,network,workdir,env,volumes,boxlite_id,error_code,error_message,created_at,started_at,stopped_at,network_policy,ports"
	execKeys = "id,box_id,status,cmd,env,workdir,timeout_ms,exit_code,error_message,created_at,finished_at"
)

// sseEvent is one parsed SSE event.
type sseEvent struct {
	Type   string
	Stream *string
	Data   string
	Seq    int
}

// events reads an exec's SSE stream to its end, as a client would, and
// also reports how many keep-alive comments came.
func (c *client) events(t *testing.T, execID string) (evs []sseEvent, comments int) {
	t.Helper()
	res, err := c.http.Do(c.req(t, "GET", "/v1/boxes/x/exec/"+execID+"/events", "", nil))
	if err != nil {
		t.Fatalf("events: %v", err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("events: %d %q %s", res.StatusCode, res.Header.Get("Content-Type"), b)
	}
	return readSSE(t, res.Body)
}

func readSSE(t *testing.T, r io.Reader) (evs []sseEvent, comments int) {
	t.Helper()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<22)
	var typ, data string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if typ == "" && data == "" {
				continue
			}
			var ev sseEvent
			if err := json.Unmarshal([]byte(data), &ev); err != nil {
				t.Fatalf("event data is not JSON: %q", data)
			}
			ev.Type = typ
			evs = append(evs, ev)
			typ, data = "", ""
		case strings.HasPrefix(line, ":"):
			comments++
		case strings.HasPrefix(line, "event: "):
			typ = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			if data != "" {
				t.Fatalf("event with two data lines")
			}
			data = strings.TrimPrefix(line, "data: ")
		default:
			t.Fatalf("unexpected SSE line %q", line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading SSE: %v", err)
	}
	return evs, comments
}

// waitExec polls an exec every 100 ms until it is no longer running.
func (c *client) waitExec(t *testing.T, execID string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		x := c.do(t, "GET", "/v1/boxes/any/exec/"+execID, "").want(t, 200).object(t)
		if x["status"] != "running" {
			return x
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec %s still running after a minute", execID)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// output concatenates an event list's log data per stream and returns the
// exit event's parsed data.
func output(t *testing.T, evs []sseEvent) (stdout, stderr string, exit map[string]any) {
	t.Helper()
	var o, e bytes.Buffer
	for i, ev := range evs {
		if ev.Seq != i {
			t.Errorf("event %d has seq %d", i, ev.Seq)
		}
		switch ev.Type {
		case "log":
			if ev.Stream != nil && *ev.Stream == "stderr" {
				e.WriteString(ev.Data)
			} else {
				o.WriteString(ev.Data)
			}
		case "exit":
			if i != len(evs)-1 {
				t.Errorf("exit event is not last")
			}
			if ev.Stream != nil {
				t.Errorf("exit event has stream %q", *ev.Stream)
			}
			if err := json.Unmarshal([]byte(ev.Data), &exit); err != nil {
				t.Errorf("exit data %q is not JSON", ev.Data)
			}
		default:
			t.Errorf("event type %q", ev.Type)
		}
	}
	if exit == nil {
		t.Fatalf("no exit event in %d events", len(evs))
	}
	return o.String(), e.String(), exit
}
