package ch

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		in           string
		major, minor int
		ok           bool
	}{
		{"v53.0", 53, 0, true}, {"cloud-hypervisor v39.1", 39, 1, true}, {"v40.0-12-gabcdef", 40, 0, true}, {"dev", 0, 0, false},
	} {
		ma, mi, ok := ParseVersion(tc.in)
		if ma != tc.major || mi != tc.minor || ok != tc.ok {
			t.Errorf("ParseVersion(%q) = %d, %d, %v", tc.in, ma, mi, ok)
		}
	}
}

// TestClientOneRequestPerConnection: CH's server is minimal; every request
// comes on a connection of its own, and answers of every kind are read.
func TestClientOneRequestPerConnection(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var conns atomic.Int32
	srv := &http.Server{
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/api/v1/vmm.ping":
				w.Write([]byte(`{"version":"v53.0"}`))
			case "/api/v1/vm.boot":
				w.WriteHeader(204)
			case "/api/v1/vmm.shutdown":
				w.WriteHeader(200) // v53, against its document's 204
			default:
				w.WriteHeader(500)
				w.Write([]byte(`["Error from API","The VM could not be created","bad"]`))
			}
		}),
	}
	go srv.Serve(l)
	defer srv.Close()
	c := NewClient(sock)
	ctx := context.Background()
	if p, err := c.Ping(ctx); err != nil || p.Version != "v53.0" {
		t.Fatalf("ping %+v %v", p, err)
	}
	if err := c.BootVM(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.ShutdownVMM(ctx); err != nil {
		t.Fatal(err)
	}
	err = c.CreateVM(ctx, &VmConfig{})
	if err == nil || err.Error() != "cloud-hypervisor PUT /vm.create: 500: Error from API: The VM could not be created: bad" {
		t.Fatalf("create: %v", err)
	}
	if _, err := c.Info(ctx); err == nil || !strings.Contains(err.Error(), "500") || IsNotFound(err) {
		t.Fatalf("info: %v", err)
	}
	if n := conns.Load(); n != 5 {
		t.Errorf("%d connections for 5 requests", n)
	}
}
