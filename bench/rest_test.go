package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/boxrund"
	"github.com/boxrun/boxrun/boxrund/client"
)

// restSocket is the bench server's socket.
var restSocket string

var rest struct {
	once   sync.Once
	err    error
	client *http.Client
}

// restSetup serves the bench engine over boxrund on a Unix socket, in
// this process (what is measured is the API, not process startup).
func restSetup(b *testing.B) *http.Client {
	setup(b)
	rest.once.Do(func() {
		sock := filepath.Join(env.tmp, "boxrun.sock")
		restSocket = sock
		srv, err := boxrund.Listen(boxrund.New(env.eng, boxrund.Options{}), boxrund.ListenConfig{Socket: sock})
		if err != nil {
			rest.err = err
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { srv.Serve(ctx, time.Second); close(done) }()
		// Before the engine closes (cleanups run last first).
		env.cleanup = append(env.cleanup, func() { cancel(); <-done })
		rest.client = &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 64,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			}}}
	})
	if rest.err != nil {
		b.Fatal(rest.err)
	}
	return rest.client
}

// restExec does what a REST client does to run a command: POST the exec,
// then read its event stream to the exit event. It returns stdout.
func restExec(b *testing.B, c *http.Client, box string, cmd ...string) string {
	body, _ := json.Marshal(map[string]any{"cmd": cmd})
	res, err := c.Post("http://localhost/v1/boxes/"+box+"/exec", "application/json", strings.NewReader(string(body)))
	if err != nil {
		b.Fatal(err)
	}
	var x struct{ ID string }
	json.NewDecoder(res.Body).Decode(&x)
	res.Body.Close()
	if res.StatusCode != 201 {
		b.Fatalf("exec: %d", res.StatusCode)
	}
	return sseStdout(b, c, x.ID)
}

// sseStdout reads an exec's SSE stream to its exit event and returns its
// stdout.
func sseStdout(b *testing.B, c *http.Client, id string) string {
	var out strings.Builder
	cl := client.New(client.Options{Socket: restSocket, Transport: c.Transport})
	if _, err := cl.Wait(context.Background(), id, &out, nil); err != nil {
		b.Errorf("stream of %s: %v", id, err)
	}
	return out.String()
}

// BenchmarkRESTRoundTrip: `true` run through the REST API (POST exec, SSE
// to exit) against the library's Exec, alternated in the same loop so both
// see the same host noise. Goal: rest/library ≤ 1.15.
func BenchmarkRESTRoundTrip(b *testing.B) {
	c := restSetup(b)
	ctx := context.Background()
	var lib, api time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := env.eng.Exec(ctx, env.box.ID, boxrun.ExecSpec{Cmd: []string{"true"}}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		restExec(b, c, env.box.ID, "true")
		lib += t1.Sub(t0)
		api += time.Since(t1)
	}
	n := float64(b.N)
	b.ReportMetric(float64(lib.Microseconds())/1000/n, "library-ms/op")
	b.ReportMetric(float64(api.Microseconds())/1000/n, "rest-ms/op")
	b.ReportMetric(float64(api)/float64(lib), "rest/library")
}

// BenchmarkSSEConcurrent: 50 clients stream one exec's output (about
// 1 MB of numbered lines) at once, each checked byte-exact, against 50
// library ExecEvents readers of the same exec.
func BenchmarkSSEConcurrent(b *testing.B) {
	const clients = 50
	c := restSetup(b)
	ctx := context.Background()
	var want strings.Builder
	for i := 1; i <= 150000; i++ {
		fmt.Fprintf(&want, "%d\n", i)
	}
	x, err := env.eng.StartExec(ctx, env.box.ID, boxrun.ExecSpec{Cmd: []string{"seq", "1", "150000"}})
	if err != nil {
		b.Fatal(err)
	}
	// Let it finish: both sides then replay the same stored events.
	for {
		info, err := env.eng.GetExec(ctx, x.ID)
		if err != nil {
			b.Fatal(err)
		}
		if info.Status != "running" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var lib, api time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		parallel(clients, func() {
			evs, err := env.eng.ExecEvents(ctx, x.ID)
			if err != nil {
				b.Error(err)
				return
			}
			var out strings.Builder
			for ev := range evs {
				if ev.Type == "log" && ev.Stream == "stdout" {
					out.WriteString(ev.Data)
				}
			}
			if out.String() != want.String() {
				b.Errorf("library stream: %d bytes, want %d", out.Len(), want.Len())
			}
		})
		t1 := time.Now()
		parallel(clients, func() {
			if got := sseStdout(b, c, x.ID); got != want.String() {
				b.Errorf("SSE stream not byte-exact: %d bytes, want %d", len(got), want.Len())
			}
		})
		lib += t1.Sub(t0)
		api += time.Since(t1)
	}
	mb := float64(want.Len()*clients*b.N) / 1e6
	b.ReportMetric(mb/lib.Seconds(), "library-MB/s")
	b.ReportMetric(mb/api.Seconds(), "sse-MB/s")
	b.ReportMetric(float64(api)/float64(lib), "sse/library")
}

func parallel(n int, f func()) {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	wg.Wait()
}
