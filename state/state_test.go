package state

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// inspector is what the store exposes to these tests.
type inspector interface {
	Store
	storedEvents(execID string) int
	retentionWork() int64
}

type ctor struct {
	name string
	open func(t *testing.T, o Options) inspector
}

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func openBadger(t *testing.T, dir string, o Options) *Badger {
	t.Helper()
	if o.Logger == nil {
		o.Logger = testLogger()
	}
	s, err := Open(dir, o)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

var ctors = []ctor{
	{"badger", func(t *testing.T, o Options) inspector { return openBadger(t, t.TempDir(), o) }},
}

// both runs a behavioural test against every implementation (now Badger
// alone; kept as a table so another Store gets the same tests).
func both(t *testing.T, o Options, fn func(t *testing.T, s inspector)) {
	for _, c := range ctors {
		t.Run(c.name, func(t *testing.T) { fn(t, c.open(t, o)) })
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// wantErr checks an error's code and, when msg is not "", its message.
func wantErr(t *testing.T, err error, code errdefs.Code, msg string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %s", code)
	}
	var e *errdefs.Error
	if !errors.As(err, &e) {
		t.Fatalf("got %T %v, want *errdefs.Error %s", err, err, code)
	}
	if e.Code != code {
		t.Fatalf("got code %s (%v), want %s", e.Code, err, code)
	}
	if msg != "" && e.Message != msg {
		t.Fatalf("got message %q, want %q", e.Message, msg)
	}
}

var t0 = time.Date(2026, 2, 10, 12, 0, 0, 123456789, time.UTC)

func box(id, name string, age int) Box {
	started := t0.Add(time.Duration(age)*time.Second + time.Millisecond)
	return Box{
		ID: id, Name: name, Status: Running, Image: "python:3.12-slim", ImageID: "sha256:abc",
		CPU: 2, MemoryMB: 1024, DiskSizeGB: 8, Network: true, Workdir: "/root",
		Env: map[string]string{"A": "1"}, RuntimeID: "fc:123",
		CreatedAt: t0.Add(time.Duration(age) * time.Second), StartedAt: &started,
	}
}

func execRec(id, boxID string, age int) Exec {
	return Exec{
		ID: id, BoxID: boxID, Status: ExecRunning, Cmd: []string{"echo", "hi"},
		CreatedAt: t0.Add(time.Duration(age) * time.Second),
	}
}

// sameBox compares records; times by instant (a store may change their zone).
func sameBox(t *testing.T, got, want Box) {
	t.Helper()
	if !got.CreatedAt.Equal(want.CreatedAt) || !eqTimePtr(got.StartedAt, want.StartedAt) || !eqTimePtr(got.StoppedAt, want.StoppedAt) {
		t.Fatalf("box times differ:\n got %+v\nwant %+v", got, want)
	}
	got.CreatedAt, got.StartedAt, got.StoppedAt = want.CreatedAt, want.StartedAt, want.StoppedAt
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("box differs:\n got %+v\nwant %+v", got, want)
	}
}

func sameExec(t *testing.T, got, want Exec) {
	t.Helper()
	if !got.CreatedAt.Equal(want.CreatedAt) || !eqTimePtr(got.FinishedAt, want.FinishedAt) {
		t.Fatalf("exec times differ:\n got %+v\nwant %+v", got, want)
	}
	got.CreatedAt, got.FinishedAt = want.CreatedAt, want.FinishedAt
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("exec differs:\n got %+v\nwant %+v", got, want)
	}
}

func eqTimePtr(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Equal(*b)
}

func ids[T any](xs []T, id func(T) string) []string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = id(x)
	}
	return out
}

func boxIDs(bs []Box) []string   { return ids(bs, func(b Box) string { return b.ID }) }
func execIDs(xs []Exec) []string { return ids(xs, func(x Exec) string { return x.ID }) }

func TestBoxes(t *testing.T) {
	both(t, Options{}, func(t *testing.T, s inspector) {
		if l, err := s.ListBoxes(); err != nil || len(l) != 0 {
			t.Fatalf("empty store lists %v, %v", l, err)
		}
		a, b, c := box("box_a", "alpha", 0), box("box_b", "", 2), box("box_c", "gamma", 1)
		for _, x := range []Box{a, b, c} {
			must(t, s.PutBox(x))
		}
		got, err := s.GetBox("box_a")
		must(t, err)
		sameBox(t, got, a)
		got, err = s.GetBox("gamma")
		must(t, err)
		sameBox(t, got, c)
		_, err = s.GetBox("nope")
		wantErr(t, err, errdefs.BoxNotFound, "Box 'nope' not found")

		l, err := s.ListBoxes()
		must(t, err)
		if g, w := boxIDs(l), []string{"box_b", "box_c", "box_a"}; !reflect.DeepEqual(g, w) {
			t.Fatalf("list order %v, want newest first %v", g, w)
		}

		// Replace keeps one record; returned records are copies.
		a.Status, a.StoppedAt = Stopped, &t0
		must(t, s.PutBox(a))
		got, _ = s.GetBox("alpha")
		sameBox(t, got, a)
		got.Env["A"] = "mutated"
		again, _ := s.GetBox("alpha")
		if again.Env["A"] != "1" {
			t.Fatal("mutating a returned record changed the store")
		}
		l, _ = s.ListBoxes()
		if len(l) != 3 {
			t.Fatalf("after replace: %d boxes", len(l))
		}

		must(t, s.DeleteBox("box_a"))
		_, err = s.GetBox("box_a")
		wantErr(t, err, errdefs.BoxNotFound, "Box 'box_a' not found")
		_, err = s.GetBox("alpha")
		wantErr(t, err, errdefs.BoxNotFound, "Box 'alpha' not found")
		wantErr(t, s.DeleteBox("box_a"), errdefs.BoxNotFound, "Box 'box_a' not found")
		l, _ = s.ListBoxes()
		if g, w := boxIDs(l), []string{"box_b", "box_c"}; !reflect.DeepEqual(g, w) {
			t.Fatalf("after delete %v, want %v", g, w)
		}
		wantErr(t, s.PutBox(Box{Name: "x"}), errdefs.ValidationError, "")
	})
}

func TestNames(t *testing.T) {
	both(t, Options{}, func(t *testing.T, s inspector) {
		must(t, s.PutBox(box("box_1", "web", 0)))
		must(t, s.PutBox(box("box_2", "", 1)))

		wantErr(t, s.PutBox(box("box_3", "web", 2)), errdefs.NameAlreadyExists, "A box with name 'web' already exists")
		// A name equal to another box's id.
		wantErr(t, s.PutBox(box("box_3", "box_2", 2)), errdefs.NameAlreadyExists, "A box with name 'box_2' already exists")
		// Taking an existing name by renaming is refused too.
		wantErr(t, s.PutBox(box("box_2", "web", 1)), errdefs.NameAlreadyExists, "")
		if _, err := s.GetBox("box_3"); err == nil {
			t.Fatal("a refused put stored the box")
		}
		// A box may be named its own id, and re-putting keeps its name.
		must(t, s.PutBox(box("box_2", "box_2", 1)))
		must(t, s.PutBox(box("box_1", "web", 0)))

		// Renaming frees the old name.
		must(t, s.PutBox(box("box_1", "api", 0)))
		_, err := s.GetBox("web")
		wantErr(t, err, errdefs.BoxNotFound, "Box 'web' not found")
		if b, err := s.GetBox("api"); err != nil || b.ID != "box_1" {
			t.Fatalf("GetBox(api) = %v, %v", b.ID, err)
		}
		must(t, s.PutBox(box("box_3", "web", 2)))
		if b, _ := s.GetBox("web"); b.ID != "box_3" {
			t.Fatalf("web is %s, want box_3", b.ID)
		}
		// Clearing a name frees it.
		must(t, s.PutBox(box("box_1", "", 0)))
		must(t, s.PutBox(box("box_4", "api", 3)))
		// Removing a box frees its name.
		must(t, s.DeleteBox("box_4"))
		must(t, s.PutBox(box("box_5", "api", 4)))
		if b, _ := s.GetBox("api"); b.ID != "box_5" {
			t.Fatalf("api is %s, want box_5", b.ID)
		}
		// Lookup is by id first, then by name.
		must(t, s.PutBox(box("box_6", "box_7x", 5)))
		must(t, s.PutBox(box("box_7x", "", 6)))
		if b, _ := s.GetBox("box_7x"); b.ID != "box_7x" {
			t.Fatalf("id lookup lost to name lookup: %s", b.ID)
		}
	})
}

func TestConcurrentSameName(t *testing.T) {
	both(t, Options{}, func(t *testing.T, s inspector) {
		const rounds, racers = 10, 16
		for r := range rounds {
			name := fmt.Sprintf("shared-%d", r)
			var wg sync.WaitGroup
			errs := make([]error, racers)
			start := make(chan struct{})
			for i := range racers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					errs[i] = s.PutBox(box(fmt.Sprintf("box_%d_%d", r, i), name, r))
				}()
			}
			close(start)
			wg.Wait()
			winner := -1
			for i, err := range errs {
				if err == nil {
					if winner >= 0 {
						t.Fatalf("round %d: racers %d and %d both got name %s", r, winner, i, name)
					}
					winner = i
					continue
				}
				wantErr(t, err, errdefs.NameAlreadyExists, "")
			}
			if winner < 0 {
				t.Fatalf("round %d: nobody got the name", r)
			}
			b, err := s.GetBox(name)
			must(t, err)
			if want := fmt.Sprintf("box_%d_%d", r, winner); b.ID != want {
				t.Fatalf("round %d: name resolves to %s, winner was %s", r, b.ID, want)
			}
		}
		l, _ := s.ListBoxes()
		if len(l) != rounds {
			t.Fatalf("%d boxes stored, want %d (one per round)", len(l), rounds)
		}
	})
}

func TestExecs(t *testing.T) {
	both(t, Options{}, func(t *testing.T, s inspector) {
		wantErr(t, s.PutExec(execRec("exec_0", "box_a", 0)), errdefs.BoxNotFound, "Box 'box_a' not found")
		must(t, s.PutBox(box("box_a", "a", 0)))
		must(t, s.PutBox(box("box_b", "b", 1)))
		if l, err := s.ListExecs("box_a"); err != nil || len(l) != 0 {
			t.Fatalf("no execs yet: %v, %v", l, err)
		}
		_, err := s.ListExecs("box_zz")
		wantErr(t, err, errdefs.BoxNotFound, "Box 'box_zz' not found")

		x1, x2, x3 := execRec("exec_1", "box_a", 0), execRec("exec_2", "box_a", 2), execRec("exec_3", "box_a", 1)
		x2.Env, x2.Workdir, x2.TimeoutMS = map[string]string{"K": "v"}, "/tmp", 5000
		for _, x := range []Exec{x1, x2, x3, execRec("exec_other", "box_b", 3)} {
			must(t, s.PutExec(x))
		}
		got, err := s.GetExec("exec_1")
		must(t, err)
		sameExec(t, got, x1)
		if got.Env != nil || got.ExitCode != nil || got.FinishedAt != nil {
			t.Fatalf("unset fields came back set: %+v", got)
		}
		got, _ = s.GetExec("exec_2")
		sameExec(t, got, x2)
		_, err = s.GetExec("exec_9")
		wantErr(t, err, errdefs.ExecNotFound, "Exec 'exec_9' not found")

		l, err := s.ListExecs("box_a")
		must(t, err)
		if g, w := execIDs(l), []string{"exec_2", "exec_3", "exec_1"}; !reflect.DeepEqual(g, w) {
			t.Fatalf("ListExecs %v, want newest first %v", g, w)
		}

		// Finish one: replace keeps one record.
		code, fin := 3, t0.Add(time.Minute)
		x1.Status, x1.ExitCode, x1.FinishedAt, x1.ErrorMessage = ExecFailed, &code, &fin, "boom"
		must(t, s.PutExec(x1))
		got, _ = s.GetExec("exec_1")
		sameExec(t, got, x1)
		if l, _ := s.ListExecs("box_a"); len(l) != 3 {
			t.Fatalf("after replace %d execs", len(l))
		}
		wantErr(t, s.PutExec(Exec{BoxID: "box_a"}), errdefs.ValidationError, "")
	})
}

func logEv(seq int, stream, data string) Event {
	return Event{Seq: seq, Type: EventLog, Stream: stream, Data: data, Time: t0.Add(time.Duration(seq) * time.Millisecond)}
}

func exitEv(seq int, data string) Event {
	return Event{Seq: seq, Type: EventExit, Data: data, Time: t0.Add(time.Hour)}
}

func sameEvents(t *testing.T, got, want []Event) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d events, want %d:\n got %+v\nwant %+v", len(got), len(want), got, want)
	}
	for i := range got {
		g, w := got[i], want[i]
		if !g.Time.Equal(w.Time) {
			t.Fatalf("event %d time %v, want %v", i, g.Time, w.Time)
		}
		g.Time = w.Time
		if g != w {
			t.Fatalf("event %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
}

func TestEvents(t *testing.T) {
	both(t, Options{}, func(t *testing.T, s inspector) {
		must(t, s.PutBox(box("box_a", "", 0)))
		must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
		if evs, err := s.Events("exec_1", 0); err != nil || len(evs) != 0 {
			t.Fatalf("no events yet: %v %v", evs, err)
		}
		var want []Event
		for i := range 10 {
			stream := Stdout
			if i%3 == 1 {
				stream = Stderr
			}
			data := fmt.Sprintf("chunk %d\n", i)
			switch i {
			case 4:
				data = "\xff\xfe not utf-8 \x00\x80" // raw bytes must round-trip
			case 5:
				data = "héllo, partial rune \xe2\x82"
			case 6:
				data = ""
			}
			ev := logEv(i, stream, data)
			must(t, s.AppendEvent("exec_1", ev))
			want = append(want, ev)
		}
		ex := exitEv(10, `{"exit_code":0}`)
		must(t, s.AppendEvent("exec_1", ex))
		want = append(want, ex)

		got, err := s.Events("exec_1", 0)
		must(t, err)
		sameEvents(t, got, want)
		got, err = s.Events("exec_1", 7)
		must(t, err)
		sameEvents(t, got, want[7:])
		got, _ = s.Events("exec_1", 10)
		sameEvents(t, got, want[10:])
		got, _ = s.Events("exec_1", 11)
		sameEvents(t, got, nil)
		got, _ = s.Events("exec_1", -5)
		sameEvents(t, got, want)

		wantErr(t, s.AppendEvent("exec_1", logEv(11, Stdout, "late")), errdefs.ExecAlreadyFinished, "Exec already finished")
		wantErr(t, s.AppendEvent("exec_1", exitEv(11, "{}")), errdefs.ExecAlreadyFinished, "")
		wantErr(t, s.AppendEvent("exec_nope", logEv(0, Stdout, "x")), errdefs.ExecNotFound, "Exec 'exec_nope' not found")
		_, err = s.Events("exec_nope", 0)
		wantErr(t, err, errdefs.ExecNotFound, "Exec 'exec_nope' not found")

		// Ordering and shape checks on a second exec; gaps are allowed.
		must(t, s.PutExec(execRec("exec_2", "box_a", 1)))
		must(t, s.AppendEvent("exec_2", Event{Seq: 0, Type: EventLog, Stream: Stdout, Data: "a"}))
		wantErr(t, s.AppendEvent("exec_2", logEv(0, Stdout, "dup")), errdefs.ValidationError, "")
		must(t, s.AppendEvent("exec_2", logEv(3, Stderr, "gap")))
		wantErr(t, s.AppendEvent("exec_2", logEv(2, Stdout, "back")), errdefs.ValidationError, "")
		wantErr(t, s.AppendEvent("exec_2", Event{Seq: 4, Type: "weird"}), errdefs.ValidationError, "")
		wantErr(t, s.AppendEvent("exec_2", Event{Seq: 4, Type: EventLog, Stream: "stdin"}), errdefs.ValidationError, "")
		wantErr(t, s.AppendEvent("exec_2", Event{Seq: 4, Type: EventExit, Stream: Stdout}), errdefs.ValidationError, "")
		must(t, s.AppendEvent("exec_2", exitEv(4, `{"exit_code":-1,"error":"lost"}`)))
		got, _ = s.Events("exec_2", 0)
		if len(got) != 3 || got[0].Time.IsZero() || got[1].Seq != 3 || got[2].Type != EventExit {
			t.Fatalf("exec_2 events %+v", got)
		}
		got, _ = s.Events("exec_2", 1)
		if len(got) != 2 || got[0].Seq != 3 {
			t.Fatalf("exec_2 events from 1: %+v", got)
		}
		// The other exec's stream is untouched.
		if got, _ := s.Events("exec_1", 0); len(got) != 11 {
			t.Fatalf("exec_1 has %d events", len(got))
		}
	})
}

func TestDeleteBoxRemovesExecsAndEvents(t *testing.T) {
	both(t, Options{}, func(t *testing.T, s inspector) {
		for _, b := range []string{"box_a", "box_b"} {
			must(t, s.PutBox(box(b, "n"+b, 0)))
			for i := range 3 {
				xid := fmt.Sprintf("exec_%s_%d", b, i)
				must(t, s.PutExec(execRec(xid, b, i)))
				for seq := range 50 {
					must(t, s.AppendEvent(xid, logEv(seq, Stdout, "out")))
				}
			}
		}
		must(t, s.DeleteBox("box_a"))
		for i := range 3 {
			xid := fmt.Sprintf("exec_box_a_%d", i)
			_, err := s.GetExec(xid)
			wantErr(t, err, errdefs.ExecNotFound, "")
			_, err = s.Events(xid, 0)
			wantErr(t, err, errdefs.ExecNotFound, "")
			wantErr(t, s.AppendEvent(xid, logEv(50, Stdout, "x")), errdefs.ExecNotFound, "")
			if n := s.storedEvents(xid); n != 0 {
				t.Fatalf("%s: %d events left after DeleteBox", xid, n)
			}
		}
		_, err := s.ListExecs("box_a")
		wantErr(t, err, errdefs.BoxNotFound, "")
		wantErr(t, s.PutExec(execRec("exec_new", "box_a", 9)), errdefs.BoxNotFound, "")

		l, err := s.ListExecs("box_b")
		must(t, err)
		if len(l) != 3 {
			t.Fatalf("box_b lost execs: %v", execIDs(l))
		}
		for _, x := range l {
			if evs, _ := s.Events(x.ID, 0); len(evs) != 50 {
				t.Fatalf("%s lost events: %d", x.ID, len(evs))
			}
		}
		if bs, ok := s.(*Badger); ok {
			for prefix, want := range map[string]int{pExec: 3, pMeta: 3, pBoxExec: 3, pBox: 1, pName: 1, pGoneBox: 0, pGoneExec: 0, pEvent: 150} {
				if n := bs.keyCount(prefix); n != want {
					t.Errorf("%d keys under %q, want %d", n, prefix, want)
				}
			}
		}
	})
}

// retentionCase appends 160 log events of 64 bytes (10 KiB) with a 1 KiB cap,
// then the exit event.
func TestRetention(t *testing.T) {
	both(t, Options{MaxOutputBytes: 1024}, func(t *testing.T, s inspector) {
		must(t, s.PutBox(box("box_a", "", 0)))
		x := execRec("exec_1", "box_a", 0)
		must(t, s.PutExec(x))
		const n, size = 160, 64
		var all []Event
		for i := range n {
			stream := []string{Stdout, Stderr}[i%2]
			data := fmt.Sprintf("%04d%s", i, strings.Repeat(string(rune('a'+i%26)), size-4))
			ev := logEv(i, stream, data)
			must(t, s.AppendEvent("exec_1", ev))
			all = append(all, ev)
			// The cap holds after every append.
			evs, err := s.Events("exec_1", 0)
			must(t, err)
			if b := logBytes(evs); b > 1024 {
				t.Fatalf("after seq %d: %d log bytes stored, cap 1024", i, b)
			}
			if evs[len(evs)-1].Seq != i {
				t.Fatalf("after seq %d: newest stored is %d", i, evs[len(evs)-1].Seq)
			}
		}
		ex := exitEv(n, `{"exit_code":0}`)
		must(t, s.AppendEvent("exec_1", ex))
		all = append(all, ex)

		const kept = 1024 / size // 16
		evs, err := s.Events("exec_1", 0)
		must(t, err)
		sameEvents(t, evs, all[n-kept:])
		for i := 1; i < len(evs); i++ {
			if evs[i].Seq <= evs[i-1].Seq {
				t.Fatalf("seqs not strictly increasing: %d then %d", evs[i-1].Seq, evs[i].Seq)
			}
		}
		if b := logBytes(evs); b > 1024 {
			t.Fatalf("%d log bytes stored", b)
		}
		// Reading from a dropped seq starts at the oldest kept one.
		from, _ := s.Events("exec_1", 3)
		sameEvents(t, from, all[n-kept:])
		from, _ = s.Events("exec_1", 150)
		sameEvents(t, from, all[150:])

		got, err := s.GetExec("exec_1")
		must(t, err)
		if got.DroppedEvents != n-kept || got.DroppedBytes != int64((n-kept)*size) {
			t.Fatalf("dropped %d events / %d bytes, want %d / %d", got.DroppedEvents, got.DroppedBytes, n-kept, (n-kept)*size)
		}
		// The engine rewriting the record (finish) keeps the counters.
		code := 0
		x.Status, x.ExitCode = ExecSucceeded, &code
		must(t, s.PutExec(x))
		got, _ = s.GetExec("exec_1")
		if got.Status != ExecSucceeded || got.DroppedEvents != n-kept || got.DroppedBytes != int64((n-kept)*size) {
			t.Fatalf("after PutExec: %+v", got)
		}
		l, _ := s.ListExecs("box_a")
		if len(l) != 1 || l[0].DroppedEvents != n-kept {
			t.Fatalf("ListExecs counters: %+v", l)
		}
		if m := s.storedEvents("exec_1"); m != kept+1 {
			t.Fatalf("%d event records stored, want %d", m, kept+1)
		}
	})
}

func logBytes(evs []Event) int {
	n := 0
	for _, e := range evs {
		if e.Type == EventLog {
			n += len(e.Data)
		}
	}
	return n
}

func TestRetentionOversizedChunk(t *testing.T) {
	both(t, Options{MaxOutputBytes: 1024}, func(t *testing.T, s inspector) {
		must(t, s.PutBox(box("box_a", "", 0)))
		must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
		for i := range 3 {
			must(t, s.AppendEvent("exec_1", logEv(i, Stdout, strings.Repeat("x", 100))))
		}
		big := strings.Repeat("h", 1000) + strings.Repeat("T", 1000) + "END"
		must(t, s.AppendEvent("exec_1", logEv(3, Stderr, big)))
		evs, _ := s.Events("exec_1", 0)
		if len(evs) != 1 || evs[0].Seq != 3 || evs[0].Data != big[len(big)-1024:] {
			t.Fatalf("stored %d events, first %+v", len(evs), evs[0].Seq)
		}
		x, _ := s.GetExec("exec_1")
		if x.DroppedEvents != 3 || x.DroppedBytes != 300+int64(len(big)-1024) {
			t.Fatalf("dropped %d / %d", x.DroppedEvents, x.DroppedBytes)
		}
		must(t, s.AppendEvent("exec_1", logEv(4, Stdout, "tail")))
		must(t, s.AppendEvent("exec_1", exitEv(5, `{"exit_code":0}`)))
		evs, _ = s.Events("exec_1", 0)
		if len(evs) != 2 || evs[0].Data != "tail" || evs[1].Type != EventExit {
			t.Fatalf("events %+v", evs)
		}
	})
}

func TestRetentionEventCap(t *testing.T) {
	both(t, Options{MaxOutputEvents: 10}, func(t *testing.T, s inspector) {
		must(t, s.PutBox(box("box_a", "", 0)))
		must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
		for i := range 25 {
			must(t, s.AppendEvent("exec_1", logEv(i, Stdout, "z")))
		}
		must(t, s.AppendEvent("exec_1", exitEv(25, `{"exit_code":1}`)))
		evs, _ := s.Events("exec_1", 0)
		if len(evs) != 11 || evs[0].Seq != 15 || evs[10].Type != EventExit {
			t.Fatalf("events %+v", evs)
		}
		x, _ := s.GetExec("exec_1")
		if x.DroppedEvents != 15 || x.DroppedBytes != 15 {
			t.Fatalf("dropped %d / %d", x.DroppedEvents, x.DroppedBytes)
		}
	})
}

// TestRetentionWorkIsLinear checks that retention examines each dropped
// event once (plus one per append), instead of rescanning what is kept.
func TestRetentionWorkIsLinear(t *testing.T) {
	n := 20000
	if testing.Short() {
		n = 3000
	}
	both(t, Options{MaxOutputBytes: 1024}, func(t *testing.T, s inspector) {
		must(t, s.PutBox(box("box_a", "", 0)))
		must(t, s.PutExec(execRec("exec_1", "box_a", 0)))
		chunk := strings.Repeat("y", 32)
		lat := make([]time.Duration, n)
		start := time.Now()
		for i := range n {
			t1 := time.Now()
			must(t, s.AppendEvent("exec_1", logEv(i, Stdout, chunk)))
			lat[i] = time.Since(t1)
		}
		el := time.Since(start)
		// Dropping must not walk what earlier drops left behind (e.g. the
		// LSM tombstones of dropped events): the typical append late in a
		// long run costs what it cost early on. Medians shrug off GC and
		// compaction pauses; a walk over earlier drops grows with n and
		// shows up as a many-fold increase.
		w := n / 10
		early, late := median(lat[w:2*w]), median(lat[n-w:])
		if late > 4*early+100*time.Microsecond {
			t.Fatalf("median append latency grew from %v to %v over %d appends", early, late, n)
		}
		x, _ := s.GetExec("exec_1")
		if x.DroppedEvents != n-32 {
			t.Fatalf("dropped %d, want %d", x.DroppedEvents, n-32)
		}
		if w, limit := s.retentionWork(), int64(x.DroppedEvents+n); w > limit {
			t.Fatalf("retention examined %d events for %d drops over %d appends (limit %d)", w, x.DroppedEvents, n, limit)
		}
		if m := s.storedEvents("exec_1"); m != 32 {
			t.Fatalf("%d records stored, want 32", m)
		}
		t.Logf("%d appends in %v (%v/append; median %v early, %v late)", n, el, el/time.Duration(n), early, late)
	})
}

func median(ds []time.Duration) time.Duration {
	c := slices.Clone(ds)
	slices.Sort(c)
	return c[len(c)/2]
}

func TestDefaults(t *testing.T) {
	b := openBadger(t, t.TempDir(), Options{})
	if b.pol.maxBytes != 16<<20 || b.pol.maxEvents != DefaultMaxOutputEvents {
		t.Fatalf("default policy %+v", b.pol)
	}
}
