package exec

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"golang.org/x/sys/unix"
)

// Close fails pending calls fast and ends running processes with an exit
// event carrying an error.
func TestCloseFailsPendingAndProcesses(t *testing.T) {
	c := startServer(t, ServerOptions{})
	p, err := c.Start(context.Background(), Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	// A CopyIn whose archive never ends is pending.
	pr, pw := io.Pipe()
	defer pw.Close()
	copyErr := make(chan error, 1)
	go func() { copyErr <- c.CopyIn(context.Background(), t.TempDir(), pr) }()
	pw.Write(make([]byte, 512)) // some of a header
	time.Sleep(50 * time.Millisecond)

	start := time.Now()
	c.Close()
	r := collect(t, p)
	if r.exit.Code != -1 || r.exit.Error != "connection to agent closed" {
		t.Errorf("exit after close: %+v", r.exit)
	}
	pw.CloseWithError(errors.New("writer gone")) // unblocks the Read CopyIn is in
	if err := <-copyErr; !errdefs.Is(err, errdefs.RuntimeError) {
		t.Errorf("pending copy: %v", err)
	}
	if err := c.Ping(context.Background()); !errdefs.Is(err, errdefs.RuntimeError) || !strings.Contains(err.Error(), "connection to agent closed") {
		t.Errorf("ping after close: %v", err)
	}
	if _, err := c.Start(context.Background(), Command{Args: []string{"true"}}); err == nil {
		t.Error("start after close succeeded")
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("close took %v", el)
	}
	select {
	case <-c.Done():
	default:
		t.Error("Done not closed")
	}
	waitGone(t, p.Pid()) // the server killed the session's processes
}

// A connection that dies under the client fails calls that wait for an
// agent which will never answer.
func TestConnectionLoss(t *testing.T) {
	host, agent := net.Pipe()
	c := NewClient(host, testLogger())
	defer c.Close()
	// A fake agent that reads the request, then vanishes.
	go func() {
		buf := make([]byte, 4096)
		agent.Read(buf)
		time.Sleep(50 * time.Millisecond)
		agent.Close()
	}()
	errc := make(chan error, 1)
	go func() { errc <- c.Ping(context.Background()) }()
	select {
	case err := <-errc:
		if !errdefs.Is(err, errdefs.RuntimeError) || !strings.Contains(err.Error(), "connection to agent lost") {
			t.Errorf("got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ping hangs after the connection died")
	}
}

// Processes get an exit event with an error when the agent goes away.
func TestAgentLossEndsProcesses(t *testing.T) {
	a, b := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, b, ServerOptions{Logger: testLogger()}) }()
	c := NewClient(a, testLogger())
	defer c.Close()
	if _, err := c.Hello(context.Background(), HelloRequest{Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	p, err := c.Start(context.Background(), Command{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	cancel() // the agent's session ends
	r := collect(t, p)
	if r.exit.Code != -1 || !strings.HasPrefix(r.exit.Error, "connection to agent lost") {
		t.Errorf("exit %+v", r.exit)
	}
	<-served
	waitGone(t, p.Pid())
}

// lossyConn drops the first n bytes the agent would read, as a
// virtio-serial port does with data sent before the guest opened it.
type lossyConn struct {
	net.Conn
	drop int
}

func (l *lossyConn) Read(p []byte) (int, error) {
	for {
		n, err := l.Conn.Read(p)
		if l.drop == 0 || err != nil {
			return n, err
		}
		k := min(n, l.drop)
		l.drop -= k
		if n > k {
			copy(p, p[k:n])
			return n - k, nil
		}
	}
}

func TestHelloSurvivesLostBytes(t *testing.T) {
	for _, drop := range []int{1, 7, 25, 30, 60} {
		a, b := socketPair(t)
		c := startServerOn(t, a, &lossyConn{Conn: b, drop: drop}, ServerOptions{})
		if err := c.Ping(context.Background()); err != nil {
			t.Errorf("drop %d: %v", drop, err)
		}
	}
}

func TestHelloSetsClock(t *testing.T) {
	got := make(chan time.Time, 4)
	a, b := socketPair(t)
	c := startServerOn(t, a, b, ServerOptions{SetClock: func(t time.Time) error { got <- t; return nil }, Version: "v-test"})
	want := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	info, err := c.Hello(context.Background(), HelloRequest{Time: want})
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != "v-test" {
		t.Errorf("version %q", info.Version)
	}
	<-got // the first hello from startServerOn
	if g := <-got; g.Before(want) || g.Sub(want) > time.Second {
		t.Errorf("clock set to %v, want about %v", g, want)
	}
}

func writeFrame(w io.Writer, id uint32, typ byte, p []byte) error {
	_, err := w.Write(appendFrame(nil, id, typ, p))
	return err
}

// An agent that violates flow control or frame limits is cut off.
func TestClientRejectsMisbehavingAgent(t *testing.T) {
	for _, tc := range []struct {
		name string
		bad  func(w io.Writer, id uint32)
	}{
		{"window overrun", func(w io.Writer, id uint32) {
			chunk := make([]byte, maxDataFrame)
			for i := 0; i <= window/maxDataFrame; i++ {
				writeFrame(w, id, frameStdout, chunk)
			}
		}},
		{"oversized frame", func(w io.Writer, id uint32) {
			var hdr [headerSize]byte
			binary.BigEndian.PutUint32(hdr[0:], maxDataFrame+1)
			binary.BigEndian.PutUint32(hdr[4:], id)
			hdr[8] = frameData
			w.Write(hdr[:])
		}},
		{"request from agent", func(w io.Writer, id uint32) { writeFrame(w, 99, frameRequest, []byte("{}")) }},
		{"control flood", func(w io.Writer, id uint32) {
			writeFrame(w, id, frameStdout, []byte("x")) // the pump blocks on it
			for i := 0; i < 2*maxQueuedControl; i++ {
				writeFrame(w, id, frameEOF, nil)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketPair(t)
			c := NewClient(a, testLogger())
			defer c.Close()
			go func() {
				// Skip Sync + request header, learn the channel id, start.
				br := make([]byte, 4096)
				n, _ := b.Read(br)
				sync := len(syncFrame(0))
				if n < sync+headerSize {
					return
				}
				id := binary.BigEndian.Uint32(br[sync+4:])
				writeFrame(b, id, frameStarted, []byte(`{"pid":1}`))
				tc.bad(b, id)
				io.Copy(io.Discard, b)
			}()
			p, err := c.Start(context.Background(), Command{Args: []string{"x"}})
			if err != nil {
				t.Fatal(err)
			}
			// Events are not read, so no credit is returned.
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("connection still up")
			}
			if err := c.Err(); err == nil || !strings.Contains(err.Error(), "protocol error") {
				t.Errorf("got %v", err)
			}
			r := collect(t, p)
			if r.exit.Code != -1 || !strings.HasPrefix(r.exit.Error, "connection to agent lost") {
				t.Errorf("exit %+v", r.exit)
			}
		})
	}
}

// --- PID 1 reaping ---------------------------------------------------------

func TestMain(m *testing.M) {
	switch os.Getenv("BOXRUN_TEST_REAPER") {
	case "1":
		reaperHelper()
		return
	case "lock":
		os.Exit(reaperLockHelper())
	}
	os.Exit(m.Run())
}

// reaperHelper serves on fd 3 as a child subreaper with a Reaper, like the
// agent as PID 1: orphans of the commands it runs become its children.
func reaperHelper() {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		os.Exit(2)
	}
	f := os.NewFile(3, "conn")
	conn, err := net.FileConn(f)
	if err != nil {
		os.Exit(3)
	}
	Serve(context.Background(), conn, ServerOptions{Reaper: NewReaper(nil)})
	os.Exit(0)
}

// reaperLockHelper checks, in a process of its own (a Reaper reaps every
// child), that a child is reaped only under the Reaper's lock: while the
// lock is held, an exited child stays a zombie, so its pid cannot be given
// to a new child before its status went to its own waiter.
func reaperLockHelper() int {
	r := NewReaper(nil)
	// The child exits once its stdin closes, which is after the lock is
	// held: it cannot exit (and be reaped) before.
	in, out, err := os.Pipe()
	if err != nil {
		return 2
	}
	attr := &syscall.ProcAttr{Files: []uintptr{in.Fd(), 2, 2}}
	pid, ch, err := r.start("/bin/sh", []string{"sh", "-c", "read x; exit 7"}, attr)
	in.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		return 3
	}
	r.mu.Lock() // as start does while it forks
	out.Close()
	state := func() string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return "gone"
		}
		return strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))[0]
	}
	for deadline := time.Now().Add(10 * time.Second); state() != "Z"; time.Sleep(5 * time.Millisecond) {
		if st := state(); st == "gone" || time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "child %d: %s, want a zombie while the reaper's lock is held\n", pid, st)
			return 4
		}
	}
	time.Sleep(200 * time.Millisecond)
	if st := state(); st != "Z" {
		fmt.Fprintf(os.Stderr, "child %d reaped while the reaper's lock was held (%s)\n", pid, st)
		return 5
	}
	r.mu.Unlock()
	select {
	case ws := <-ch:
		if ws.ExitStatus() != 7 {
			fmt.Fprintf(os.Stderr, "child %d: status %v, want exit 7\n", pid, ws)
			return 6
		}
	case <-time.After(10 * time.Second):
		fmt.Fprintf(os.Stderr, "child %d: no status\n", pid)
		return 7
	}
	return 0
}

func TestReaperReapsUnderItsLock(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BOXRUN_TEST_REAPER=lock")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
}

func zombieChildren(ppid int) []int {
	var zs []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		f := strings.Fields(s[i+2:])
		if len(f) > 1 && f[0] == "Z" && f[1] == strconv.Itoa(ppid) {
			zs = append(zs, pid)
		}
	}
	return zs
}

func TestReaperKeepsExitStatuses(t *testing.T) {
	a, b := socketPair(t)
	bf, err := b.(*net.UnixConn).File()
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BOXRUN_TEST_REAPER=1")
	cmd.ExtraFiles = []*os.File{bf}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	bf.Close()
	defer cmd.Wait()
	c := NewClient(a, testLogger())
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Hello(ctx, HelloRequest{Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	// Each command orphans children that exit around the time it does, so
	// the reaper sees a storm of statuses for pids nobody waits for.
	var wg sync.WaitGroup
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code := i % 7
			r := run(t, c, sh("true & true & (sleep 0.01; true) & exit "+strconv.Itoa(code)))
			if r.exit.Code != code || r.exit.Error != "" {
				t.Errorf("exec %d: exit %+v, want code %d", i, r.exit, code)
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(3 * time.Second)
	for {
		zs := zombieChildren(cmd.Process.Pid)
		if len(zs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("zombies left: %v", zs)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A virtio-serial port does not always show the agent that the host
// reconnected. A Sync with a new session id ends the old session: its
// processes are killed, and the new host is served.
func TestSessionTakeover(t *testing.T) {
	agentEnd, port := socketPair(t)
	served := make(chan error, 1)
	go func() { served <- Serve(context.Background(), agentEnd, ServerOptions{Logger: testLogger()}) }()
	defer func() {
		port.Close()
		<-served
	}()
	// The "port": forwards to whichever host is connected and drops what
	// the agent writes while none is, like QEMU's socket chardev.
	var mu sync.Mutex
	var host net.Conn
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := port.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			if host != nil {
				host.Write(buf[:n])
			}
			mu.Unlock()
		}
	}()
	connect := func() *Client {
		a, b := socketPair(t)
		mu.Lock()
		host = b
		mu.Unlock()
		go io.Copy(port, b)
		c := NewClient(a, testLogger())
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Hello(ctx, HelloRequest{Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c1 := connect()
	p, err := c1.Start(context.Background(), sh("echo started; exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	<-p.Events()
	// The old host goes away while its process streams output.
	mu.Lock()
	host = nil
	mu.Unlock()
	c1.Close()

	c2 := connect()
	defer c2.Close()
	waitGone(t, p.Pid())
	if r := run(t, c2, Command{Args: []string{"echo", "new session"}}); r.stdout != "new session\n" {
		t.Errorf("new session: %q", r.stdout)
	}
}
