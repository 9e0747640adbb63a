package boxrund

import (
	"context"
	"crypto/subtle"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
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
	// is guarded by its file mode instead.
	Token string
	// MaxConns caps open connections per listener (default 512): more
	// wait in the kernel's backlog rather than exhaust the server.
	MaxConns int
	// HeaderTimeout drops a connection that has not sent a whole request
	// header in time (default 10 s): idle or half-sent requests cannot
	// hold the connection slots.
	HeaderTimeout time.Duration
}

// Server serves an API on its listeners.
type Server struct {
	api     *API
	log     *slog.Logger
	socket  string
	sockIno uint64
	tcpAddr string
	servers []*http.Server
	lns     []net.Listener
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
		cfg.MaxConns = 512
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
		var h http.Handler = api
		if cfg.Token != "" {
			h = requireToken(cfg.Token, api)
		}
		s.add(limit(ln, cfg.MaxConns), h, cfg.HeaderTimeout)
	}
	if cfg.Socket != "" {
		ln, ino, err := listenUnix(cfg.Socket)
		if err != nil {
			s.closeListeners()
			return nil, err
		}
		s.socket, s.sockIno = cfg.Socket, ino
		s.add(limit(ln, cfg.MaxConns), api, cfg.HeaderTimeout)
	}
	return s, nil
}

func (s *Server) add(ln net.Listener, h http.Handler, headerTimeout time.Duration) {
	s.lns = append(s.lns, ln)
	s.servers = append(s.servers, &http.Server{
		Handler: h,
		// A client that sends half a request header is dropped; bodies
		// have their own deadlines (JSON) or idle limits (uploads).
		ReadHeaderTimeout: headerTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
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
	s.removeSocket()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
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
		if c, err := net.DialTimeout("unix", p, 500*time.Millisecond); err == nil {
			c.Close()
			return nil, 0, errdefs.New(errdefs.RuntimeError, "%s is served by another process", p)
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
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// requireToken answers 401 to a request without the bearer token (the
// scheme's case does not matter, RFC 9110 §11.1).
func requireToken(token string, next http.Handler) http.Handler {
	want := []byte(token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, got, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare([]byte(got), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="boxrun"`)
			writeError(w, newError(http.StatusUnauthorized, "UNAUTHORIZED", "missing or wrong bearer token"))
			return
		}
		next.ServeHTTP(w, r)
	})
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
