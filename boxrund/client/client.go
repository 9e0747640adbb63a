// Package client is a small typed Go client of the BoxRun REST API as
// boxrund serves it (contract: spec/boxrun-api.md): boxes, execs with their
// SSE event streams, streamed uploads and downloads, image pulls with
// progress, and the WebSocket attach.
//
// A Client talks over a Unix socket or TCP ([Options]); [FromEnv] reads
// where the server is from the environment the way the boxrun CLI does,
// and [Discover] picks the transport that answers (the socket first).
// Every error the server answers is an [*Error] carrying its code; it
// unwraps to an [*errdefs.Error] of the same code, so errdefs.CodeOf,
// errdefs.Is and boxrun.CodeOf work on it.
//
// The package depends on the standard library, errdefs and a WebSocket
// library only: it does not pull the engine into a program.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// Options say where the server is.
type Options struct {
	// Socket is the path of the server's Unix socket. When set the client
	// talks over it and URL is ignored.
	Socket string
	// URL is the server's base URL for TCP, e.g. http://127.0.0.1:9090.
	URL string
	// Token, when set, is sent as "Authorization: Bearer <token>".
	Token string
	// Transport replaces the default transport (tests).
	Transport http.RoundTripper
}

// Client is a client of one server. Its methods may be called
// concurrently. Requests have no time limit of their own: the caller's
// context bounds them.
type Client struct {
	base   string // http://localhost over the socket, else the URL
	socket string
	token  string
	http   *http.Client
}

// New returns a client for opts.
func New(opts Options) *Client {
	c := &Client{socket: opts.Socket, token: opts.Token, base: strings.TrimSuffix(opts.URL, "/")}
	rt := opts.Transport
	if rt == nil {
		tr := &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			MaxIdleConnsPerHost: 8,
			IdleConnTimeout:     90 * time.Second,
			// Only the connection: a create or a stream may take long.
			DialContext:           (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
			ResponseHeaderTimeout: 0,
		}
		if opts.Socket != "" {
			sock := opts.Socket
			tr.Proxy = nil
			tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			}
		}
		rt = tr
	}
	if opts.Socket != "" {
		c.base = "http://localhost"
	}
	if c.base == "" {
		c.base = "http://127.0.0.1:9090"
	}
	c.http = &http.Client{
		Transport: rt,
		// The API answers no redirect but / → /ui; never follow one with
		// the token to somewhere else.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c
}

// Socket is the Unix socket the client talks over ("" on TCP).
func (c *Client) Socket() string { return c.socket }

// BaseURL is the base URL of requests (http://localhost over a socket).
func (c *Client) BaseURL() string { return c.base }

// Endpoint describes where the client talks: "unix:PATH" or the URL.
func (c *Client) Endpoint() string {
	if c.socket != "" {
		return "unix:" + c.socket
	}
	return c.base
}

// Env is where the environment says the server is, as the boxrun CLI
// reads it:
//
//   - BOXRUN_STATE_DIR (default ~/.boxrun): the socket is
//     <state>/boxrun.sock, or BOXRUN_SOCKET when set;
//   - BOXRUN_HOST (127.0.0.1) and BOXRUN_PORT (9090): TCP;
//   - BOXRUN_TOKEN: the bearer token.
type Env struct {
	StateDir string
	Socket   string
	Host     string
	Port     int
	Token    string
	// Remote is true when BOXRUN_HOST names a host that is not loopback:
	// then only TCP is used (a local socket would be another server) and
	// no server is started.
	Remote bool
}

// FromEnv reads Env from the process environment.
func FromEnv() Env { return EnvFrom(os.Getenv) }

// EnvFrom reads Env through getenv.
func EnvFrom(getenv func(string) string) Env {
	e := Env{StateDir: getenv("BOXRUN_STATE_DIR"), Host: getenv("BOXRUN_HOST"), Token: getenv("BOXRUN_TOKEN"), Port: 9090}
	if e.StateDir == "" {
		home := getenv("HOME")
		if home == "" {
			if h, err := os.UserHomeDir(); err == nil {
				home = h
			} else {
				home = "/root"
			}
		}
		e.StateDir = filepath.Join(home, ".boxrun")
	}
	e.Socket = getenv("BOXRUN_SOCKET")
	if e.Socket == "" {
		e.Socket = filepath.Join(e.StateDir, "boxrun.sock")
	}
	if e.Host == "" {
		e.Host = "127.0.0.1"
	} else if !isLoopback(e.Host) {
		e.Remote = true
	}
	if p, err := strconv.Atoi(getenv("BOXRUN_PORT")); err == nil && p > 0 && p < 65536 {
		e.Port = p
	}
	return e
}

// URL is the TCP base URL.
func (e Env) URL() string {
	return "http://" + net.JoinHostPort(strings.Trim(e.Host, "[]"), strconv.Itoa(e.Port))
}

// SocketClient is a client over the socket.
func (e Env) SocketClient() *Client { return New(Options{Socket: e.Socket, Token: e.Token}) }

// TCPClient is a client over TCP.
func (e Env) TCPClient() *Client { return New(Options{URL: e.URL(), Token: e.Token}) }

// ErrNoServer is returned by Discover when no server answers.
var ErrNoServer = errors.New("no boxrun server answers")

// Discover returns a client on the first transport whose server answers
// GET /v1/info within probe (500 ms when 0): the socket when it exists
// (and the host is not remote), else TCP. A server that answers with an
// error (a wrong token: 401) still counts: it is there. When none answers
// the error wraps ErrNoServer.
func Discover(ctx context.Context, e Env, probe time.Duration) (*Client, error) {
	if probe <= 0 {
		probe = 500 * time.Millisecond
	}
	var errs []error
	if !e.Remote {
		if fi, err := os.Stat(e.Socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			c := e.SocketClient()
			if err := c.Ping(ctx, probe); err == nil || isAPIError(err) {
				return c, nil
			} else {
				errs = append(errs, fmt.Errorf("unix:%s: %w", e.Socket, err))
			}
		}
	}
	c := e.TCPClient()
	err := c.Ping(ctx, probe)
	if err == nil || isAPIError(err) {
		return c, nil
	}
	errs = append(errs, fmt.Errorf("%s: %w", e.URL(), err))
	return nil, fmt.Errorf("%w (%w)", ErrNoServer, errors.Join(errs...))
}

func isAPIError(err error) bool {
	var e *Error
	return errors.As(err, &e)
}

// Ping asks GET /v1/info within d.
func (c *Client) Ping(ctx context.Context, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	_, err := c.Info(ctx)
	return err
}

// Error is an error answer of the server: its HTTP status, and the code
// and message of its {"code", "message"} body. A body that is not that
// shape (an older server's plain-text rejection) gives RUNTIME_ERROR and
// the body's text, as the Python SDK does.
type Error struct {
	Status  int
	Code    errdefs.Code
	Message string
}

// Error is "[CODE] message", as the SDKs print it.
func (e *Error) Error() string { return fmt.Sprintf("[%s] %s", e.Code, e.Message) }

// Unwrap gives the same code as an errdefs.Error, so that errdefs.CodeOf,
// errdefs.Is and errors.Is(err, &errdefs.Error{Code: X}) see it.
func (e *Error) Unwrap() error { return &errdefs.Error{Code: e.Code, Message: e.Message} }

// CodeOf is the code of err: an API error's, "" for nil, else
// RUNTIME_ERROR.
func CodeOf(err error) errdefs.Code { return errdefs.CodeOf(err) }

// decodeError reads an error answer.
func decodeError(res *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	return errorFrom(res.StatusCode, b)
}

func errorFrom(status int, b []byte) error {
	var body struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	e := &Error{Status: status, Code: errdefs.RuntimeError}
	if json.Unmarshal(b, &body) == nil && body.Code != "" {
		e.Code, e.Message = errdefs.Code(body.Code), body.Message
		return e
	}
	e.Message = strings.TrimSpace(string(b))
	if e.Message == "" {
		e.Message = fmt.Sprintf("%d %s", status, http.StatusText(status))
	}
	return e
}

// request builds a request to path (with its query) with body.
func (c *Client) request(ctx context.Context, method, path string, body io.Reader, ctype string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	return req, nil
}

// send sends req; an answer of status 400 or more becomes an *Error.
func (c *Client) send(req *http.Request) (*http.Response, error) {
	res, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if res.StatusCode >= 400 {
		defer res.Body.Close()
		return nil, decodeError(res)
	}
	return res, nil
}

// do sends a JSON request (in nil: no body) and decodes a JSON answer into
// out (nil: discarded).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	ctype := ""
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, ctype = bytes.NewReader(b), "application/json"
	}
	req, err := c.request(ctx, method, path, body, ctype)
	if err != nil {
		return err
	}
	res, err := c.send(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if out == nil {
		io.Copy(io.Discard, io.LimitReader(res.Body, 1<<20))
		return nil
	}
	if err := json.NewDecoder(res.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decoding the answer: %w", method, path, err)
	}
	return nil
}

// seg escapes one path segment (a box or exec id or name).
func seg(s string) string { return url.PathEscape(s) }

func isLoopback(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(strings.Trim(host, "[]"), "."))
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
