package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
)

// PullProgress is one progress event of an image pull: a blob (Layer, its
// digest) started ("start"), advanced ("progress", Offset bytes of
// Total), ended ("done") or was already there ("skipped"). Total is -1
// when unknown.
type PullProgress struct {
	Layer  string `json:"layer"`
	Event  string `json:"event"`
	Offset int64  `json:"offset"`
	Total  int64  `json:"total"`
}

// PulledImage is the image a pull ended with.
type PulledImage struct {
	Image string `json:"image"`
	ID    string `json:"id"`
}

// ErrPullUnsupported is returned by Pull when the server has no pull
// route (an older server, or upstream's): its create pulls instead.
var ErrPullUnsupported = errors.New("the server has no image pull route")

// Pull pulls an image into the server's store (POST /v1/images/pull, an
// SSE stream of "progress" events, then "done" or "error") and calls fn,
// when not nil, for each progress event. An image already there is not
// fetched again.
func (c *Client) Pull(ctx context.Context, image string, fn func(PullProgress)) (*PulledImage, error) {
	b, _ := json.Marshal(map[string]string{"image": image})
	req, err := c.request(ctx, "POST", "/v1/images/pull", strings.NewReader(string(b)), "application/json")
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	res, err := c.send(req)
	if err != nil {
		var ae *Error
		// 404 from a server without the route: boxrund's NOT_FOUND, or
		// upstream's empty 404; 405 if some other route matched.
		if errors.As(err, &ae) && (ae.Status == http.StatusNotFound && ae.Code != errdefs.BoxNotFound ||
			ae.Status == http.StatusMethodNotAllowed) {
			return nil, ErrPullUnsupported
		}
		return nil, err
	}
	defer res.Body.Close()
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		// A server that answers the pull at once, as JSON.
		var img PulledImage
		if err := json.NewDecoder(io.LimitReader(res.Body, 1<<20)).Decode(&img); err != nil {
			return nil, fmt.Errorf("pull %s: unexpected answer (%s): %w", image, ct, err)
		}
		return &img, nil
	}
	sse := NewSSEReader(res.Body)
	for {
		m, err := sse.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("pull %s: the stream ended before the pull did: %w", image, err)
		}
		switch m.Event {
		case "progress":
			var p PullProgress
			if json.Unmarshal([]byte(m.Data), &p) == nil && fn != nil {
				fn(p)
			}
		case "done":
			var img PulledImage
			if err := json.Unmarshal([]byte(m.Data), &img); err != nil {
				return nil, fmt.Errorf("pull %s: malformed done event %q", image, m.Data)
			}
			return &img, nil
		case "error":
			return nil, errorFrom(http.StatusBadRequest, []byte(m.Data))
		}
	}
}
