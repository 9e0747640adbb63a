package exec

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func testLogger() *slog.Logger {
	if os.Getenv("BOXRUN_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// socketPair returns the two ends of a unix stream socketpair.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

// startServer connects a Client to a Serve over a socketpair and says
// hello. The server is checked to stop when the client closes.
func startServer(t testing.TB, opts ServerOptions) *Client {
	t.Helper()
	a, b := socketPair(t)
	return startServerOn(t, a, b, opts)
}

func startServerOn(t testing.TB, hostEnd, agentEnd net.Conn, opts ServerOptions) *Client {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger()
	}
	served := make(chan error, 1)
	go func() { served <- Serve(context.Background(), agentEnd, opts) }()
	c := NewClient(hostEnd, testLogger())
	t.Cleanup(func() {
		c.Close()
		select {
		case <-served:
		case <-time.After(15 * time.Second):
			t.Error("server did not stop after the client closed")
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := c.Hello(ctx, HelloRequest{Time: time.Now()})
	if err != nil {
		t.Fatalf("hello: %v", err)
	}
	if info.Protocol != ProtocolVersion || info.Kernel == "" {
		t.Fatalf("hello: unexpected %+v", info)
	}
	return c
}

type runResult struct {
	stdout, stderr string
	exit           *ExitStatus
	events         []Event
}

// run starts cmd and collects every event, checking that exactly one exit
// event arrives, last.
func run(t testing.TB, c *Client, cmd Command) runResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, err := c.Start(ctx, cmd)
	if err != nil {
		t.Fatalf("start %q: %v", cmd.Args, err)
	}
	return collect(t, p)
}

func collect(t testing.TB, p *Process) runResult {
	t.Helper()
	var r runResult
	var out, errb bytes.Buffer
	for ev := range p.Events() {
		if r.exit != nil {
			t.Fatalf("event after the exit event: %+v", ev)
		}
		r.events = append(r.events, ev)
		switch {
		case ev.Exit != nil:
			r.exit = ev.Exit
		case ev.Stream == "stdout":
			out.Write(ev.Data)
		case ev.Stream == "stderr":
			errb.Write(ev.Data)
		default:
			t.Fatalf("bad event %+v", ev)
		}
	}
	if r.exit == nil {
		t.Fatal("no exit event")
	}
	r.stdout, r.stderr = out.String(), errb.String()
	return r
}

func sh(script string) Command { return Command{Args: []string{"sh", "-c", script}} }

func trim(s string) string { return strings.TrimSpace(s) }

func writeFileBytes(p string, b []byte) error { return os.WriteFile(p, b, 0o644) }
