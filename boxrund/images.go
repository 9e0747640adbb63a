package boxrund

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/image"
)

type pullRequest struct {
	Image *string `json:"image"`
}

// pullEvent is the data of a "progress" event of POST /v1/images/pull.
type pullEvent struct {
	Layer  string `json:"layer"`
	Event  string `json:"event"` // start, progress, done, skipped
	Offset int64  `json:"offset"`
	Total  int64  `json:"total"`
}

// pull serves POST /v1/images/pull (beyond upstream): it pulls an image
// and streams its progress as SSE, so a client can show a progress bar
// before it creates a box: "progress" events, then one "done" {image, id}
// or "error" {code, message}. An image already present answers "done" at
// once. A client that leaves cancels the pull.
func (a *API) pull(w http.ResponseWriter, r *http.Request) error {
	var req pullRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Image == nil || strings.TrimSpace(*req.Image) == "" {
		return invalid("image is required")
	}
	ctx, cancel := a.requestContext(r)
	defer cancel()
	events := make(chan image.Progress, 64)
	var mu sync.Mutex
	closed := false
	report := func(p image.Progress) {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			return
		}
		if p.Event == "progress" {
			select {
			case events <- p:
			default: // the client is slow: drop an intermediate count
			}
			return
		}
		events <- p // start, done, skipped: always (the reader drains until closed)
	}
	type result struct {
		img *image.Image
		err error
	}
	done := make(chan result, 1)
	go func() {
		img, err := a.eng.Pull(boxrun.WithPullProgress(ctx, report), *req.Image)
		mu.Lock()
		closed = true
		close(events)
		mu.Unlock()
		done <- result{img, err}
	}()
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush()
	var buf bytes.Buffer
	send := func(typ string, v any) bool {
		buf.Reset()
		buf.WriteString("event: " + typ + "\ndata: ")
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		enc.Encode(v)
		buf.WriteString("\n")
		rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		if _, err := w.Write(buf.Bytes()); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	keep := time.NewTicker(a.opts.KeepAlive)
	defer keep.Stop()
	for {
		select {
		case p, ok := <-events:
			if !ok {
				res := <-done
				if res.err != nil {
					e := asAPIError(res.err)
					send("error", map[string]string{"code": e.code, "message": e.message})
					return nil
				}
				send("done", map[string]string{"image": *req.Image, "id": res.img.ID})
				return nil
			}
			if !send("progress", pullEvent{Layer: p.Layer, Event: p.Event, Offset: p.Offset, Total: p.Total}) {
				cancel()
				for range events { // unblock the pull's reports until it ends
				}
				<-done
				return nil
			}
		case <-keep.C:
			rc.SetWriteDeadline(time.Now().Add(writeTimeout))
			if _, err := w.Write([]byte(":\n\n")); err != nil {
				cancel()
				for range events { // unblock the pull's reports until it ends
				}
				<-done
				return nil
			}
			rc.Flush()
		}
	}
}
