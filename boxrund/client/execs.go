package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Exec is an exec record (spec §3.1).
type Exec struct {
	ID           string            `json:"id"`
	BoxID        string            `json:"box_id"`
	Status       string            `json:"status"` // running, succeeded, failed, canceled
	Cmd          []string          `json:"cmd"`
	Env          map[string]string `json:"env"`
	Workdir      *string           `json:"workdir"`
	TimeoutMS    *int64            `json:"timeout_ms"`
	ExitCode     *int              `json:"exit_code"`
	ErrorMessage *string           `json:"error_message"`
	CreatedAt    string            `json:"created_at"`
	FinishedAt   *string           `json:"finished_at"`
}

// ExecRequest is the body of POST /v1/boxes/{box}/exec. Cmd is argv (no
// shell); Workdir "" is the box's; TimeoutMS 0 is none.
type ExecRequest struct {
	Cmd       []string          `json:"cmd"`
	Env       map[string]string `json:"env,omitempty"`
	Workdir   string            `json:"workdir,omitempty"`
	TimeoutMS int64             `json:"timeout_ms,omitempty"`
}

// StartExec starts a command in a running box and returns at once; follow
// it with Events.
func (c *Client) StartExec(ctx context.Context, box string, req ExecRequest) (*Exec, error) {
	var x Exec
	if err := c.do(ctx, "POST", "/v1/boxes/"+seg(box)+"/exec", req, &x); err != nil {
		return nil, err
	}
	return &x, nil
}

// GetExec gets an exec by id.
func (c *Client) GetExec(ctx context.Context, execID string) (*Exec, error) {
	var x Exec
	if err := c.do(ctx, "GET", "/v1/boxes/-/exec/"+seg(execID), nil, &x); err != nil {
		return nil, err
	}
	return &x, nil
}

// ListExecs lists a box's execs, newest first.
func (c *Client) ListExecs(ctx context.Context, box string) ([]Exec, error) {
	var xs []Exec
	if err := c.do(ctx, "GET", "/v1/boxes/"+seg(box)+"/execs", nil, &xs); err != nil {
		return nil, err
	}
	if xs == nil {
		xs = []Exec{}
	}
	return xs, nil
}

// CancelExec cancels a running exec (EXEC_ALREADY_FINISHED when it is
// not).
func (c *Client) CancelExec(ctx context.Context, execID string) (*Exec, error) {
	var x Exec
	if err := c.do(ctx, "POST", "/v1/boxes/-/exec/"+seg(execID)+":cancel", nil, &x); err != nil {
		return nil, err
	}
	return &x, nil
}

// Event is one event of an exec's stream: output ("log", Stream "stdout"
// or "stderr") or the end ("exit", with Exit).
type Event struct {
	Type   string
	Stream string
	Data   string
	Seq    int
	Exit   *ExitStatus // exit events
}

// ExitStatus is how an exec ended: the data of its exit event.
type ExitStatus struct {
	// ExitCode is nil for a canceled exec; -1 when there was no exit
	// status (killed, runtime error).
	ExitCode *int   `json:"exit_code"`
	Error    string `json:"error,omitempty"`
	Signal   string `json:"signal,omitempty"`
	TimedOut bool   `json:"timed_out,omitempty"`
}

// ErrStreamEnded is the error of an event stream that ended before its
// exit event: the connection to the server was lost.
var ErrStreamEnded = errors.New("event stream ended before the exit event: connection to server lost")

// EventStream reads an exec's events: every event from seq 0, then live
// ones, until the exit event.
type EventStream struct {
	body io.ReadCloser
	sse  *SSEReader
	done bool
}

// Events opens an exec's event stream (404 EXEC_NOT_FOUND as an *Error).
func (c *Client) Events(ctx context.Context, execID string) (*EventStream, error) {
	req, err := c.request(ctx, "GET", "/v1/boxes/-/exec/"+seg(execID)+"/events", nil, "")
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	res, err := c.send(req)
	if err != nil {
		return nil, err
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		res.Body.Close()
		return nil, fmt.Errorf("events of %s: answer is %q, not an event stream", execID, ct)
	}
	return &EventStream{body: res.Body, sse: NewSSEReader(res.Body)}, nil
}

// Next returns the next event. After the exit event it returns io.EOF; a
// stream that ends before it returns ErrStreamEnded.
func (s *EventStream) Next() (Event, error) {
	if s.done {
		return Event{}, io.EOF
	}
	for {
		m, err := s.sse.Next()
		if err != nil {
			s.Close()
			if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
				return Event{}, ErrStreamEnded
			}
			return Event{}, fmt.Errorf("%w: %w", ErrStreamEnded, err)
		}
		ev, err := ParseEvent(m)
		if err != nil {
			s.Close()
			return Event{}, err
		}
		if ev.Type == "exit" {
			s.done = true
		}
		return ev, nil
	}
}

// Close ends the stream.
func (s *EventStream) Close() error {
	s.done = true
	return s.body.Close()
}

// ParseEvent decodes an exec event from its SSE message: the type from
// the event name (or from an "event_type" key), data JSON
// {"stream","data","seq"}; an exit event's data is itself JSON.
func ParseEvent(m SSEMessage) (Event, error) {
	var d struct {
		Stream    *string `json:"stream"`
		Data      string  `json:"data"`
		Seq       int     `json:"seq"`
		EventType string  `json:"event_type"`
	}
	if err := json.Unmarshal([]byte(m.Data), &d); err != nil {
		return Event{}, fmt.Errorf("malformed event data %q: %w", m.Data, err)
	}
	ev := Event{Type: m.Event, Data: d.Data, Seq: d.Seq}
	if ev.Type == "" || ev.Type == "message" {
		ev.Type = d.EventType
	}
	if d.Stream != nil {
		ev.Stream = *d.Stream
	}
	if ev.Type == "exit" {
		ev.Exit = &ExitStatus{}
		if err := json.Unmarshal([]byte(d.Data), ev.Exit); err != nil {
			// Not JSON: take nothing from it but keep the event.
			minus := -1
			ev.Exit = &ExitStatus{ExitCode: &minus, Error: d.Data}
		}
	}
	return ev, nil
}

// Wait follows an exec's events to its end, writing its output to stdout
// and stderr (either may be nil) in the order it was produced, and returns
// how it ended.
func (c *Client) Wait(ctx context.Context, execID string, stdout, stderr io.Writer) (*ExitStatus, error) {
	s, err := c.Events(ctx, execID)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	for {
		ev, err := s.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, err
		}
		switch {
		case ev.Type == "exit":
			return ev.Exit, nil
		case ev.Stream == "stderr" && stderr != nil:
			if _, err := io.WriteString(stderr, ev.Data); err != nil {
				return nil, err
			}
		case ev.Stream != "stderr" && stdout != nil:
			if _, err := io.WriteString(stdout, ev.Data); err != nil {
				return nil, err
			}
		}
	}
}
