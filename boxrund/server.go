package boxrund

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// ListenConfig says where a Server listens. The Unix socket and TCP are
// served at the same time; leave one empty (Socket "") or zero (Port 0) to
// turn it off.
type ListenConfig struct {
	Socket string // Unix socket path, made 0600; a stale one is replaced
	Host   string // TCP host; default 127.0.0.1
	Port   int    // TCP port
	// Token, when set, must come as "Authorization: Bearer <token>" on
	// every TCP request. A Host that is not loopback needs one. The socket
	// is guarded by its file mode instead. Without a token, TCP requests
	// must name a loopback host (or Host) in their Host header, so that a
	// web page rebound to 127.0.0.1 cannot reach the API, and come from
	// the server's own user or root (peer.go: other users of the host
	// reach a loopback port too); with or without, a request with an
	// Origin header from another origin is refused.
	Token string
	// MaxConns is a hard cap on open connections per listener (default
	// 4096): beyond it new ones wait in the kernel's backlog rather than
	// exhaust the server.
	MaxConns int
	// MaxIdle caps the idle keep-alive connections per listener (default
	// 64): past it the longest idle ones are closed, so idle clients never
	// hold the slots that new ones need.
	MaxIdle int
	// HeaderTimeout drops a connection that has not sent a whole request
	// header in time (default 10 s): idle or half-sent requests cannot
	// hold the connection slots.
	HeaderTimeout time.Duration
}

// Server serves an API on its listeners.
type Server struct {
	api      *API
	log      *slog.Logger
	socket   string
	sockIno  uint64
	tcpAddr  string
	servers  []*http.Server
	lns      []net.Listener
	inflight inflight
}

// Listen binds the listeners of cfg. Nothing is served until Serve.
func Listen(api *API, cfg ListenConfig) (*Server, error) {
	if cfg.Socket == "" && cfg.Port == 0 {
		return nil, errdefs.New(errdefs.ValidationError, "nothing to listen on: no socket and no TCP port")
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 4096
	}
	if cfg.MaxIdle <= 0 {
		cfg.MaxIdle = 64
	}
	if cfg.HeaderTimeout <= 0 {
		cfg.HeaderTimeout = 10 * time.Second
	}
	s := &Server{api: api, log: api.log}
	if cfg.Port != 0 {
		if cfg.Token == "" && !isLoopback(cfg.Host) {
			return nil, errdefs.New(errdefs.ValidationError,
				"refusing to serve on %s without a token: anyone who reaches it could run code and read host files; set --token or $BOXRUN_TOKEN", cfg.Host)
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)))
		if err != nil {
			return nil, errdefs.Wrap(errdefs.RuntimeError, err, "listen")
		}
		s.tcpAddr = ln.Addr().String()
		g := &guard{host: cfg.Host}
		var connContext func(context.Context, net.Conn) context.Context
		if cfg.Token != "" {
			g.token = []byte(cfg.Token)
		} else {
			connContext = withPeer // see peer.go
		}
		s.add(limit(ln, cfg.MaxConns), api.guarded(g), cfg, connContext)
	}
	if cfg.Socket != "" {
		ln, ino, err := listenUnix(cfg.Socket)
		if err != nil {
			s.closeListeners()
			return nil, err
		}
		s.socket, s.sockIno = cfg.Socket, ino
		s.add(limit(ln, cfg.MaxConns), api, cfg, nil)
	}
	return s, nil
}

func (s *Server) add(ln net.Listener, h http.Handler, cfg ListenConfig, connContext func(context.Context, net.Conn) context.Context) {
	idle := &idleConns{max: cfg.MaxIdle}
	s.lns = append(s.lns, ln)
	s.servers = append(s.servers, &http.Server{
		ConnContext: connContext,
		Handler:     s.track(h),
		// A client that sends half a request header is dropped; bodies
		// have their own deadlines (JSON) or idle limits (uploads).
		ReadHeaderTimeout: cfg.HeaderTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ConnState:         idle.track,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	})
}

// track counts the handlers in flight, for Serve to wait for.
func (s *Server) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.inflight.add()
		defer s.inflight.done()
		h.ServeHTTP(w, r)
	})
}

// Socket is the Unix socket's path ("" when off).
func (s *Server) Socket() string { return s.socket }

// TCPAddr is the TCP address, host:port ("" when off).
func (s *Server) TCPAddr() string { return s.tcpAddr }

// Serve serves until ctx ends, then stops accepting, ends open event
// streams, waits up to grace for requests in flight, and removes the
// socket. The engine is the caller's to close afterwards.
func (s *Server) Serve(ctx context.Context, grace time.Duration) error {
	errc := make(chan error, len(s.servers))
	for i, srv := range s.servers {
		go func() { errc <- srv.Serve(s.lns[i]) }()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	s.api.Shutdown()
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	var wg sync.WaitGroup
	for _, srv := range s.servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if srv.Shutdown(sctx) != nil {
				srv.Close()
			}
		}()
	}
	wg.Wait()
	// Close does not wait for the handlers of the connections it closed:
	// give them a while more (their requests' contexts are canceled), so
	// that the caller does not close the engine under them.
	select {
	case <-s.inflight.idle():
	case <-time.After(grace):
		s.log.Warn("requests still running after shutdown", "count", s.inflight.count())
	}
	s.removeSocket()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// inflight counts running handlers. (Not a WaitGroup: requests may still
// begin while Serve waits, which a WaitGroup does not allow.)
type inflight struct {
	mu   sync.Mutex
	n    int
	zero chan struct{} // closed when n drops to 0; nil while n is 0
}

func (f *inflight) add() {
	f.mu.Lock()
	if f.n == 0 {
		f.zero = make(chan struct{})
	}
	f.n++
	f.mu.Unlock()
}

func (f *inflight) done() {
	f.mu.Lock()
	if f.n--; f.n == 0 {
		close(f.zero)
		f.zero = nil
	}
	f.mu.Unlock()
}

func (f *inflight) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

// idle is closed when no handler runs.
func (f *inflight) idle() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.zero == nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return f.zero
}

// idleConns closes the longest idle keep-alive connections of a listener
// past max (an http.Server ConnState hook).
type idleConns struct {
	mu    sync.Mutex
	max   int
	conns []net.Conn // idle, longest idle first
}

func (ic *idleConns) track(c net.Conn, st http.ConnState) {
	var victim net.Conn
	ic.mu.Lock()
	if i := slices.Index(ic.conns, c); i >= 0 {
		ic.conns = slices.Delete(ic.conns, i, i+1)
	}
	if st == http.StateIdle {
		ic.conns = append(ic.conns, c)
		if len(ic.conns) > ic.max {
			victim = ic.conns[0]
			ic.conns = slices.Delete(ic.conns, 0, 1)
		}
	}
	ic.mu.Unlock()
	if victim != nil {
		victim.Close() // its server goroutine sees it closed: StateClosed
	}
}

func (s *Server) closeListeners() {
	for _, ln := range s.lns {
		ln.Close()
	}
	s.removeSocket()
}

// removeSocket removes the socket file if it is still ours: the SDK uses
// the socket whenever the file exists, so a dead one must not stay.
func (s *Server) removeSocket() {
	if s.socket == "" {
		return
	}
	var st syscall.Stat_t
	if syscall.Lstat(s.socket, &st) == nil && st.Ino == s.sockIno {
		os.Remove(s.socket)
	}
}

// listenUnix binds a 0600 socket at p: made in a private directory beside
// p and renamed into place, so it is never reachable with a looser mode. A
// stale socket at p (nobody answers on it) is replaced; a live one, or a
// file that is not a socket, is an error.
func listenUnix(p string) (net.Listener, uint64, error) {
	if fi, err := os.Lstat(p); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, 0, errdefs.New(errdefs.ValidationError, "%s exists and is not a socket", p)
		}
		c, err := net.DialTimeout("unix", p, 500*time.Millisecond)
		if err == nil {
			c.Close()
			return nil, 0, errdefs.New(errdefs.RuntimeError, "%s is served by another process", p)
		}
		// Only a refused (or vanished) socket is stale. A timeout or a
		// full backlog is a busy live server: never take its socket.
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
			return nil, 0, errdefs.Wrap(errdefs.RuntimeError, err,
				"%s exists and cannot be probed (another server may be busy on it); not replacing it", p)
		}
		if err := os.Remove(p); err != nil {
			return nil, 0, errdefs.Wrap(errdefs.RuntimeError, err, "remove stale socket")
		}
	}
	dir := filepath.Dir(p)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, 0, errdefs.Wrap(errdefs.RuntimeError, err, "socket dir")
	}
	tmp, err := os.MkdirTemp(dir, ".boxrund-*")
	if err != nil {
		return nil, 0, errdefs.Wrap(errdefs.RuntimeError, err, "socket dir")
	}
	defer os.RemoveAll(tmp)
	tp := filepath.Join(tmp, "s")
	ln, err := net.Listen("unix", tp)
	if err != nil {
		return nil, 0, errdefs.Wrap(errdefs.RuntimeError, err, "listen on %s", p)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // removed by path, if still ours
	var st syscall.Stat_t
	err = os.Chmod(tp, 0o600)
	if err == nil {
		err = os.Rename(tp, p)
	}
	if err == nil {
		err = syscall.Lstat(p, &st)
	}
	if err != nil {
		ln.Close()
		return nil, 0, errdefs.Wrap(errdefs.RuntimeError, err, "socket %s", p)
	}
	return ln, st.Ino, nil
}

func isLoopback(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(strings.Trim(host, "[]"), "."))
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// guard admits the requests of the TCP listener, inside the API's logging:
//   - without a token, the Host header must name a loopback host
//     (localhost, 127.0.0.0/8, [::1], any port) or the configured one: a
//     web page on another name that DNS rebinding points at 127.0.0.1 is
//     refused (403). With a token, the token is the guard;
//   - a request with an Origin header must come from the server's own
//     origin (403): a page elsewhere cannot post to the API (CSRF);
//   - with a token, "Authorization: Bearer <token>" (401 otherwise; the
//     scheme's case does not matter, RFC 9110 §11.1).
type guard struct {
	host  string // the configured TCP host
	token []byte // nil: no token
}

func (g *guard) admit(w http.ResponseWriter, r *http.Request) error {
	if g.token == nil {
		if uid, ok := peerAllowed(r.Context()); !ok {
			who := "an unknown user"
			if uid >= 0 {
				who = fmt.Sprintf("uid %d", uid)
			}
			return newError(http.StatusForbidden, "FORBIDDEN",
				"connection from %s: without a token, the TCP port serves only the server's own user and root (use the socket, or start boxrund with --token)", who)
		}
	}
	if g.token == nil && !g.hostAllowed(r.Host) {
		return newError(http.StatusForbidden, "FORBIDDEN",
			"Host %q is not a loopback address: use http://127.0.0.1:PORT or http://localhost:PORT (a request for another name may come from a web page rebound to this server)", r.Host)
	}
	if o := r.Header.Get("Origin"); o != "" && !sameOrigin(o, r) {
		return newError(http.StatusForbidden, "FORBIDDEN", "cross-origin request from %q refused", o)
	}
	if g.token != nil {
		scheme, got, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare([]byte(got), g.token) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="boxrun"`)
			return newError(http.StatusUnauthorized, "UNAUTHORIZED", "missing or wrong bearer token")
		}
	}
	return nil
}

// hostAllowed reports whether a Host header (host or host:port) names a
// loopback host or the configured one.
func (g *guard) hostAllowed(hostport string) bool {
	h := hostport
	if host, _, err := net.SplitHostPort(hostport); err == nil {
		h = host
	}
	if h == "" {
		return false
	}
	return isLoopback(h) || strings.EqualFold(strings.Trim(h, "[]"), strings.Trim(g.host, "[]"))
}

// sameOrigin reports whether an Origin header is the request's own
// scheme://host (a default port written or not).
func sameOrigin(origin string, r *http.Request) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || u.Path != "" && u.Path != "/" {
		return false
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if !strings.EqualFold(u.Scheme, scheme) {
		return false
	}
	port := map[string]string{"http": ":80", "https": ":443"}[scheme]
	return strings.EqualFold(strings.TrimSuffix(u.Host, port), strings.TrimSuffix(r.Host, port))
}

// limit caps a listener's open connections: Accept waits for a free slot.
func limit(ln net.Listener, n int) net.Listener {
	return &limitListener{Listener: ln, sem: make(chan struct{}, n), done: make(chan struct{})}
}

type limitListener struct {
	net.Listener
	sem       chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitConn{Conn: c, release: func() { <-l.sem }}, nil
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
