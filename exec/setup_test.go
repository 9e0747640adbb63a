package exec

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// An agent with Setup serves nothing that needs the box root before a
// Hello set the box up (a warm-start template waits there, having
// touched no disk), then serves the root Setup made.
func TestSetupGatesTheRoot(t *testing.T) {
	root := t.TempDir()
	var calls atomic.Int32
	var got atomic.Pointer[Setup]
	var fail atomic.Bool
	fail.Store(true)
	opts := ServerOptions{
		Root:   root,
		Logger: testLogger(),
		Setup: func(ctx context.Context, s Setup) error {
			calls.Add(1)
			if fail.Load() {
				return errors.New("no disk")
			}
			got.Store(&s)
			// The root appears only now, as the agent's mounts do.
			return os.WriteFile(filepath.Join(root, "mounted"), []byte("yes"), 0o644)
		},
	}
	a, b := socketPair(t)
	served := make(chan error, 1)
	go func() { served <- Serve(context.Background(), b, opts) }()
	c := NewClient(a, testLogger())
	t.Cleanup(func() { c.Close(); <-served })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Before any Hello: ping answers (the host's readiness probe), the
	// rest fails without touching the root.
	if err := c.Probe(ctx); err != nil {
		t.Fatalf("probe: %v", err)
	}
	if _, err := c.Stat(ctx, "/mounted"); err == nil || !strings.Contains(err.Error(), "not set up") {
		t.Fatalf("stat before hello: %v", err)
	}
	if calls.Load() != 0 {
		t.Fatalf("setup ran %d times on a probe", calls.Load())
	}
	// A failed Setup fails the Hello and leaves the box not set up.
	if _, err := c.Hello(ctx, HelloRequest{Hostname: "box-1"}); err == nil || !strings.Contains(err.Error(), "no disk") {
		t.Fatalf("hello with failing setup: %v", err)
	}
	if _, err := c.Stat(ctx, "/mounted"); err == nil {
		t.Fatal("stat after a failed setup worked")
	}
	fail.Store(false)
	seed := []byte("0123456789abcdef0123456789abcdef")
	if _, err := c.Hello(ctx, HelloRequest{Hostname: "box-1", Entropy: seed}); err != nil {
		t.Fatalf("hello: %v", err)
	}
	if s := got.Load(); s == nil || s.Hostname != "box-1" || string(s.Entropy) != string(seed) {
		t.Fatalf("setup got %+v", s)
	}
	if fi, err := c.Stat(ctx, "/mounted"); err != nil || !fi.Exists {
		t.Fatalf("stat after hello: %+v %v", fi, err)
	}
}

func TestHelloRejectsBadSetup(t *testing.T) {
	c := startServer(t, ServerOptions{})
	ctx := context.Background()
	for _, req := range []HelloRequest{
		{Hostname: "a b"},
		{Hostname: strings.Repeat("h", 65)},
		{Hostname: "x/../y"},
		{Entropy: make([]byte, 513)},
		{Network: &Network{MAC: "01:00:5e:00:00:01"}}, // multicast
		{Network: &Network{MAC: "nonsense"}},
	} {
		if _, err := c.Hello(ctx, req); errdefs.CodeOf(err) != errdefs.ValidationError {
			t.Errorf("hello %+v: %v, want a validation error", req, err)
		}
	}
}

// The agent checks a Hello's setup itself, whatever the host did: a
// request that skips the client's checks is refused by the server.
func TestServerRejectsBadSetup(t *testing.T) {
	var called atomic.Bool
	c := startServer(t, ServerOptions{Setup: func(context.Context, Setup) error { called.Store(true); return nil }, Root: t.TempDir()})
	called.Store(false) // startServer's own Hello
	ctx := context.Background()
	for _, req := range []*request{
		{Op: "hello", Hostname: "a b"},
		{Op: "hello", Hostname: "x/y"},
		{Op: "hello", Entropy: make([]byte, maxEntropy+1)},
	} {
		if _, err := c.handshake(ctx, req, time.Time{}); errdefs.CodeOf(err) != errdefs.ValidationError || !AgentAnswered(err) {
			t.Errorf("hello %+v: %v, want a validation error from the agent", req, err)
		}
	}
	if called.Load() {
		t.Error("Setup ran for a bad Hello")
	}
}
