package boxrund

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/errdefs"
	"github.com/coder/websocket"
)

// attach serves GET /v1/boxes/{box}/attach (spec §5.4): a terminal into
// the box over a WebSocket. Binary frames carry terminal bytes both ways;
// the client's text frames {"type":"resize","cols":N,"rows":N} resize it;
// the server ends with {"type":"exit","code":N} (or {"type":"error",...})
// and closes. Query: shell (default: the image's shell, /bin/bash else
// /bin/sh — upstream always /bin/bash), cols (80), rows (24), term
// (xterm-256color).
func (a *API) attach(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	size := func(name string, def uint16) (uint16, error) {
		s := q.Get(name)
		if s == "" {
			return def, nil
		}
		n, err := strconv.ParseUint(s, 10, 16)
		if err != nil || n == 0 {
			return 0, badRequest("%s must be an integer from 1 to 65535", name)
		}
		return uint16(n), nil
	}
	cols, err := size("cols", 80)
	if err != nil {
		return err
	}
	rows, err := size("rows", 24)
	if err != nil {
		return err
	}
	spec := boxrun.AttachSpec{Term: q.Get("term"), Rows: rows, Cols: cols}
	if sh := q.Get("shell"); sh != "" {
		spec.Cmd = []string{sh}
	}
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		return nil // Accept answered the client
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)
	// The WebSocket's reads and writes use the request's context alone:
	// coder/websocket drops the connection when their context ends, and a
	// server shutdown must still send the exit frame. Shutdown ends the
	// session instead (below).
	ctx := r.Context()
	fail := func(err error) error {
		e := asAPIError(err)
		a.sendJSON(ctx, conn, map[string]string{"type": "error", "code": e.code, "message": e.message})
		conn.Close(websocket.StatusNormalClosure, "")
		return nil
	}
	box, err := a.eng.Get(ctx, r.PathValue("box"))
	if err != nil {
		return fail(err)
	}
	if box.Status != "running" {
		return fail(errdefs.New(errdefs.BoxNotRunning, "Box is not running"))
	}
	sess, err := a.eng.Attach(ctx, box.ID, spec)
	if err != nil {
		return fail(err)
	}
	defer sess.Close()

	// Terminal output to the client, until the command ends and its output
	// is drained (Read's io.EOF), so every byte goes before the exit frame.
	outDone := make(chan error, 1)
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := sess.Read(buf)
			if n > 0 {
				wctx, wcancel := context.WithTimeout(ctx, writeTimeout)
				werr := conn.Write(wctx, websocket.MessageBinary, buf[:n])
				wcancel()
				if werr != nil {
					outDone <- werr
					return
				}
			}
			if err != nil {
				outDone <- nil // the command ended: its output is drained
				return
			}
		}
	}()
	// Client input and resizes, until the client leaves.
	inDone := make(chan struct{})
	go func() {
		defer close(inDone)
		for {
			typ, data, err := conn.Read(ctx)
			if err != nil {
				return
			}
			switch typ {
			case websocket.MessageBinary:
				if _, err := sess.Write(data); err != nil {
					return
				}
			case websocket.MessageText:
				var msg struct {
					Type string  `json:"type"`
					Cols *uint16 `json:"cols"`
					Rows *uint16 `json:"rows"`
				}
				if json.Unmarshal(data, &msg) != nil || msg.Type != "resize" {
					continue // upstream ignores other text
				}
				c, r := uint16(80), uint16(24)
				if msg.Cols != nil && *msg.Cols > 0 {
					c = *msg.Cols
				}
				if msg.Rows != nil && *msg.Rows > 0 {
					r = *msg.Rows
				}
				sess.Resize(r, c)
			}
		}
	}()
	select {
	case err := <-outDone:
		if err != nil { // the client stopped taking output
			sess.Close()
		}
	case <-inDone: // the client left
		sess.Close()
		<-outDone
	case <-a.closing: // the server is shutting down: end the session, say so
		sess.Close()
		<-outDone
	}
	code, werr := sess.Wait()
	if werr != nil && !errors.Is(werr, context.Canceled) {
		a.log.Debug("attach: session ended", "box", box.ID, "err", werr)
	}
	a.sendJSON(ctx, conn, map[string]any{"type": "exit", "code": code})
	status := websocket.StatusNormalClosure
	select {
	case <-a.closing:
		status = websocket.StatusGoingAway
	default:
	}
	conn.Close(status, "")
	return nil
}

func (a *API) sendJSON(ctx context.Context, conn *websocket.Conn, v any) {
	b, _ := json.Marshal(v)
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	conn.Write(wctx, websocket.MessageText, b)
}
