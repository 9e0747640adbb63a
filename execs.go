package boxrun

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/boxrun/boxrun/errdefs"
	agentexec "github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/state"
)

// ExecInfo is the record of one command run in a box.
type ExecInfo struct {
	ID           string
	BoxID        string
	Status       string // "running", "succeeded", "failed", "canceled"
	Cmd          []string
	Env          map[string]string
	Workdir      string
	Timeout      time.Duration
	ExitCode     *int
	ErrorMessage string
	// Pid is the command's process id in the box (as StreamExec and
	// StartExec return it; 0 in a record read back later).
	Pid        int
	CreatedAt  time.Time
	FinishedAt *time.Time
	// DroppedEvents/DroppedBytes count output dropped from the stored log
	// to respect the retention cap (oldest first).
	DroppedEvents int
	DroppedBytes  int64
}

// liveExec is a running exec: its guest process and the wake-up channel of
// its followers.
type liveExec struct {
	proc     *agentexec.Process
	mu       sync.Mutex
	changed  chan struct{} // closed and replaced whenever an event is stored
	canceled bool
}

func (x *liveExec) wait() <-chan struct{} {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.changed
}

func (x *liveExec) notify() {
	x.mu.Lock()
	close(x.changed)
	x.changed = make(chan struct{})
	x.mu.Unlock()
}

// Stream starts a command and returns its events: output chunks in order,
// then exactly one exit event (none if ctx is canceled first); the channel
// is then closed. Every event is
// also stored, so ExecEvents can replay it later. Cancelling ctx kills the
// command in the guest. The caller must drain the channel (or cancel ctx):
// a reader that does not keep up slows the command down, like a pipe.
func (e *Engine) Stream(ctx context.Context, box string, spec ExecSpec) (<-chan Event, error) {
	_, out, err := e.StreamExec(ctx, box, spec)
	return out, err
}

// StreamExec is Stream that also returns the exec's record: its ID (for
// SignalExec and CancelExec) and its Pid in the box.
func (e *Engine) StreamExec(ctx context.Context, box string, spec ExecSpec) (*ExecInfo, <-chan Event, error) {
	return e.streamExec(ctx, box, spec, false)
}

// streamExec is StreamExec; late lets the agent hold back that the
// command started (agentexec.Command.LateStart), for Exec, which waits
// for the exit anyway: the returned info then comes up to 50 ms late.
func (e *Engine) streamExec(ctx context.Context, box string, spec ExecSpec, late bool) (*ExecInfo, <-chan Event, error) {
	out := make(chan Event, 16)
	info, err := e.startExec(ctx, box, spec, out, late)
	if err != nil {
		return nil, nil, err
	}
	return info, out, nil
}

// StartExec starts a command that runs on its own, independent of ctx once
// started; follow it with ExecEvents, end it with CancelExec.
func (e *Engine) StartExec(ctx context.Context, box string, spec ExecSpec) (*ExecInfo, error) {
	return e.startExec(ctx, box, spec, nil, false)
}

func (e *Engine) startExec(ctx context.Context, box string, spec ExecSpec, out chan Event, late bool) (*ExecInfo, error) {
	if err := spec.validate(); err != nil {
		return nil, err
	}
	rec, lb, err := e.running(box)
	if err != nil {
		return nil, err
	}
	x := state.Exec{
		ID: newID("exec_"), BoxID: rec.ID, Status: state.ExecRunning, Cmd: spec.Cmd, Env: spec.Env,
		Workdir: spec.Workdir, TimeoutMS: spec.Timeout.Milliseconds(), CreatedAt: time.Now().UTC(),
	}
	if err := e.store.PutExec(x); err != nil {
		return nil, err
	}
	pctx := ctx
	if out == nil {
		pctx = context.WithoutCancel(ctx)
	}
	cmd := e.command(rec, lb, spec)
	cmd.LateStart = late
	p, err := lb.agent.Start(pctx, cmd)
	if err != nil {
		e.finishExec(&x, nil, 0, &agentexec.ExitStatus{Code: -1, Error: err.Error()})
		return nil, err
	}
	live := &liveExec{proc: p, changed: make(chan struct{})}
	e.mu.Lock()
	e.execs[x.ID] = live
	e.mu.Unlock()
	info := execInfoOf(x)
	info.Pid = p.Pid()
	xp := x // the pump owns its copy of the record from here on
	e.pumps.Add(1)
	go func() {
		defer e.pumps.Done()
		e.pump(ctx, &xp, live, out)
	}()
	return info, nil
}

// pump stores the process's events, wakes followers and feeds the owner's
// channel (if any) until the exit event.
//
// Output is cut where the guest's pipe reads end, which may be inside a
// multi-byte UTF-8 character; event data travels as JSON strings, where a
// half character becomes U+FFFD. So per stream an incomplete character at
// the end of a chunk (at most 3 bytes) is held back and put in front of
// that stream's next chunk, or sent as it is when no chunk follows within
// holdBackMax or the command exits. Seq numbers stay dense: a chunk that is
// only a held-back part is not an event.
func (e *Engine) pump(ctx context.Context, x *state.Exec, live *liveExec, out chan Event) {
	if out != nil {
		defer close(out)
	}
	seq := 0
	emit := func(stream string, data []byte) {
		se := state.Event{Seq: seq, Type: state.EventLog, Stream: stream, Data: string(data)}
		if err := e.store.AppendEvent(x.ID, se); err != nil {
			e.log.Warn("store exec output", "exec", x.ID, "err", err)
		}
		live.notify()
		seq++
		if out != nil && ctx.Err() == nil {
			select {
			case out <- eventOf(x.ID, se):
			case <-ctx.Done(): // the owner left; the process is being killed
			}
		}
	}
	var held tails
	// handle takes one event of the process; true once it was the exit.
	handle := func(ev agentexec.Event) bool {
		if ev.Exit == nil {
			if data := held.cut(ev.Stream, ev.Data, time.Now()); len(data) > 0 {
				emit(ev.Stream, data)
			}
			return false
		}
		for _, t := range held.all() {
			emit(t.stream, t.data)
		}
		e.mu.Lock()
		delete(e.execs, x.ID)
		e.mu.Unlock()
		live.mu.Lock()
		canceled := live.canceled
		live.mu.Unlock()
		if canceled {
			ev.Exit.Error = "canceled"
		}
		final := e.finishExec(x, live, seq, ev.Exit)
		if out != nil {
			select {
			case out <- final:
			case <-ctx.Done(): // the owner left
			}
		}
		return true
	}
	events := live.proc.Events()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	timer.Stop()
	var due <-chan time.Time // the timer's, while a tail is held
	for {
		select {
		case ev, ok := <-events:
			if !ok || handle(ev) {
				return
			}
		case <-due:
			// What came meanwhile goes first: it may be the rest.
			for drained := false; !drained; {
				select {
				case ev, ok := <-events:
					if !ok || handle(ev) {
						return
					}
				default:
					drained = true
				}
			}
			// The rest of the character did not come: what the program
			// printed goes out as it is (a program that answers in
			// binary and then waits for input must get its answer out).
			for _, t := range held.due(time.Now()) {
				emit(t.stream, t.data)
			}
		}
		timer.Stop()
		due = nil
		if at := held.next(); !at.IsZero() {
			timer.Reset(time.Until(at))
			due = timer.C
		}
	}
}

// holdBackMax bounds how long the start of a UTF-8 character at the end of
// a chunk waits for the rest of it.
const holdBackMax = 500 * time.Millisecond

// tails holds back, per stream, an incomplete UTF-8 character that ends a
// chunk of output, until the rest of it comes (it is put in front of the
// stream's next chunk), holdBackMax passes, or the command exits.
type tails struct {
	held    map[string][]byte
	since   map[string]time.Time // when the held character began to wait
	streams []string             // in the order they first held one
}

type tail struct {
	stream string
	data   []byte
}

// cut returns what of data (after the stream's held bytes) can go out now,
// holding back an incomplete last character.
func (t *tails) cut(stream string, data []byte, now time.Time) []byte {
	prev := t.held[stream]
	if len(prev) > 0 {
		data = append(prev, data...)
		t.held[stream] = nil
	}
	c := completeUTF8(data)
	if c == len(data) {
		delete(t.since, stream)
		return data
	}
	if t.held == nil {
		t.held, t.since = map[string][]byte{}, map[string]time.Time{}
	}
	if !slices.Contains(t.streams, stream) {
		t.streams = append(t.streams, stream)
	}
	// Still the same character (all of data is its start): it keeps
	// waiting from when it began; a new one waits from now.
	if len(prev) == 0 || c > 0 {
		t.since[stream] = now
	}
	t.held[stream] = append([]byte(nil), data[c:]...)
	return data[:c]
}

// next is when the first held character is due (zero: none is held).
func (t *tails) next() time.Time {
	var at time.Time
	for _, s := range t.streams {
		if len(t.held[s]) > 0 {
			if d := t.since[s].Add(holdBackMax); at.IsZero() || d.Before(at) {
				at = d
			}
		}
	}
	return at
}

// due takes the held characters that have waited holdBackMax at now.
func (t *tails) due(now time.Time) []tail {
	var out []tail
	for _, s := range t.streams {
		if len(t.held[s]) > 0 && !now.Before(t.since[s].Add(holdBackMax)) {
			out = append(out, tail{s, t.held[s]})
			t.held[s] = nil
			delete(t.since, s)
		}
	}
	return out
}

// all takes every held character (the command exited).
func (t *tails) all() []tail {
	var out []tail
	for _, s := range t.streams {
		if len(t.held[s]) > 0 {
			out = append(out, tail{s, t.held[s]})
			t.held[s] = nil
		}
	}
	return out
}

// completeUTF8 is the length of b without an incomplete UTF-8 character at
// its end (the start of a valid multi-byte sequence whose last bytes have
// not come yet). Invalid bytes count as complete: holding them back would
// not make them valid.
func completeUTF8(b []byte) int {
	for i := len(b) - 1; i >= 0 && i >= len(b)-utf8.UTFMax+1; i-- {
		if utf8.RuneStart(b[i]) {
			if utf8.FullRune(b[i:]) {
				return len(b)
			}
			return i
		}
	}
	return len(b)
}

// exitData is the JSON of a stored exit event, BoxRun's shape plus what a
// Go caller needs to rebuild the Event.
type exitData struct {
	ExitCode int    `json:"exit_code"`
	Error    string `json:"error,omitempty"`
	Signal   string `json:"signal,omitempty"`
	TimedOut bool   `json:"timed_out,omitempty"`
}

// finishExec stores the exit event and the exec's final status, in that
// order (a follower that sees the exit may briefly read "running").
func (e *Engine) finishExec(x *state.Exec, live *liveExec, seq int, st *agentexec.ExitStatus) Event {
	data, _ := json.Marshal(exitData{ExitCode: st.Code, Error: st.Error, Signal: st.Signal, TimedOut: st.TimedOut})
	se := state.Event{Seq: seq, Type: state.EventExit, Data: string(data)}
	if err := e.store.AppendEvent(x.ID, se); err != nil {
		e.log.Warn("store exec exit", "exec", x.ID, "err", err)
	}
	if live != nil {
		live.notify()
	}
	now := time.Now().UTC()
	code := st.Code
	x.ExitCode, x.FinishedAt = &code, &now
	switch {
	case st.Error == "canceled":
		x.Status, x.ExitCode = state.ExecCanceled, nil
	case st.TimedOut:
		x.Status, x.ErrorMessage = state.ExecFailed, "timed out"
	case st.Error != "":
		x.Status, x.ErrorMessage = state.ExecFailed, st.Error
	case st.Code == 0:
		x.Status = state.ExecSucceeded
	default:
		x.Status = state.ExecFailed
	}
	if err := e.store.PutExec(*x); err != nil && !errdefs.Is(err, errdefs.BoxNotFound) {
		e.log.Warn("store exec status", "exec", x.ID, "err", err)
	}
	return eventOf(x.ID, se)
}

// eventOf turns a stored event into an Event.
func eventOf(execID string, se state.Event) Event {
	ev := Event{ExecID: execID, Type: se.Type, Stream: se.Stream, Data: se.Data, Seq: se.Seq}
	if se.Type == state.EventExit {
		var d exitData
		json.Unmarshal([]byte(se.Data), &d)
		ev.ExitCode, ev.Error, ev.Signal, ev.TimedOut = d.ExitCode, d.Error, d.Signal, d.TimedOut
	}
	return ev
}

// ExecEvents replays an exec's stored events from seq 0, then follows it
// live until its exit event; the channel is then closed. It works the same
// for running and finished execs, and after an engine restart.
func (e *Engine) ExecEvents(ctx context.Context, execID string) (<-chan Event, error) {
	if _, err := e.store.GetExec(execID); err != nil {
		return nil, err
	}
	out := make(chan Event, 16)
	go func() {
		defer close(out)
		next := 0
		for {
			e.mu.Lock()
			live := e.execs[execID]
			e.mu.Unlock()
			var wake <-chan struct{}
			if live != nil {
				wake = live.wait() // taken before the read: no event is missed
			}
			// A page at a time: a follower (an SSE client, however
			// slow) holds one page, not all the exec stored.
			evs, err := e.store.EventsPage(execID, next, followPage)
			if err != nil {
				return
			}
			size := 0
			for _, se := range evs {
				select {
				case out <- eventOf(execID, se):
				case <-ctx.Done():
					return
				}
				next = se.Seq + 1
				if se.Type == state.EventExit {
					return
				}
				size += len(se.Data)
			}
			if size >= followPage {
				continue // a full page: more may be stored
			}
			if live == nil {
				// Finished (or its engine died) without a stored exit event.
				x, err := e.store.GetExec(execID)
				if err != nil || x.Status == state.ExecRunning {
					if err != nil {
						return
					}
				} else {
					ev := Event{ExecID: execID, Type: "exit", Seq: next, ExitCode: -1, Error: x.ErrorMessage}
					if x.Status == state.ExecCanceled {
						ev.Error = "canceled" // as the pump's exit event says it
					}
					if x.ExitCode != nil {
						ev.ExitCode = *x.ExitCode
					}
					select {
					case out <- ev:
					case <-ctx.Done():
					}
					return
				}
				// Still marked running, not live: it is about to finish.
				select {
				case <-time.After(10 * time.Millisecond):
				case <-ctx.Done():
					return
				}
				continue
			}
			select {
			case <-wake:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

// GetExec returns an exec's record.
func (e *Engine) GetExec(ctx context.Context, execID string) (*ExecInfo, error) {
	x, err := e.store.GetExec(execID)
	if err != nil {
		return nil, err
	}
	return execInfoOf(x), nil
}

// ListExecs returns a box's execs, newest first.
func (e *Engine) ListExecs(ctx context.Context, box string) ([]*ExecInfo, error) {
	rec, err := e.store.GetBox(box)
	if err != nil {
		return nil, err
	}
	xs, err := e.store.ListExecs(rec.ID)
	if err != nil {
		return nil, err
	}
	out := make([]*ExecInfo, len(xs))
	for i, x := range xs {
		out[i] = execInfoOf(x)
	}
	return out, nil
}

// CancelExec kills a running exec's process group; the exec ends as
// "canceled" with an exit event.
func (e *Engine) CancelExec(ctx context.Context, execID string) (*ExecInfo, error) {
	x, err := e.store.GetExec(execID)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	live := e.execs[execID]
	e.mu.Unlock()
	if live == nil || x.Status != state.ExecRunning {
		return nil, errdefs.New(errdefs.ExecAlreadyFinished, "Exec already finished")
	}
	live.mu.Lock()
	live.canceled = true
	live.mu.Unlock()
	if err := live.proc.Signal(9); err != nil && !errdefs.Is(err, errdefs.ExecAlreadyFinished) {
		return nil, err
	}
	// Wait for the pump to record the end, so the caller reads "canceled".
	for {
		x, err := e.store.GetExec(execID)
		if err != nil {
			return nil, err
		}
		if x.Status != state.ExecRunning {
			return execInfoOf(x), nil
		}
		select {
		case <-live.wait():
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return nil, errdefs.Wrap(errdefs.Canceled, ctx.Err(), "cancel exec")
		}
	}
}

// SignalExec sends sig to a running exec's process group in the box (a
// container runtime's kill). The exec ends, if it does, as the signal
// makes it: its exit event says which signal killed it.
func (e *Engine) SignalExec(ctx context.Context, execID string, sig syscall.Signal) error {
	e.mu.Lock()
	live := e.execs[execID]
	e.mu.Unlock()
	if live == nil {
		if _, err := e.store.GetExec(execID); err != nil {
			return err
		}
		return errdefs.New(errdefs.ExecAlreadyFinished, "Exec already finished")
	}
	return live.proc.Signal(sig)
}

func execInfoOf(x state.Exec) *ExecInfo {
	return &ExecInfo{
		ID: x.ID, BoxID: x.BoxID, Status: x.Status, Cmd: x.Cmd, Env: x.Env, Workdir: x.Workdir,
		Timeout: time.Duration(x.TimeoutMS) * time.Millisecond, ExitCode: x.ExitCode, ErrorMessage: x.ErrorMessage,
		CreatedAt: x.CreatedAt, FinishedAt: x.FinishedAt, DroppedEvents: x.DroppedEvents, DroppedBytes: x.DroppedBytes,
	}
}

// outputTail is what Exec keeps of one of spec's output streams.
func (e *Engine) outputTail(spec ExecSpec) *tailBuffer {
	limit := spec.MaxOutputBytes
	if limit == 0 {
		limit = e.cfg.MaxExecOutputBytes
		if limit <= 0 { // as the store reads it
			limit = state.DefaultMaxOutputBytes
		}
	}
	return &tailBuffer{max: limit}
}

// tailBuffer keeps the last max bytes written to it (all of them if max is
// negative), in at most twice that much memory, and counts the rest.
type tailBuffer struct {
	max   int64
	buf   []byte
	total int64
}

func (b *tailBuffer) write(p string) {
	b.total += int64(len(p))
	if b.max < 0 {
		b.buf = append(b.buf, p...)
		return
	}
	if int64(len(p)) >= b.max {
		b.buf = append(b.buf[:0], p[int64(len(p))-b.max:]...)
		return
	}
	if int64(len(b.buf)+len(p)) > 2*b.max { // compact: the first bytes go
		keep := b.buf[int64(len(b.buf))-(b.max-int64(len(p))):]
		b.buf = append(b.buf[:copy(b.buf, keep)], p...)
		return
	}
	b.buf = append(b.buf, p...)
}

// result is what was kept, and how many bytes were dropped before it.
func (b *tailBuffer) result() (string, int64) {
	out := b.buf
	if b.max >= 0 && int64(len(out)) > b.max {
		out = out[int64(len(out))-b.max:]
	}
	return string(out), b.total - int64(len(out))
}

// followPage is how much stored output ExecEvents reads at a time.
const followPage = 1 << 20
