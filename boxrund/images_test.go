package boxrund

import (
	"bufio"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// pullEvents posts a pull and reads its SSE answer to the end.
func pullEvents(t *testing.T, c *client, body string) (types []string, last map[string]any, progress int) {
	t.Helper()
	res, err := c.http.Do(c.req(t, "POST", "/v1/images/pull", "application/json", strings.NewReader(body)))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("pull: %d %s", res.StatusCode, res.Header.Get("Content-Type"))
	}
	sc := bufio.NewScanner(res.Body)
	typ := ""
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			typ = strings.TrimPrefix(line, "event: ")
			types = append(types, typ)
		case strings.HasPrefix(line, "data: "):
			last = nil
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &last); err != nil {
				t.Fatalf("pull event data %q", line)
			}
			if typ == "progress" {
				progress++
				for _, k := range []string{"layer", "event", "offset", "total"} {
					if _, ok := last[k]; !ok {
						t.Errorf("progress event without %s: %v", k, last)
					}
				}
			}
		}
	}
	return types, last, progress
}

// TestPull: the pull route streams a fresh image's progress and ends with
// done; an image already present is done at once; a bad reference ends
// with an error event; bad input is a JSON error before any stream.
func TestPull(t *testing.T) {
	c := fx.clients["unix"]
	// A tag not pulled by any other test: its layers are fetched now.
	ref := "docker://" + strings.Replace(fx.image, "busybox:latest", "busybox:pull-test", 1)
	if err := pushTag(t, "library/busybox:pull-test"); err != nil {
		t.Fatal(err)
	}
	types, last, progress := pullEvents(t, c, `{"image":`+quote(ref)+`}`)
	if types[len(types)-1] != "done" || last["image"] != ref || last["id"] == "" {
		t.Fatalf("pull ended with %v %v", types, last)
	}
	if progress == 0 {
		t.Errorf("no progress events for a fresh pull: %v", types)
	}
	types, last, _ = pullEvents(t, c, `{"image":`+quote(ref)+`}`)
	if len(types) != 1 || types[0] != "done" {
		t.Errorf("second pull of a present image: %v %v", types, last)
	}
	types, last, _ = pullEvents(t, fx.clients["tcp"], `{"image":"docker://127.0.0.1:1/nothing:here"}`)
	if types[len(types)-1] != "error" || last["code"] != "IMAGE_PULL_FAILED" || last["message"] == "" {
		t.Errorf("failed pull: %v %v", types, last)
	}
	c.do(t, "POST", "/v1/images/pull", `{}`).wantError(t, 422, "VALIDATION_ERROR", "image is required")
	c.do(t, "POST", "/v1/images/pull", `{"image":5}`).wantError(t, 422, "VALIDATION_ERROR", "image must be a string")
	c.do(t, "GET", "/v1/images/pull", ``).wantError(t, 405, "METHOD_NOT_ALLOWED", "GET")
}

// pushTag pushes busybox to the test registry under another name.
func pushTag(t *testing.T, repoTag string) error {
	_, err := fx.reg.PushLayout(ctxT(t, time.Minute), fx.layout, repoTag)
	return err
}
