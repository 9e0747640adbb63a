package boxrund

import (
	"context"
	"net/http"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

var shared struct {
	once sync.Once
	box  *boxrun.Box
	err  error
}

// sharedBox is one box for the tests where isolation is not what is
// tested (each boot costs seconds under TCG); run() removes it.
func sharedBox(t *testing.T) *boxrun.Box {
	t.Helper()
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		shared.box, shared.err = fx.eng.Create(ctx, boxrun.BoxSpec{Image: "docker://" + fx.image, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	})
	if shared.err != nil {
		t.Fatalf("shared box: %v", shared.err)
	}
	return shared.box
}

func startExec(t *testing.T, c *client, box, script string) string {
	t.Helper()
	x := c.do(t, "POST", "/v1/boxes/"+box+"/exec", `{"cmd":["sh","-c",`+quote(script)+`]}`).want(t, 201).object(t)
	return x["id"].(string)
}

// TestSSETwoSubscribers: a subscriber from the start and one that joins
// after the exec ended get identical events (full replay from seq 0),
// over different transports; an idle stream carries keep-alive comments.
func TestSSETwoSubscribers(t *testing.T) {
	box := sharedBox(t)
	unix, tcp := fx.clients["unix"], fx.clients["tcp"]
	xid := startExec(t, unix, box.ID, `for i in $(seq 1 30); do echo "line $i"; echo "err $i" >&2; usleep 20000; done; exit 5`)
	early, _ := unix.events(t, xid)
	late, _ := tcp.events(t, xid)
	if !reflect.DeepEqual(early, late) {
		t.Fatalf("early and late subscribers differ:\n%v\n%v", early, late)
	}
	stdout, stderr, exit := output(t, early)
	if strings.Count(stdout, "line ") != 30 || strings.Count(stderr, "err ") != 30 || exit["exit_code"] != float64(5) {
		t.Errorf("stdout %q stderr %q exit %v", stdout, stderr, exit)
	}
	if !strings.HasPrefix(stdout, "line 1\nline 2\n") || !strings.HasSuffix(stdout, "line 30\n") {
		t.Errorf("stdout out of order: %q", stdout)
	}

	quiet := startExec(t, tcp, box.ID, `sleep 1.5; echo woke`)
	evs, comments := tcp.events(t, quiet)
	if out, _, _ := output(t, evs); out != "woke\n" {
		t.Errorf("quiet exec output %q", out)
	}
	if comments < 2 {
		t.Errorf("%d keep-alive comments over 1.5 s of silence at a 300 ms interval", comments)
	}
}

// TestSSEDisconnect: a subscriber that leaves ends only its own stream:
// the exec runs to its end, and the server keeps no goroutine for it.
func TestSSEDisconnect(t *testing.T) {
	box := sharedBox(t)
	c := fx.clients["unix"]
	xid := startExec(t, c, box.ID, `echo first; sleep 2; echo second`)
	before := runtime.NumGoroutine()
	for range 5 {
		ctx, cancel := context.WithCancel(context.Background())
		req := c.req(t, "GET", "/v1/boxes/x/exec/"+xid+"/events", "", nil).WithContext(ctx)
		res, err := c.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		if n, err := res.Body.Read(buf); n == 0 {
			t.Fatalf("no first event: %v", err)
		}
		cancel()
		res.Body.Close()
	}
	x := c.waitExec(t, xid)
	if x["status"] != "succeeded" {
		t.Fatalf("exec after subscribers left: %v", x)
	}
	evs, _ := c.events(t, xid)
	if out, _, _ := output(t, evs); out != "first\nsecond\n" {
		t.Errorf("output %q", out)
	}
	c.http.Transport.(*http.Transport).CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines after the subscribers left, %d before:\n%s", n, before, buf[:runtime.Stack(buf, true)])
	}
}

// TestSSEMultiByte: output cut where the guest's pipe reads end never
// splits a UTF-8 character between two events (JSON would turn each half
// into U+FFFD): the concatenated stdout is exactly what was printed.
func TestSSEMultiByte(t *testing.T) {
	box := sharedBox(t)
	c := fx.clients["tcp"]
	// 5-byte units: pipe reads of any power-of-two size end inside one.
	xid := startExec(t, c, box.ID, `yes 'é€' | head -n 100000 | tr -d '\n'; printf 'x\342\202'`)
	evs, _ := c.events(t, xid)
	stdout, _, exit := output(t, evs)
	// An incomplete character at the very end is flushed as it is (and
	// JSON then makes each byte a U+FFFD).
	want := strings.Repeat("é€", 100000) + "x\ufffd\ufffd"
	if exit["exit_code"] != float64(0) || stdout != want {
		i := 0
		for i < len(stdout) && i < len(want) && stdout[i] == want[i] {
			i++
		}
		t.Fatalf("stdout: %d bytes, want %d; first difference at byte %d (%d events), exit %v", len(stdout), len(want), i, len(evs), exit)
	}
	t.Logf("%d bytes in %d events", len(stdout), len(evs))
}
