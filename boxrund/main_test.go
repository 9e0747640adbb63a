package boxrund

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/internal/testenv"
)

// The package's tests drive a real engine (real VMs under QEMU, images from
// a real registry on 127.0.0.1) through a real Server on both transports.
var fx struct {
	tmp     string
	image   string // busybox in the registry
	reg     *testenv.Registry
	layout  string // busybox's OCI layout
	eng     *boxrun.Engine
	api     *API
	srv     *Server
	clients map[string]*client // "unix", "tcp"
}

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		fmt.Fprintln(os.Stderr, "boxrund: qemu-system-x86_64 not found; run scripts/setup.sh")
		return 1
	}
	tmp, err := os.MkdirTemp("", "boxrund-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	fx.tmp = tmp
	reg, err := testenv.NewRegistry()
	if err != nil {
		fmt.Fprintln(os.Stderr, "boxrund:", err)
		return 1
	}
	defer reg.Close()
	fx.reg = reg
	layout := filepath.Join(tmp, "busybox")
	fx.layout = layout
	if err := testenv.WriteBusyboxLayout(layout, testenv.LayoutOptions{}); err != nil {
		fmt.Fprintln(os.Stderr, "boxrund:", err)
		return 1
	}
	ctx := context.Background()
	if fx.image, err = reg.PushLayout(ctx, layout, "library/busybox:latest"); err != nil {
		fmt.Fprintln(os.Stderr, "boxrund:", err)
		return 1
	}
	conf := filepath.Join(tmp, "registries.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n", reg.Addr)), 0o644)
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	fx.eng, err = boxrun.New(ctx, boxrun.Config{
		DataDir: filepath.Join(tmp, "data"), RegistriesConf: conf,
		MaxCPU: 64, MaxMemoryMB: 64 << 10, // TCG vCPUs are threads: overcommit in tests
		Logger: logger,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "boxrund:", err)
		return 1
	}
	fx.api = New(fx.eng, Options{KeepAlive: 300 * time.Millisecond, SpoolDir: tmp, Logger: logger})
	fx.srv, err = Listen(fx.api, ListenConfig{Socket: filepath.Join(tmp, "boxrun.sock"), Port: freePort()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "boxrund:", err)
		return 1
	}
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- fx.srv.Serve(sctx, 5*time.Second) }()
	fx.clients = map[string]*client{
		"unix": unixClient(fx.srv.Socket()),
		"tcp":  tcpClient(fx.srv.TCPAddr(), ""),
	}
	code := m.Run()
	if shared.box != nil {
		if err := fx.eng.Remove(ctx, shared.box.ID, boxrun.Force); err != nil {
			fmt.Fprintln(os.Stderr, "boxrund: remove shared box:", err)
			code = 1
		}
	}
	stop()
	if err := <-served; err != nil {
		fmt.Fprintln(os.Stderr, "boxrund: serve:", err)
		code = 1
	}
	if _, err := os.Stat(fx.srv.Socket()); !os.IsNotExist(err) {
		fmt.Fprintln(os.Stderr, "boxrund: socket left behind after Serve returned")
		code = 1
	}
	if err := fx.eng.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "boxrund: close engine:", err)
		code = 1
	}
	return code
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// client is a plain HTTP client of one transport.
type client struct {
	name  string
	base  string
	token string
	http  *http.Client
}

func unixClient(sock string) *client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	return &client{name: "unix", base: "http://localhost", http: &http.Client{Transport: tr}}
}

func tcpClient(addr, token string) *client {
	return &client{name: "tcp", base: "http://" + addr, token: token, http: &http.Client{Transport: &http.Transport{}}}
}

// forEachTransport runs f once over the socket and once over TCP.
func forEachTransport(t *testing.T, f func(t *testing.T, c *client)) {
	for _, name := range []string{"unix", "tcp"} {
		t.Run(name, func(t *testing.T) { f(t, fx.clients[name]) })
	}
}

// newBox creates a box through c, removed when the test ends.
func newBox(t *testing.T, c *client, body string) map[string]any {
	t.Helper()
	r := c.do(t, "POST", "/v1/boxes", body)
	r.want(t, 201)
	box := r.object(t)
	id := box["id"].(string)
	t.Cleanup(func() {
		if _, err := fx.eng.Get(context.Background(), id); err == nil {
			if err := fx.eng.Remove(context.Background(), id, boxrun.Force); err != nil {
				t.Errorf("remove %s: %v", id, err)
			}
		}
	})
	return box
}

func quote(s string) string { return strconv.Quote(s) }

func boxBody(extra string) string {
	b := `{"image":` + quote("docker://"+fx.image) + `,"cpu":1,"memory_mb":256,"disk_size_gb":1`
	if extra != "" {
		b += "," + extra
	}
	return b + "}"
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
