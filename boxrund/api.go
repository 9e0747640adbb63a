// Package boxrund serves a boxrun Engine over the BoxRun REST API, so that
// the BoxRun Python SDK, curl and any HTTP client written for the BoxRun
// server drive boxes without a change (contract: spec/boxrun-api.md).
//
// [New] is an http.Handler over an Engine the caller already has; [Listen]
// and [Server] serve it on a Unix socket and TCP; [Main] is the boxrund
// command. The handler holds no engine logic: it turns JSON into engine
// calls, engine errors into status codes and exec events into SSE.
package boxrund

import (
	"bufio"
	"context"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/errdefs"
)

// Version is reported by /v1/info.
var Version = "dev"

// Options configure the handler.
type Options struct {
	// KeepAlive is the idle interval between SSE keep-alive comments;
	// default 15 s.
	KeepAlive time.Duration
	// SpoolDir holds an upload whose file part arrives before its
	// destination (rare: clients send the destination first); default the
	// system's temp dir. At most 64 MiB is held there.
	SpoolDir string
	// UploadIdle bounds the pause between two reads of an upload's body:
	// a slow upload may take as long as it needs, a stalled one is
	// dropped; default 60 s.
	UploadIdle time.Duration
	// Logger receives one line per request; default discards.
	Logger *slog.Logger
}

// API is the BoxRun REST API over an Engine.
type API struct {
	eng     *boxrun.Engine
	opts    Options
	log     *slog.Logger
	mux     *http.ServeMux
	closing chan struct{} // closed by Shutdown: open streams end
}

// New returns the API over eng.
func New(eng *boxrun.Engine, opts Options) *API {
	if opts.KeepAlive <= 0 {
		opts.KeepAlive = 15 * time.Second
	}
	if opts.UploadIdle <= 0 {
		opts.UploadIdle = 60 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	a := &API{eng: eng, opts: opts, log: opts.Logger, mux: http.NewServeMux(), closing: make(chan struct{})}
	a.routes()
	return a
}

// Shutdown ends open event streams (each ends as if the client had left;
// the execs go on). Call it before http.Server.Shutdown, which waits for
// handlers.
func (a *API) Shutdown() {
	select {
	case <-a.closing:
	default:
		close(a.closing)
	}
}

type route map[string]func(http.ResponseWriter, *http.Request) error

// routes registers each path once with every method it answers; any other
// method is 405, any other path 404, both as JSON.
func (a *API) routes() {
	handle := func(pattern string, r route) {
		a.mux.Handle(pattern, r)
	}
	handle("/{$}", route{"GET": a.root})
	handle("/ui", route{"GET": a.ui})
	a.uiRoutes(handle)
	handle("/v1/info", route{"GET": a.info})
	handle("/v1/boxes", route{"GET": a.listBoxes, "POST": a.createBox})
	handle("/v1/boxes/{seg}", route{"GET": a.getBox, "DELETE": a.removeBox, "POST": a.boxAction})
	handle("/v1/boxes/{box}/exec", route{"POST": a.startExec})
	handle("/v1/boxes/{box}/execs", route{"GET": a.listExecs})
	handle("/v1/boxes/{box}/exec/{seg}", route{"GET": a.getExec, "POST": a.execAction})
	handle("/v1/boxes/{box}/exec/{id}/events", route{"GET": a.events})
	handle("/v1/boxes/{box}/files/upload", route{"POST": a.upload})
	handle("/v1/boxes/{box}/attach", route{"GET": a.attach})
	handle("/v1/boxes/{box}/files/download", route{"POST": a.download})
	handle("/v1/run", route{"POST": a.run})
	handle("/v1/gc", route{"POST": a.gc})
	handle("/v1/images/pull", route{"POST": a.pull})
	handle("/", route{}) // everything else: 404
}

func (rt route) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if len(rt) == 0 {
		writeError(w, newError(http.StatusNotFound, "NOT_FOUND", "no route for %s %s", r.Method, r.URL.Path))
		return
	}
	h := rt[r.Method]
	if h == nil && r.Method == http.MethodHead {
		h = rt["GET"]
	}
	if h == nil {
		var allow []string
		for m := range rt {
			allow = append(allow, m)
		}
		w.Header().Set("Allow", strings.Join(allow, ", "))
		writeError(w, newError(http.StatusMethodNotAllowed, "METHOD_NOT_ALLOWED", "%s is not allowed on %s", r.Method, r.URL.Path))
		return
	}
	if err := h(w, r); err != nil {
		writeError(w, err)
	}
}

// ServeHTTP serves the API: one log line per request, and a handler panic
// is an error answer, never a dropped server.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.serve(w, r, nil) }

// guarded is the API behind g: a request g refuses is answered (and logged
// like any other) without reaching a route.
func (a *API) guarded(g *guard) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { a.serve(w, r, g) })
}

func (a *API) serve(w http.ResponseWriter, r *http.Request, g *guard) {
	start := time.Now()
	// A streamed answer leaves a write deadline on its connection; it must
	// not cut the next request on that keep-alive connection short.
	http.NewResponseController(w).SetWriteDeadline(time.Time{})
	rec := &recorder{ResponseWriter: w}
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				a.log.Info("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "dur", time.Since(start), "aborted", true)
				panic(v)
			}
			a.log.Error("handler panic", "method", r.Method, "path", r.URL.Path, "panic", v)
			if rec.status == 0 {
				writeError(rec, errdefs.New(errdefs.RuntimeError, "internal error: %v", v))
			}
		}
		if rec.status == 0 {
			rec.status = http.StatusOK
		}
		a.log.Info("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "dur", time.Since(start))
	}()
	if g != nil {
		if err := g.admit(rec, r); err != nil {
			writeError(rec, err)
			return
		}
	}
	a.mux.ServeHTTP(rec, r)
}

// recorder remembers the status for the log line; Unwrap lets
// http.ResponseController reach the connection (flush, deadlines, hijack).
type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(p)
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// Hijack hands the connection over (WebSocket attach); logged as 101.
func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err == nil && r.status == 0 {
		r.status = http.StatusSwitchingProtocols
	}
	return c, rw, err
}

// lastColon splits "id:verb" at the last colon (POST verbs).
func lastColon(seg string) (id, verb string, ok bool) {
	i := strings.LastIndexByte(seg, ':')
	if i < 0 {
		return seg, "", false
	}
	return seg[:i], seg[i+1:], true
}

// firstColon is the id part of a GET or DELETE segment: upstream takes
// everything before the first colon ("GET /v1/boxes/x:stop" gets x).
func firstColon(seg string) string {
	id, _, _ := strings.Cut(seg, ":")
	return id
}

func (a *API) root(w http.ResponseWriter, r *http.Request) error {
	http.Redirect(w, r, "/ui", http.StatusSeeOther)
	return nil
}

func (a *API) info(w http.ResponseWriter, r *http.Request) error {
	in := a.eng.Info()
	writeJSON(w, http.StatusOK, infoJSON{
		MaxCPU: in.MaxCPU, MaxMemoryMB: in.MaxMemoryMB, UsedCPU: in.UsedCPU, UsedMemoryMB: in.UsedMemoryMB,
		RunningBoxes: in.Boxes, Hypervisor: in.Hypervisor, Version: Version,
		HypervisorVersion: in.HypervisorVersion, Acceleration: in.Acceleration,
		Boots: bootsJSON{Cold: in.Boots.Cold, Warm: in.Boots.Warm, Pooled: in.Boots.Pooled,
			Templates: in.Boots.Templates, Fallbacks: in.Boots.Fallbacks,
			Premounted: in.Boots.Premounted, ImageTemplates: in.Boots.ImageTemplates},
		PoolReady: in.PoolVMs,
	})
	return nil
}

// requestContext is the request's context, also ended by Shutdown.
func (a *API) requestContext(r *http.Request) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(r.Context())
	go func() {
		select {
		case <-a.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}
