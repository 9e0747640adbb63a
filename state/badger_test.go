package state

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

func TestBadgerReopenKeepsEverything(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{MaxOutputBytes: 256, Logger: testLogger()})
	must(t, err)
	a, b := box("box_a", "alpha", 0), box("box_b", "", 1)
	must(t, s.PutBox(a))
	must(t, s.PutBox(b))
	x := execRec("exec_1", "box_a", 0)
	x.Env, x.Workdir, x.TimeoutMS = map[string]string{"K": "v"}, "/w", 10
	must(t, s.PutExec(x))
	must(t, s.PutExec(execRec("exec_2", "box_a", 1)))
	var want []Event
	for i := range 20 {
		ev := logEv(i, Stdout, strings.Repeat(strconv.Itoa(i%10), 32))
		must(t, s.AppendEvent("exec_1", ev))
		want = append(want, ev)
	}
	must(t, s.Close())
	must(t, s.Close()) // idempotent

	s = openBadger(t, dir, Options{MaxOutputBytes: 256})
	got, err := s.GetBox("alpha")
	must(t, err)
	sameBox(t, got, a)
	l, _ := s.ListBoxes()
	if g := boxIDs(l); len(g) != 2 || g[0] != "box_b" {
		t.Fatalf("boxes after reopen: %v", g)
	}
	xs, err := s.ListExecs("box_a")
	must(t, err)
	if g := execIDs(xs); len(g) != 2 || g[0] != "exec_2" {
		t.Fatalf("execs after reopen: %v", g)
	}
	gx, _ := s.GetExec("exec_1")
	x.DroppedEvents, x.DroppedBytes = 12, 12*32
	sameExec(t, gx, x)
	evs, _ := s.Events("exec_1", 0)
	sameEvents(t, evs, want[12:])

	// The stream's bookkeeping survived: order is still enforced, retention
	// carries on from where it was.
	wantErr(t, s.AppendEvent("exec_1", logEv(19, Stdout, "again")), errdefs.ValidationError, "")
	must(t, s.AppendEvent("exec_1", logEv(20, Stdout, strings.Repeat("n", 32))))
	must(t, s.AppendEvent("exec_1", exitEv(21, `{"exit_code":0}`)))
	evs, _ = s.Events("exec_1", 0)
	if len(evs) != 9 || evs[0].Seq != 13 || evs[8].Type != EventExit {
		t.Fatalf("after reopen and append: %d events from %d", len(evs), evs[0].Seq)
	}
	wantErr(t, s.PutBox(box("box_c", "alpha", 2)), errdefs.NameAlreadyExists, "")
}

func TestBadgerSecondOpenFails(t *testing.T) {
	dir := t.TempDir()
	s := openBadger(t, dir, Options{})
	must(t, s.PutBox(box("box_a", "a", 0)))

	for range 2 {
		s2, err := Open(dir, Options{Logger: testLogger()})
		if err == nil {
			s2.Close()
			t.Fatal("second Open of an open data dir succeeded")
		}
		wantErr(t, err, errdefs.RuntimeError, "")
		if msg := err.Error(); !strings.Contains(msg, "in use by another engine") || !strings.Contains(msg, dir) ||
			!strings.Contains(msg, fmt.Sprintf("pid %d", os.Getpid())) {
			t.Fatalf("unclear error: %v", err)
		}
	}
	// The first store is unharmed and keeps working.
	must(t, s.PutBox(box("box_b", "b", 1)))
	if _, err := s.GetBox("a"); err != nil {
		t.Fatal(err)
	}
	must(t, s.Close())
	// Released on Close.
	s3 := openBadger(t, dir, Options{})
	if l, _ := s3.ListBoxes(); len(l) != 2 {
		t.Fatalf("%d boxes after reopen", len(l))
	}
}

func TestBadgerClosed(t *testing.T) {
	s := openBadger(t, t.TempDir(), Options{})
	must(t, s.PutBox(box("box_a", "", 0)))
	must(t, s.Close())
	must(t, s.Close())
	wantErr(t, s.PutBox(box("box_b", "", 0)), errdefs.RuntimeError, "")
	_, err := s.GetBox("box_a")
	wantErr(t, err, errdefs.RuntimeError, "")
	_, err = s.ListBoxes()
	wantErr(t, err, errdefs.RuntimeError, "")
	wantErr(t, s.AppendEvent("x", logEv(0, Stdout, "")), errdefs.RuntimeError, "")
	_, err = s.Events("x", 0)
	wantErr(t, err, errdefs.RuntimeError, "")
}

// TestBadgerCloseWhileBusy closes the store under concurrent writers: every
// call either succeeds or fails cleanly, and what succeeded is there after
// reopen.
func TestBadgerCloseWhileBusy(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Logger: testLogger()})
	must(t, err)
	must(t, s.PutBox(box("box_a", "", 0)))
	var wg sync.WaitGroup
	last := make([]int, 4)
	stopErr := make([]error, 4)
	for w := range 4 {
		xid := fmt.Sprintf("exec_%d", w)
		must(t, s.PutExec(execRec(xid, "box_a", w)))
		last[w] = -1
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				if err := s.AppendEvent(xid, logEv(i, Stdout, "x")); err != nil {
					stopErr[w] = err
					return
				}
				last[w] = i
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	must(t, s.Close())
	wg.Wait()
	for w, err := range stopErr {
		wantErr(t, err, errdefs.RuntimeError, "")
		if !strings.Contains(err.Error(), "closed") || last[w] < 0 {
			t.Fatalf("writer %d: %d appends, then %v", w, last[w]+1, err)
		}
	}
	s = openBadger(t, dir, Options{})
	for w := range 4 {
		evs, err := s.Events(fmt.Sprintf("exec_%d", w), 0)
		must(t, err)
		if len(evs) != last[w]+1 {
			t.Fatalf("exec_%d: %d events after reopen, %d were acknowledged", w, len(evs), last[w]+1)
		}
	}
}

// TestBadgerResumesInterruptedDelete simulates a crash after a box's record
// is deleted but before its execs and events are purged.
func TestBadgerResumesInterruptedDelete(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Logger: testLogger()})
	must(t, err)
	must(t, s.PutBox(box("box_a", "", 0)))
	must(t, s.PutBox(box("box_b", "", 0)))
	for i := range 3 {
		xid := fmt.Sprintf("exec_%d", i)
		must(t, s.PutExec(execRec(xid, "box_a", i)))
		for seq := range 700 { // more than one purge batch
			must(t, s.AppendEvent(xid, logEv(seq, Stdout, "o")))
		}
	}
	must(t, s.PutExec(execRec("exec_b", "box_b", 0)))
	must(t, s.AppendEvent("exec_b", logEv(0, Stdout, "keep")))
	must(t, s.deleteBoxRecord("box_a"))
	if n := s.keyCount(pGoneBox); n != 1 {
		t.Fatalf("%d box markers", n)
	}
	must(t, s.Close())

	s = openBadger(t, dir, Options{})
	for i := range 3 {
		_, err := s.GetExec(fmt.Sprintf("exec_%d", i))
		wantErr(t, err, errdefs.ExecNotFound, "")
	}
	for prefix, want := range map[string]int{pGoneBox: 0, pGoneExec: 0, pExec: 1, pMeta: 1, pBoxExec: 1, pEvent: 1, pBox: 1} {
		if n := s.keyCount(prefix); n != want {
			t.Errorf("%d keys under %q after recovery, want %d", n, prefix, want)
		}
	}
	if evs, _ := s.Events("exec_b", 0); len(evs) != 1 || evs[0].Data != "keep" {
		t.Fatalf("exec_b events %+v", evs)
	}
}

func TestBadgerDeleteManyExecs(t *testing.T) {
	s := openBadger(t, t.TempDir(), Options{})
	must(t, s.PutBox(box("box_a", "", 0)))
	const n = purgeBatch*2 + 17
	for i := range n {
		must(t, s.PutExec(execRec(fmt.Sprintf("exec_%04d", i), "box_a", i)))
	}
	must(t, s.AppendEvent("exec_0000", logEv(0, Stdout, "x")))
	must(t, s.DeleteBox("box_a"))
	for _, p := range []string{pExec, pMeta, pBoxExec, pEvent, pGoneBox, pGoneExec} {
		if k := s.keyCount(p); k != 0 {
			t.Errorf("%d keys left under %q", k, p)
		}
	}
}

// TestBadgerLargeEviction appends one chunk that evicts more events than one
// transaction may delete.
func TestBadgerLargeEviction(t *testing.T) {
	s := openBadger(t, t.TempDir(), Options{MaxOutputBytes: 5000})
	must(t, s.PutBox(box("box_a", "", 0)))
	must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
	for i := range 5000 {
		must(t, s.AppendEvent("exec_1", logEv(i, Stdout, "1")))
	}
	must(t, s.AppendEvent("exec_1", logEv(5000, Stderr, strings.Repeat("B", 4000))))
	evs, _ := s.Events("exec_1", 0)
	if len(evs) != 1001 || evs[0].Seq != 4000 || logBytes(evs) != 5000 {
		t.Fatalf("%d events from %d, %d bytes", len(evs), evs[0].Seq, logBytes(evs))
	}
	x, _ := s.GetExec("exec_1")
	if x.DroppedEvents != 4000 || x.DroppedBytes != 4000 {
		t.Fatalf("dropped %d / %d", x.DroppedEvents, x.DroppedBytes)
	}
	if n := s.storedEvents("exec_1"); n != 1001 {
		t.Fatalf("%d records", n)
	}
}

const crashChildEnv = "BOXRUN_STATE_CRASH_CHILD_DIR"

// TestBadgerCrashDurability re-executes the test binary as a child that
// opens the store, writes a box, an exec and events, says "ready" and keeps
// appending until the parent SIGKILLs it. Everything acknowledged before
// "ready" must be there after reopening, and the event stream must be an
// unbroken prefix of what the child wrote.
func TestBadgerCrashDurability(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadgerCrashDurability$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	defer cmd.Process.Kill()

	lines := bufio.NewScanner(out)
	ready := make(chan string, 1)
	go func() {
		for lines.Scan() {
			if l := lines.Text(); strings.HasPrefix(l, "ready") {
				ready <- l
				return
			}
		}
		close(ready)
	}()
	var readyLine string
	select {
	case l, ok := <-ready:
		if !ok {
			t.Fatal("child exited without saying ready")
		}
		readyLine = l
	case <-time.After(60 * time.Second):
		t.Fatal("child not ready after 60s")
	}

	// While the child holds the store, nobody else may open it.
	if s2, err := Open(dir, Options{Logger: testLogger()}); err == nil {
		s2.Close()
		t.Fatal("Open succeeded while the child holds the store")
	} else if !strings.Contains(err.Error(), "in use by another engine") ||
		!strings.Contains(err.Error(), fmt.Sprintf("pid %d", cmd.Process.Pid)) {
		t.Fatalf("unclear error while the child holds the store: %v", err)
	}

	time.Sleep(150 * time.Millisecond) // let it append mid-flight
	must(t, cmd.Process.Signal(syscall.SIGKILL))
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child did not die of SIGKILL: %v", err)
	}

	s := openBadger(t, dir, Options{})
	b, err := s.GetBox("crashy")
	must(t, err)
	if b.ID != "box_crash" || b.Status != Running || b.Env["K"] != "v" {
		t.Fatalf("box after crash: %+v", b)
	}
	x, err := s.GetExec("exec_crash")
	must(t, err)
	if x.BoxID != "box_crash" || x.Status != ExecRunning || len(x.Cmd) != 2 {
		t.Fatalf("exec after crash: %+v", x)
	}
	fin, err := s.GetExec("exec_done")
	must(t, err)
	if fin.Status != ExecSucceeded || fin.ExitCode == nil || *fin.ExitCode != 0 {
		t.Fatalf("finished exec after crash: %+v", fin)
	}
	evs, err := s.Events("exec_crash", 0)
	must(t, err)
	var acked int
	fmt.Sscanf(readyLine, "ready %d", &acked)
	if acked == 0 || len(evs) < acked {
		t.Fatalf("%d events after crash, %d were acknowledged before ready", len(evs), acked)
	}
	for i, ev := range evs {
		if ev.Seq != i || ev.Data != crashChunk(i) {
			t.Fatalf("event %d after crash: %+v", i, ev)
		}
	}
	t.Logf("child acknowledged %d events before ready; %d survived SIGKILL", acked, len(evs))
	// The store is usable: the stream continues.
	must(t, s.AppendEvent("exec_crash", exitEv(len(evs), `{"exit_code":-1,"error":"engine crashed"}`)))
}

func crashChunk(i int) string { return fmt.Sprintf("line %d\n", i) }

func crashChild(dir string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(3)
	}
	s, err := Open(dir, Options{})
	if err != nil {
		fail(err)
	}
	b := box("box_crash", "crashy", 0)
	b.Env = map[string]string{"K": "v"}
	if err := s.PutBox(b); err != nil {
		fail(err)
	}
	x := execRec("exec_crash", "box_crash", 0)
	if err := s.PutExec(x); err != nil {
		fail(err)
	}
	done := execRec("exec_done", "box_crash", 1)
	if err := s.PutExec(done); err != nil {
		fail(err)
	}
	if err := s.AppendEvent("exec_done", exitEv(0, `{"exit_code":0}`)); err != nil {
		fail(err)
	}
	code := 0
	done.Status, done.ExitCode = ExecSucceeded, &code
	if err := s.PutExec(done); err != nil {
		fail(err)
	}
	const before = 500
	for i := range before {
		if err := s.AppendEvent("exec_crash", logEv(i, Stdout, crashChunk(i))); err != nil {
			fail(err)
		}
	}
	fmt.Printf("ready %d\n", before)
	for i := before; ; i++ {
		if err := s.AppendEvent("exec_crash", logEv(i, Stdout, crashChunk(i))); err != nil {
			fail(err)
		}
	}
}

// TestBadgerChattyBounded appends many small events to one exec with the
// default caps scaled down, and checks that the data dir stays bounded.
func TestBadgerChattyBounded(t *testing.T) {
	n := 200_000
	if testing.Short() {
		t.Skip("long")
	}
	if raceEnabled {
		n = 40_000 // the race detector makes appends ~10x slower
	}
	if v := os.Getenv("BOXRUN_STATE_CHATTY_EVENTS"); v != "" {
		n, _ = strconv.Atoi(v)
	}
	dir := t.TempDir()
	s := openBadger(t, dir, Options{MaxOutputBytes: 64 << 10})
	must(t, s.PutBox(box("box_a", "", 0)))
	must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
	chunk := strings.Repeat("c", 40) + "\n"
	start := time.Now()
	maxSize := int64(0)
	for i := range n {
		must(t, s.AppendEvent("exec_1", logEv(i, Stdout, chunk)))
		if i%20000 == 0 {
			maxSize = max(maxSize, dirSize(t, dir))
		}
	}
	el := time.Since(start)
	maxSize = max(maxSize, dirSize(t, dir))
	x, _ := s.GetExec("exec_1")
	evs, _ := s.Events("exec_1", 0)
	t.Logf("%d events in %v (%v/event); kept %d (%d B), dropped %d; data dir peak %d MiB allocated",
		n, el, el/time.Duration(n), len(evs), logBytes(evs), x.DroppedEvents, maxSize>>20)
	if logBytes(evs) > 64<<10 || x.DroppedEvents+len(evs) != n {
		t.Fatalf("kept %d events / %d bytes, dropped %d", len(evs), logBytes(evs), x.DroppedEvents)
	}
	// Each append writes ~200 B to the log (event, stream record, the drop's
	// tombstone, txn marker): ~40 MB of churn at 200k events, ~200 MB at 1M.
	// What stays on disk must not grow with n (measured: ~4 MiB).
	if maxSize > 24<<20 {
		t.Fatalf("data dir grew to %d MiB", maxSize>>20)
	}
}

func dirSize(t *testing.T, dir string) int64 {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			fi, err := d.Info()
			if err != nil {
				return nil // compaction removed it meanwhile
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512 // allocated, not apparent, size
			} else {
				n += fi.Size()
			}
		}
		return nil
	})
	if err != nil {
		t.Logf("walk: %v", err)
	}
	return n
}

func BenchmarkAppendEvent(b *testing.B) {
	for _, c := range []struct {
		name string
		open func(b *testing.B) Store
	}{
		{"badger", func(b *testing.B) Store {
			s, err := Open(b.TempDir(), Options{MaxOutputBytes: 1 << 20, Logger: testLogger()})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			return s
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			s := c.open(b)
			if err := s.PutBox(box("box_a", "", 0)); err != nil {
				b.Fatal(err)
			}
			if err := s.PutExec(execRec("exec_1", "box_a", 0)); err != nil {
				b.Fatal(err)
			}
			chunk := strings.Repeat("b", 80)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := s.AppendEvent("exec_1", Event{Seq: i, Type: EventLog, Stream: Stdout, Data: chunk}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// EventsPage reads about maxBytes of event data at a time (at least one
// event), in order; pages read one after the other are all the events.
func TestEventsPage(t *testing.T) {
	s := openBadger(t, t.TempDir(), Options{MaxOutputBytes: 8 << 20})
	must(t, s.PutBox(box("box_a", "", 0)))
	must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
	var want []Event
	for i := range 100 {
		ev := logEv(i, Stdout, strings.Repeat(strconv.Itoa(i%10), 10000+i))
		must(t, s.AppendEvent("exec_1", ev))
		want = append(want, ev)
	}
	var got []Event
	for next := 0; ; {
		page, err := s.EventsPage("exec_1", next, 64<<10)
		must(t, err)
		if len(page) == 0 {
			break
		}
		size := 0
		for _, ev := range page {
			size += len(ev.Data)
		}
		if size-len(page[len(page)-1].Data) >= 64<<10 {
			t.Fatalf("a page of %d events, %d bytes, went on past 64 KiB", len(page), size)
		}
		got = append(got, page...)
		next = page[len(page)-1].Seq + 1
	}
	if len(got) != len(want) {
		t.Fatalf("pages held %d events, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].Seq != want[i].Seq || got[i].Data != want[i].Data {
			t.Fatalf("event %d differs", i)
		}
	}
	if one, err := s.EventsPage("exec_1", 0, 1); err != nil || len(one) != 1 {
		t.Fatalf("a page smaller than one event: %d events, %v", len(one), err)
	}
	if all, err := s.EventsPage("exec_1", 0, 0); err != nil || len(all) != len(want) {
		t.Fatalf("no limit: %d events, %v", len(all), err)
	}
}
