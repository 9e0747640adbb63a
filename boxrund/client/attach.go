package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/coder/websocket"
)

// AttachOptions configure an attach. Zero values are the server's
// defaults: the image's shell (or /bin/bash upstream), 80×24,
// xterm-256color.
type AttachOptions struct {
	Shell string
	Rows  int
	Cols  int
	Term  string
}

// ErrConnectionLost is the error of a session whose connection ended
// without the exit message.
var ErrConnectionLost = errors.New("connection to server lost")

// Session is an interactive terminal session in a box over the attach
// WebSocket (spec §5.4): Read returns the terminal's output, Write sends
// keystrokes, Resize the window size; Wait returns the shell's exit code.
type Session struct {
	conn   *websocket.Conn
	ctx    context.Context
	cancel context.CancelFunc
	out    *io.PipeReader
	done   chan struct{}

	mu   sync.Mutex
	code int
	err  error
}

// Attach starts a shell on a terminal in a running box. The server
// reports a box that is missing or not running after the upgrade, as its
// first message: Read then ends at once and Wait returns the *Error. A
// server without the route answers the upgrade with an *Error here.
func (c *Client) Attach(ctx context.Context, box string, opts AttachOptions) (*Session, error) {
	q := url.Values{}
	if opts.Shell != "" {
		q.Set("shell", opts.Shell)
	}
	if opts.Rows > 0 {
		q.Set("rows", strconv.Itoa(opts.Rows))
	}
	if opts.Cols > 0 {
		q.Set("cols", strconv.Itoa(opts.Cols))
	}
	if opts.Term != "" {
		q.Set("term", opts.Term)
	}
	u := "ws" + c.base[len("http"):] + "/v1/boxes/" + seg(box) + "/attach"
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	h := http.Header{}
	if c.token != "" {
		h.Set("Authorization", "Bearer "+c.token)
	}
	// The session's context, not the caller's dial deadline, is the
	// connection's: the dial context would end it.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel) // the caller's cancel still aborts the dial
	conn, res, err := websocket.Dial(sctx, u, &websocket.DialOptions{
		HTTPClient:      c.http,
		HTTPHeader:      h,
		CompressionMode: websocket.CompressionDisabled,
	})
	stop()
	if err != nil {
		cancel()
		if res != nil && res.StatusCode >= 400 {
			b, _ := io.ReadAll(res.Body)
			return nil, errorFrom(res.StatusCode, b)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("attach %s: %w", box, err)
	}
	conn.SetReadLimit(16 << 20)
	pr, pw := io.Pipe()
	s := &Session{conn: conn, ctx: sctx, cancel: cancel, out: pr, done: make(chan struct{})}
	go s.read(pw)
	return s, nil
}

type controlMessage struct {
	Type    string `json:"type"`
	Code    any    `json:"code"` // exit: a number; error: a string
	Message string `json:"message"`
}

func codeOr(v any) errdefs.Code {
	if s, ok := v.(string); ok && s != "" {
		return errdefs.Code(s)
	}
	return errdefs.RuntimeError
}

// read pumps the server's messages: binary ones to the output pipe, text
// ones are control (exit, error; others are ignored).
func (s *Session) read(pw *io.PipeWriter) {
	finish := func(code int, err error, status websocket.StatusCode) {
		s.mu.Lock()
		s.code, s.err = code, err
		s.mu.Unlock()
		pw.Close() // Read sees io.EOF; Wait tells how it ended
		close(s.done)
		if status != 0 {
			s.conn.Close(status, "")
		} else {
			s.conn.CloseNow()
		}
	}
	for {
		typ, data, err := s.conn.Read(s.ctx)
		if err != nil {
			finish(-1, fmt.Errorf("%w: %w", ErrConnectionLost, err), 0)
			return
		}
		switch typ {
		case websocket.MessageBinary:
			if _, err := pw.Write(data); err != nil {
				// Whoever reads the output closed the session.
				finish(-1, fmt.Errorf("%w: session closed", ErrConnectionLost), 0)
				return
			}
		case websocket.MessageText:
			var m controlMessage
			if json.Unmarshal(data, &m) != nil {
				continue
			}
			switch m.Type {
			case "exit":
				code := -1
				if f, ok := m.Code.(float64); ok {
					code = int(f)
				}
				finish(code, nil, websocket.StatusNormalClosure)
				return
			case "error":
				finish(-1, &Error{Status: http.StatusBadRequest, Code: codeOr(m.Code), Message: m.Message}, websocket.StatusNormalClosure)
				return
			}
		}
	}
}

// Read reads the terminal's output. It returns io.EOF when the session
// ended (see Wait for how).
func (s *Session) Read(p []byte) (int, error) { return s.out.Read(p) }

// Write sends keystrokes (terminal input).
func (s *Session) Write(p []byte) (int, error) {
	if err := s.conn.Write(s.ctx, websocket.MessageBinary, p); err != nil {
		return 0, fmt.Errorf("%w: %w", ErrConnectionLost, err)
	}
	return len(p), nil
}

// Resize tells the server the terminal's new size.
func (s *Session) Resize(rows, cols int) error {
	b, _ := json.Marshal(map[string]any{"type": "resize", "rows": rows, "cols": cols})
	return s.conn.Write(s.ctx, websocket.MessageText, b)
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Wait waits for the end of the session and returns the shell's exit
// code, or the error that ended it: an *Error the server sent, or one
// wrapping ErrConnectionLost.
func (s *Session) Wait() (int, error) {
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.code, s.err
}

// Close ends the session: the server kills the shell (the box goes on).
func (s *Session) Close() error {
	err := s.conn.Close(websocket.StatusNormalClosure, "detached")
	s.cancel()
	s.out.Close()
	<-s.done
	return err
}
