package boxrund

import (
	"bytes"
	"encoding/json"
	"net/http"
	"time"

	"github.com/boxrun/boxrun"
)

// writeTimeout bounds each write of a streamed answer (SSE, downloads): a
// client that stops reading is dropped after it.
const writeTimeout = 30 * time.Second

// logData is the data line of an SSE event (spec §3.3): exactly these keys.
type logData struct {
	Stream *string `json:"stream"`
	Data   string  `json:"data"`
	Seq    int     `json:"seq"`
}

// exitData is the JSON string an exit event carries in its data: the exit
// code (null when canceled, as upstream), and why it ended abnormally.
type exitData struct {
	ExitCode *int   `json:"exit_code"`
	Error    string `json:"error,omitempty"`
	Signal   string `json:"signal,omitempty"`
	TimedOut bool   `json:"timed_out,omitempty"`
}

// events serves GET /v1/boxes/{box}/exec/{id}/events: every event from seq
// 0, then live ones, ending right after the exit event. Unlike upstream a
// canceled or failed exec also ends with an exit event, so no client waits
// for ever. A client that leaves only ends its own stream.
func (a *API) events(w http.ResponseWriter, r *http.Request) error {
	ctx, cancel := a.requestContext(r)
	defer cancel()
	id := r.PathValue("id")
	evs, err := a.eng.ExecEvents(ctx, id)
	if err != nil {
		return err // 404 EXEC_NOT_FOUND, as JSON, before the stream starts
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	// Every write has a deadline: a client that stops reading ends its
	// stream (and, through ctx, the engine's follower) instead of pinning
	// the handler.
	send := func(b []byte) bool {
		rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		if len(b) > 0 {
			if _, err := w.Write(b); err != nil {
				return false
			}
		}
		return rc.Flush() == nil
	}
	if !send(nil) {
		return nil
	}
	keep := time.NewTicker(a.opts.KeepAlive)
	defer keep.Stop()
	var buf bytes.Buffer
	next := 0
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				// The engine's stream ended without an exit (its store
				// failed): still end with one.
				ev = boxrun.Event{Type: "exit", Seq: next, ExitCode: -1, Error: "event stream ended early"}
			}
			// Frame every event already waiting (a replay has many) into
			// one write and one flush.
			buf.Reset()
			for {
				frame(&buf, ev)
				next = ev.Seq + 1
				if ev.Type == "exit" || buf.Len() >= 64<<10 {
					break
				}
				var more bool
				select {
				case ev, more = <-evs:
				default:
				}
				if !more {
					break
				}
			}
			if !send(buf.Bytes()) {
				return nil // the client left, or stopped reading
			}
			if ev.Type == "exit" {
				return nil
			}
			keep.Reset(a.opts.KeepAlive)
		case <-keep.C:
			if !send([]byte(":\n\n")) {
				return nil
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// frame writes one SSE event: "event: TYPE", one line of JSON data.
func frame(buf *bytes.Buffer, ev boxrun.Event) {
	d := logData{Data: ev.Data, Seq: ev.Seq}
	if ev.Type == "exit" {
		x := exitData{Error: ev.Error, Signal: ev.Signal, TimedOut: ev.TimedOut}
		if ev.Error != "canceled" {
			code := ev.ExitCode
			x.ExitCode = &code
		}
		b, _ := json.Marshal(x)
		d.Data = string(b)
	} else {
		s := ev.Stream
		d.Stream = &s
	}
	buf.WriteString("event: ")
	buf.WriteString(ev.Type)
	buf.WriteString("\ndata: ")
	enc := json.NewEncoder(buf) // one line: newlines in data are escaped
	enc.SetEscapeHTML(false)
	enc.Encode(d)
	buf.WriteString("\n")
}
