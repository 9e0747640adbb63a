package exec

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/boxrun/boxrun/errdefs"
)

// The host side of the protocol parses what a hostile guest sends. The fuzz
// targets below run their seeds with every `go test`; scripts/test.sh also
// fuzzes each for a bounded time:
//
//	go test -run XXX -fuzz 'FuzzFrames$' -fuzztime 15s ./exec/

// frames concatenates frames for the seeds.
func frames(fs ...[]byte) []byte { return bytes.Join(fs, nil) }

func fr(id uint32, typ byte, p string) []byte { return appendFrame(nil, id, typ, []byte(p)) }

func u32(v uint32) string { return string(binary.BigEndian.AppendUint32(nil, v)) }

// header is a frame header announcing n bytes that do not follow.
func header(id uint32, typ byte, n uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, n)
	b = binary.BigEndian.AppendUint32(b, id)
	return append(b, typ)
}

func repeat(f []byte, n int) []byte { return bytes.Repeat(f, n) }

// agentStreamSeeds are byte streams from an agent, on channel 1 (the
// fuzzed host has channels 1 to 3 open).
func agentStreamSeeds() [][]byte {
	deep := `{"exit":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
	return [][]byte{
		// An honest exec.
		frames(fr(1, frameStarted, `{"pid":42}`), fr(1, frameStdout, "hi\n"), fr(1, frameStderr, "oops\n"),
			fr(1, frameWindow, u32(100)), fr(1, frameResult, `{"exit":{"code":3}}`)),
		// Killed by a signal, then late frames for the finished channel.
		frames(fr(1, frameStarted, `{"pid":7}`), fr(1, frameResult, `{"exit":{"code":-1,"signal":"SIGKILL","timed_out":true}}`),
			fr(1, frameStdout, "late"), fr(1, frameResult, `{}`)),
		// A failure with a code the agent may not pick.
		frames(fr(1, frameResult, `{"error":"nope","code":"BOX_NOT_FOUND"}`)),
		// Several channels interleaved, one unknown.
		frames(fr(2, frameStdout, "two"), fr(1, frameStarted, `{"pid":1}`), fr(3, frameEOF, ""),
			fr(9, frameStdout, "nobody"), fr(2, frameResult, `{"exit":{"code":0}}`), fr(1, frameResult, `{"exit":{"code":0}}`)),
		// Endless empty output: must not queue.
		frames(fr(1, frameStarted, `{"pid":42}`), repeat(fr(1, frameStdout, ""), 5000)),
		// Credit the host never gave.
		frames(fr(1, frameWindow, u32(0xffffffff))),
		frames(repeat(fr(1, frameWindow, u32(window)), 3)),
		frames(fr(1, frameWindow, "12345")),
		// Oversized frames, announced and never sent.
		header(1, frameResult, 1<<20),
		header(1, frameStdout, maxDataFrame+1),
		header(1, frameResult, 0xffffffff),
		// A truncated frame.
		fr(1, frameResult, `{"exit":{"code":0}}`)[:15],
		// Frame types the agent may not send.
		fr(1, frameRequest, `{"op":"exec"}`),
		fr(0, frameSync, "boxrun-sync"),
		fr(1, frameResize, "\x00\x18\x00\x50"),
		fr(1, 0, ""),
		fr(1, 200, ""),
		// Control and data floods.
		frames(fr(1, frameStdout, "x"), repeat(fr(1, frameEOF, ""), 2*maxQueuedControl)),
		frames(repeat(fr(1, frameStdout, strings.Repeat("x", maxDataFrame)), window/maxDataFrame+1)),
		// Hostile JSON: deep, huge strings, wrong types, bad pids.
		fr(1, frameResult, deep),
		frames(fr(1, frameStarted, strings.Repeat("[", 60000)), fr(1, frameResult, `{"x":`+strings.Repeat(`{"a":`, 40)+`1`+strings.Repeat("}", 40)+`}`)),
		frames(fr(1, frameStarted, `{"pid":-1}`), fr(1, frameStarted, `{"pid":1e300}`), fr(1, frameStarted, `{"pid":"1"}`)),
		fr(1, frameResult, `{"error":"`+strings.Repeat("é", 30000)+`","exit":{"code":1,"signal":"`+strings.Repeat("S", 20000)+`"}}`),
		fr(1, frameResult, `{"exit":null,"stat":{"exists":true,"size":-1,"mode":4294967295}}`),
		fr(1, frameResult, `{"protocol":2,"version":"\ud800","kernel":"`+strings.Repeat(`\u0000`, 1000)+`"}`),
	}
}

// FuzzFrames feeds an agent's byte stream to the host's frame reader with
// three channels open, checks that what it queued stays within the bounds
// (frame sizes, credit, control frames), and drains the channels the way
// the client does, decoding Started and Result payloads.
func FuzzFrames(f *testing.F) {
	for _, s := range agentStreamSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m := newMux(bufio.NewReaderSize(bytes.NewReader(data), 4096), &frameWriter{w: io.Discard}, slog.New(slog.DiscardHandler), true)
		m.nextID = 0
		var ss []*stream
		for range 3 {
			s, err := m.open()
			if err != nil {
				t.Fatal(err)
			}
			ss = append(ss, s)
		}
		_, err := m.read()
		if err == nil {
			t.Fatal("read returned without an error")
		}
		for _, s := range ss {
			s.mu.Lock()
			queued, ctrl := 0, 0
			for _, f := range s.q {
				if isData(f.typ) {
					if len(f.payload) == 0 || len(f.payload) > maxDataFrame {
						t.Errorf("channel %d: data frame of %d bytes queued", s.id, len(f.payload))
					}
					queued += len(f.payload)
				} else {
					if len(f.payload) > maxAgentControlFrame {
						t.Errorf("channel %d: control frame of %d bytes queued", s.id, len(f.payload))
					}
					ctrl++
				}
			}
			if queued > window || ctrl > maxQueuedControl || ctrl != s.ctrl || queued != s.unacked {
				t.Errorf("channel %d: %d data bytes (unacked %d) and %d (%d) control frames queued", s.id, queued, s.unacked, ctrl, s.ctrl)
			}
			if s.credit < 0 || s.credit > window {
				t.Errorf("channel %d: credit %d", s.id, s.credit)
			}
			s.mu.Unlock()
		}
		m.close(err)
		for _, s := range ss {
			for {
				f, err := s.recv(context.Background())
				if err != nil {
					break
				}
				switch f.typ {
				case frameStarted:
					decodeStarted(f.payload)
				case frameResult:
					checkResult(t, f.payload)
				}
			}
		}
	})
}

// gatedConn is a connection to a fake agent that says data once the host
// has written its first bytes (so that the channel they name is open),
// then ends; what the host writes is discarded.
type gatedConn struct {
	once sync.Once
	gate chan struct{}
	r    io.Reader
}

func (c *gatedConn) Write(p []byte) (int, error) {
	c.once.Do(func() { close(c.gate) })
	return len(p), nil
}

func (c *gatedConn) Read(p []byte) (int, error) {
	<-c.gate
	return c.r.Read(p)
}

func (c *gatedConn) Close() error { c.once.Do(func() { close(c.gate) }); return nil }

// FuzzClientExec runs Client.Start and Process.Wait, the host's exec path,
// against an agent saying data on the exec's channel (1): whatever it says,
// Start returns and so does Wait, with an exit status.
func FuzzClientExec(f *testing.F) {
	for _, s := range agentStreamSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		conn := &gatedConn{gate: make(chan struct{}), r: bytes.NewReader(data)}
		m := newMux(bufio.NewReaderSize(conn, 4096), &frameWriter{w: conn}, slog.New(slog.DiscardHandler), true)
		m.closer = conn
		c := &Client{m: m, log: m.log}
		go m.readLoop()
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p, err := c.Start(ctx, Command{Args: []string{"x"}})
		if err != nil {
			if ctx.Err() != nil {
				t.Fatalf("Start hung: %v", err)
			}
			return
		}
		var out bytes.Buffer
		done := make(chan *ExitStatus, 1)
		go func() { done <- p.Wait(&out, &out) }()
		select {
		case st := <-done:
			if st == nil || len(st.Error) > maxResultString || len(st.Signal) > 32 {
				t.Errorf("exit status %+v", st)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Wait hung")
		}
	})
}

// FuzzDecodeResult decodes a Result payload from the agent.
func FuzzDecodeResult(f *testing.F) {
	for _, s := range []string{
		`{}`, `{"exit":{"code":0}}`, `{"error":"x","code":"TIMEOUT"}`, `{"error":"x","code":"NOPE"}`,
		`{"stat":{"exists":true,"is_dir":true,"mode":2147484141,"size":4096}}`,
		`{"protocol":2,"version":"v1","kernel":"6.1"}`, `{"pid":12}`,
		`{"error":"a \"quoted\\\" [{ string"}`, `"[[[["`, `[[[[]]]]`, `{"a":[{"b":[{}]}]}`,
		strings.Repeat("[", 17) + strings.Repeat("]", 17), strings.Repeat("[", 16) + strings.Repeat("]", 16),
		`{"error":"` + strings.Repeat("\u00e9", 5000) + `"}`, `nul`, `{"exit":{"code":1e999}}`, "\xff\xfe",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		checkResult(t, p)
		if json.Valid(p) {
			if got, want := jsonDepthOK(p, maxJSONDepth), jsonDepth(p) <= maxJSONDepth; got != want {
				t.Errorf("jsonDepthOK = %v, depth %d", got, jsonDepth(p))
			}
		}
	})
}

// checkResult decodes p as the host does and checks what it keeps.
func checkResult(t *testing.T, p []byte) {
	t.Helper()
	res, err := decodeResult(p)
	if res == nil {
		if err == nil {
			t.Fatal("no result and no error")
		}
		return
	}
	if err != nil {
		switch errdefs.CodeOf(err) {
		case errdefs.ValidationError, errdefs.Timeout, errdefs.Canceled, errdefs.RuntimeError:
		default:
			t.Errorf("the agent picked the error code %s", errdefs.CodeOf(err))
		}
	}
	long := len(res.Error) > maxResultString || len(res.Version) > 256 || len(res.Kernel) > 256
	if res.Exit != nil {
		long = long || len(res.Exit.Error) > maxResultString || len(res.Exit.Signal) > 32
	}
	if long {
		t.Errorf("result keeps strings over their bound: %d-byte error", len(res.Error))
	}
	if utf8.Valid(p) && !utf8.ValidString(res.Error) {
		t.Errorf("truncation split a character")
	}
}

// jsonDepth is the nesting depth of valid JSON, by the standard decoder.
func jsonDepth(p []byte) int {
	d := json.NewDecoder(bytes.NewReader(p))
	depth, most := 0, 0
	for {
		tok, err := d.Token()
		if err != nil {
			return most
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
			most = max(most, depth)
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
	}
}

func TestTruncateString(t *testing.T) {
	for _, tc := range []struct {
		s    string
		n    int
		want string
	}{
		{"short", 10, "short"},
		{"exactly10!", 10, "exactly10!"},
		{"0123456789abc", 10, "0123456…"},
		{"ééééé", 8, "éé…"}, // 10 bytes; 5 fit, a half é does not
	} {
		if got := truncateString(tc.s, tc.n); got != tc.want {
			t.Errorf("truncateString(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
}
