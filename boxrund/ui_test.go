package boxrund

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/fetch"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
)

// TestUIAssets: the page and its files are served from the binary, with
// their types, revalidation and the page's security headers.
func TestUIAssets(t *testing.T) {
	c := fx.clients["tcp"]
	r := c.do(t, "GET", "/ui", "").want(t, 200)
	if ct := r.header.Get("Content-Type"); ct != "text/html; charset=utf-8" {
		t.Errorf("/ui Content-Type %q", ct)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-cache" {
		t.Errorf("/ui Cache-Control %q", cc)
	}
	if csp := r.header.Get("Content-Security-Policy"); !strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "script-src 'self'") {
		t.Errorf("/ui Content-Security-Policy %q", csp)
	}
	if !strings.Contains(string(r.body), `src="/ui/app.js"`) {
		t.Errorf("/ui does not load /ui/app.js:\n%s", r.body)
	}
	for file, ct := range map[string]string{
		"app.js": "text/javascript", "app.css": "text/css", "vendor/xterm.mjs": "text/javascript",
		"vendor/addon-fit.mjs": "text/javascript", "vendor/xterm.css": "text/css", "vendor/LICENSE.xterm": "text/plain",
	} {
		r := c.do(t, "GET", "/ui/"+file, "")
		if r.status == 404 {
			t.Fatalf("GET /ui/%s: 404 (%s): is API.uiRoutes called from routes()?", file, r.body)
		}
		r.want(t, 200)
		if got := r.header.Get("Content-Type"); !strings.HasPrefix(got, ct) {
			t.Errorf("/ui/%s Content-Type %q, want %s", file, got, ct)
		}
		etag := r.header.Get("ETag")
		req := c.req(t, "GET", "/ui/"+file, "", nil)
		req.Header.Set("If-None-Match", etag)
		if r := c.send(t, req); etag == "" || r.status != http.StatusNotModified {
			t.Errorf("/ui/%s with If-None-Match %s: %d", file, etag, r.status)
		}
	}
	c.do(t, "GET", "/ui/nope.js", "").wantError(t, 404, "NOT_FOUND", "/ui/nope.js")
	c.do(t, "GET", "/ui/../v1/info", "").want(t, 200) // cleaned by the mux: not a way out of ui/
	c.do(t, "POST", "/ui/app.js", "").wantError(t, 405, "METHOD_NOT_ALLOWED", "POST")
	noFollow := &http.Client{Transport: c.http.Transport, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	if r, err := noFollow.Get(c.base + "/ui/"); err != nil {
		t.Error(err)
	} else if r.Body.Close(); r.StatusCode != http.StatusSeeOther || r.Header.Get("Location") != "/ui" {
		t.Errorf("/ui/: %d to %q, want 303 to /ui", r.StatusCode, r.Header.Get("Location"))
	}
}

// TestUIBrowser drives the dashboard in headless Chromium against the real
// server: a box created through the API appears with its status, image and
// size beside the host's totals; its execs' output arrives over SSE; the
// terminal runs a command over the attach WebSocket; stop from the page
// stops the box; an error answer shows its message; remove from the page
// removes it; a server that goes away is shown and the page recovers when
// it returns. Assertions are on the page's content; a screenshot is kept
// as an artifact.
func TestUIBrowser(t *testing.T) {
	c := fx.clients["tcp"]
	if r := c.do(t, "GET", "/ui/app.js", ""); r.status != 200 {
		t.Fatalf("GET /ui/app.js: %d %s: is API.uiRoutes called from routes()?", r.status, r.body)
	}
	ctx := browser(t)
	box := newBox(t, c, boxBody(`"name":"web-demo"`))
	id := box["id"].(string)
	xid := startExec(t, c, id, `echo "hello from the dashboard"; uname -m; echo "a warning" >&2; exit 3`)
	c.waitExec(t, xid)

	base := "http://" + fx.srv.TCPAddr()
	row := `tr[data-box="` + id + `"]`
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/ui")); err != nil {
		t.Fatal(err)
	}
	page := &pageT{t: t, ctx: ctx}
	page.wait("the box's status", text(row+" .badge"), is("running"), time.Minute)
	if got := page.eval(text(row + " .image")); got != "docker://"+fx.image {
		t.Errorf("image cell %q, want docker://%s", got, fx.image)
	}
	if got := page.eval(text(row + " .label")); got != "web-demo" {
		t.Errorf("name cell %q", got)
	}
	if got := page.eval(`[...document.querySelectorAll('` + row + ` td.num')].map(e => e.textContent).join(' | ')`); got != "1 | 256 MiB" {
		t.Errorf("CPU and memory cells %q, want 1 | 256 MiB", got)
	}
	if got := page.eval(text(row + " time")); !strings.HasSuffix(got, "s") && !strings.HasSuffix(got, "m") {
		t.Errorf("age cell %q", got)
	}
	in := fx.eng.Info()
	for sel, want := range map[string]string{
		"#cpu-max": strconv.Itoa(in.MaxCPU), "#mem-max": fmtMiB(in.MaxMemoryMB), "#hypervisor": in.Hypervisor, "#version": Version,
	} {
		if got := page.eval(text(sel)); got != want {
			t.Errorf("%s shows %q, want %q", sel, got, want)
		}
	}
	page.wait("running boxes", text("#running"), func(s string) bool { n, _ := strconv.Atoi(s); return n >= 1 }, 10*time.Second)
	page.wait("CPU in use", text("#cpu-used"), func(s string) bool { n, _ := strconv.Atoi(s); return n >= 1 }, 10*time.Second)

	// The execs: the newest one's output is shown when the row opens.
	page.click(row + ` button[data-action="execs"]`)
	detail := `tr[data-box-detail="` + id + `"]`
	page.wait("the exec's output", text(detail+" pre"), contains("hello from the dashboard\n", "a warning\n"), 30*time.Second)
	page.wait("the exec's end", text(detail+" .output-head .state"), is("exited with code 3"), 10*time.Second)
	if got := page.eval(text(detail + " pre .stderr")); got != "a warning\n" {
		t.Errorf("stderr shown as %q", got)
	}
	page.wait("the exec's status", text(detail+` tr[data-exec="`+xid+`"] .badge`), is("failed"), 10*time.Second)
	// A new exec appears by itself, and its output streams while it runs.
	live := startExec(t, c, id, `for i in 1 2 3 4 5 6; do echo "tick $i"; sleep 0.5; done`)
	page.click(detail + ` tr[data-exec="` + live + `"] button[data-action="output"]`)
	page.wait("live output", text(detail+" pre"), contains("tick 1\n"), 20*time.Second)
	page.wait("the live exec's end", text(detail+" .output-head .state"), is("exited with code 0"), 20*time.Second)
	if got := page.eval(text(detail + " pre")); got != "tick 1\ntick 2\ntick 3\ntick 4\ntick 5\ntick 6\n" {
		t.Errorf("live output %q", got)
	}

	// The terminal, over the attach WebSocket.
	if r := c.do(t, "GET", "/v1/boxes/"+id+"/attach", ""); r.status == 404 && strings.Contains(string(r.body), "no route") {
		t.Log("GET /v1/boxes/{box}/attach is not served: the terminal is not tested")
	} else {
		// The terminal's rows, one a line.
		screen := `[...document.querySelectorAll('#term .xterm-rows > div')].map(d => d.textContent.trimEnd()).join('\n')`
		page.click(row + ` button[data-action="terminal"]`)
		page.wait("the terminal", `document.querySelector('#term-state').dataset.state || ''`, is("connected"), 30*time.Second)
		page.wait("a prompt", screen, func(s string) bool { return strings.TrimSpace(s) != "" }, 20*time.Second)
		page.keys("echo $((6*7))-from-xterm\r")
		page.wait("the command's output", screen, contains("42-from-xterm"), 20*time.Second)
		page.keys("stty size\r")
		page.wait("stty size", screen, func(s string) bool { return sttyLine(s) != "" }, 20*time.Second)
		got, want := sttyLine(page.eval(screen)), page.eval(`document.querySelector('#term-screen').dataset.size || ''`)
		if got != want || want == "" {
			t.Errorf("stty size in the page's terminal %q, the terminal is %q", got, want)
		}
	}
	shot := page.screenshot("dashboard.png")

	if page.eval(`document.querySelector('#term').hidden ? 'hidden' : 'shown'`) == "shown" {
		page.keys("exit 7\r")
		page.wait("the shell's exit", text("#term-state"), is("Exited with code 7"), 20*time.Second)
		page.click("#term-close")
	}

	// Stop from the page.
	page.click(row + ` button[data-action="stop"]`)
	page.wait("the stopped status", text(row+" .badge"), is("stopped"), 2*time.Minute)
	if got := c.do(t, "GET", "/v1/boxes/"+id, "").want(t, 200).object(t)["status"]; got != "stopped" {
		t.Errorf("after stop from the page the API says %v", got)
	}
	if got := page.eval(text(row + ` button[data-action="start"]`)); got != "Start" {
		t.Errorf("the stopped box's power button says %q", got)
	}
	if page.eval(`String(document.querySelector('`+row+` button[data-action="terminal"]').disabled)`) != "true" {
		t.Error("the terminal button of a stopped box is enabled")
	}

	// An error answer shows its message (the start is answered by the
	// browser here: a real start would take a VM boot).
	page.failNext(`*/v1/boxes/`+id+`:start`, 409, `{"code":"RESOURCE_EXCEEDED","message":"not enough CPU left for web-demo"}`)
	page.click(row + ` button[data-action="start"]`)
	page.wait("the error message", text("#toasts"), contains("[RESOURCE_EXCEEDED] not enough CPU left for web-demo"), 10*time.Second)

	// Remove from the page: a second click confirms.
	page.click(row + ` button[data-action="remove"]`)
	page.wait("the confirmation", text(row+` button[data-action="remove"]`), is("Confirm remove"), 5*time.Second)
	page.click(row + ` button[data-action="remove"]`)
	page.wait("the removed row", `String(document.querySelectorAll('`+row+`').length)`, is("0"), time.Minute)
	c.do(t, "GET", "/v1/boxes/"+id, "").want(t, 404)
	page.checkClean()

	t.Run("ServerGone", func(t *testing.T) {
		page := &pageT{t: t, ctx: ctx}
		port := freePort()
		stop := serveAPI(t, port)
		if err := chromedp.Do(ctx, chromedp.Navigate(fmt.Sprintf("http://127.0.0.1:%d/ui", port))); err != nil {
			t.Fatal(err)
		}
		page.wait("the connection", `document.querySelector('#conn').dataset.state`, is("live"), 20*time.Second)
		stop()
		page.wait("the unreachable banner", `document.querySelector('#offline').hidden ? '' : document.querySelector('#offline').textContent`,
			contains("Server unreachable, retrying."), 20*time.Second)
		if got := page.eval(text("#conn-text")); got != "Server unreachable" {
			t.Errorf("connection state %q", got)
		}
		page.screenshot("dashboard-unreachable.png")
		serveAPI(t, port)
		page.wait("the recovery", `document.querySelector('#conn').dataset.state`, is("live"), 20*time.Second)
		if page.eval(`String(document.querySelector('#offline').hidden)`) != "true" {
			t.Error("the unreachable banner stays after the server came back")
		}
		page.checkClean()
	})
	t.Logf("screenshot: %s", shot)
}

// serveAPI serves a second API over the engine on port until the test ends
// or stop is called.
func serveAPI(t *testing.T, port int) (stop func()) {
	t.Helper()
	var srv *Server
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if srv, err = Listen(New(fx.eng, Options{}), ListenConfig{Port: port}); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, 2*time.Second) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func fmtMiB(mb int) string {
	if mb >= 1024 {
		if mb%1024 == 0 {
			return strconv.Itoa(mb/1024) + " GiB"
		}
		return fmt.Sprintf("%.1f GiB", float64(mb)/1024)
	}
	return strconv.Itoa(mb) + " MiB"
}

// sttyLine finds the answer of stty size ("ROWS COLS") in the terminal.
func sttyLine(screen string) string {
	_, after, ok := strings.Cut(screen, "stty size")
	if !ok {
		return ""
	}
	for f := strings.Fields(after); len(f) >= 2; f = f[1:] {
		if _, err := strconv.Atoi(f[0]); err == nil {
			if _, err := strconv.Atoi(f[1]); err == nil {
				return f[0] + " " + f[1]
			}
		}
	}
	return ""
}

// browser starts headless Chromium for the test (skipped without one) and
// returns its tab's context; everything ends with the test.
func browser(t *testing.T) context.Context {
	t.Helper()
	var path string
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		t.Skip("no chromium binary found (scripts/setup.sh installs Debian's chromium): the dashboard is not tested in a browser")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.NoSandbox, // tests run as root
		chromedp.DisableGPU,
		chromedp.WindowSize(1280, 900),
		chromedp.Flag("lang", "en-US"),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, cancel := chromedp.NewContext(actx, chromedp.WithErrorf(t.Logf))
	ctx, cancelTimeout := context.WithTimeout(bctx, 5*time.Minute)
	t.Cleanup(func() {
		// Closed gracefully, the browser ends its helper processes too.
		if err := chromedp.Cancel(bctx); err != nil {
			t.Logf("close chromium: %v", err)
		}
		cancelTimeout()
		cancel()
		cancelAlloc() // waits for the browser to exit
	})
	// Record what the page would only say on its console: uncaught
	// exceptions, console errors, blocked content (CSP).
	exceptions := chromedp.Events(ctx, runtime.ExceptionThrown)
	console := chromedp.Events(ctx, runtime.ConsoleAPICalled)
	go func() {
		for ev, err := range exceptions {
			if err != nil {
				return
			}
			d := ev.ExceptionDetails
			msg := d.Text
			if d.Exception != nil {
				msg += " " + d.Exception.Description
			}
			pageErrors.add(fmt.Sprintf("uncaught exception at %s:%d: %s", d.URL, d.LineNumber+1, msg))
		}
	}()
	go func() {
		for ev, err := range console {
			if err != nil {
				return
			}
			if ev.Type == runtime.ConsoleAPICalledTypeError {
				var parts []string
				for _, a := range ev.Args {
					parts = append(parts, a.Description+string(a.Value))
				}
				pageErrors.add("console.error: " + strings.Join(parts, " "))
			}
		}
	}()
	if _, err := chromedp.Call(ctx, page.AddScriptToEvaluateOnNewDocument, page.AddScriptToEvaluateOnNewDocumentParams{
		Source: `window.__violations = [];
document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));`,
	}); err != nil {
		t.Fatalf("chromium (%s): %v", path, err)
	}
	return ctx
}

// pageErrors are what the browser reported since the last checkClean.
var pageErrors errorList

type errorList struct {
	sync.Mutex
	list []string
}

func (p *errorList) add(s string) {
	p.Lock()
	p.list = append(p.list, s)
	p.Unlock()
}

// pageT is the dashboard in the browser, for one test.
type pageT struct {
	t   *testing.T
	ctx context.Context
}

// text is a JavaScript expression for the text of the first element that
// sel matches ("" if none).
func text(sel string) string {
	return `(document.querySelector(` + strconv.Quote(sel) + `)?.textContent ?? '')`
}

func is(want string) func(string) bool { return func(s string) bool { return s == want } }

func contains(want ...string) func(string) bool {
	return func(s string) bool {
		for _, w := range want {
			if !strings.Contains(s, w) {
				return false
			}
		}
		return true
	}
}

func (p *pageT) eval(expr string) string {
	p.t.Helper()
	s, err := chromedp.Run(p.ctx, chromedp.Evaluate[string](expr))
	if err != nil {
		p.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return s
}

// wait polls a JavaScript expression until ok accepts its value.
func (p *pageT) wait(what, expr string, ok func(string) bool, d time.Duration) string {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for {
		s, err := chromedp.Run(p.ctx, chromedp.Evaluate[string](expr))
		if err == nil && ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			p.screenshot("failed-" + strings.ReplaceAll(p.t.Name(), "/", "-") + ".png")
			p.t.Fatalf("%s: after %v the page shows %q (%v)", what, d, s, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (p *pageT) click(sel string) {
	p.t.Helper()
	p.wait("enabled "+sel, `(() => { const e = document.querySelector(`+strconv.Quote(sel)+`); return e && !e.disabled ? 'yes' : '' })()`, is("yes"), 20*time.Second)
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(sel))); err != nil {
		p.t.Fatalf("click %s: %v", sel, err)
	}
}

// keys types into the focused element as a keyboard does: one keyDown
// that carries the text, then keyUp (chromedp.KeyEvent sends the text in
// a separate char event, which xterm.js takes as a second keystroke).
func (p *pageT) keys(s string) {
	p.t.Helper()
	err := chromedp.Do(p.ctx, chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		for _, r := range s {
			var down *input.DispatchKeyEventParams
			for _, ev := range kb.Encode(r) {
				switch ev.Type {
				case input.DispatchKeyEventTypeKeyDown:
					down = ev
					continue
				case input.DispatchKeyEventTypeChar:
					down.Text, down.UnmodifiedText = ev.Text, ev.UnmodifiedText
					continue
				}
				if down != nil {
					if _, err := cdp.Call(ctx, t, input.DispatchKeyEvent, *down); err != nil {
						return err
					}
					down = nil
				}
				if _, err := cdp.Call(ctx, t, input.DispatchKeyEvent, *ev); err != nil {
					return err
				}
			}
		}
		return nil
	}))
	if err != nil {
		p.t.Fatalf("type %q: %v", s, err)
	}
}

// failNext answers the next request matching pattern with status and body
// (JSON), in the browser.
func (p *pageT) failNext(pattern string, status int, body string) {
	p.t.Helper()
	paused := chromedp.Events(p.ctx, fetch.RequestPaused)
	if _, err := chromedp.Call(p.ctx, fetch.Enable, fetch.EnableParams{Patterns: []*fetch.RequestPattern{{URLPattern: pattern}}}); err != nil {
		p.t.Fatal(err)
	}
	go func() {
		for ev, err := range paused {
			if err != nil {
				return
			}
			chromedp.Call(p.ctx, fetch.FulfillRequest, fetch.FulfillRequestParams{
				RequestID: ev.RequestID, ResponseCode: int64(status), Body: []byte(body),
				ResponseHeaders: []*fetch.HeaderEntry{{Name: "Content-Type", Value: "application/json"}},
			})
			chromedp.Call(p.ctx, fetch.Disable, struct{}{})
			return
		}
	}()
}

// screenshot keeps the page as name in $BOXRUN_ARTIFACTS, else in the
// test's temporary directory, and returns the path.
func (p *pageT) screenshot(name string) string {
	p.t.Helper()
	buf, err := chromedp.Run(p.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Errorf("screenshot: %v", err)
		return ""
	}
	dir := os.Getenv("BOXRUN_ARTIFACTS")
	if dir == "" {
		dir = p.t.TempDir()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		p.t.Errorf("artifacts: %v", err)
		return ""
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		p.t.Errorf("screenshot: %v", err)
		return ""
	}
	p.t.Logf("screenshot %s", path)
	return path
}

// checkClean fails the test on an uncaught exception, a console error or
// content that the page's security policy blocked.
func (p *pageT) checkClean() {
	p.t.Helper()
	if v := p.eval(`(window.__violations || []).join('\n')`); v != "" {
		p.t.Errorf("content security policy violations:\n%s", v)
	}
	pageErrors.Lock()
	defer pageErrors.Unlock()
	for _, e := range pageErrors.list {
		p.t.Errorf("page: %s", e)
	}
	pageErrors.list = nil
}
