package state

import (
	"sync"
	"sync/atomic"
)

// Memory is a Store in memory, with the same semantics and retention as
// the durable store. Records are copied in and out, so callers may mutate
// what they pass or get back.
type Memory struct {
	pol policy

	mu       sync.Mutex
	boxes    map[string]Box
	names    map[string]string              // name -> box id
	execs    map[string]*memExec            // exec id -> exec
	boxExecs map[string]map[string]struct{} // box id -> exec ids

	work atomic.Int64 // events examined by retention (tests)
}

type memExec struct {
	x    Exec // DroppedEvents/DroppedBytes come from meta
	meta evMeta
	ev   []Event // stored events are ev[head:]
	head int
}

// NewMemory returns an empty in-memory store with the default retention.
func NewMemory() *Memory { return NewMemoryWithOptions(Options{}) }

// NewMemoryWithOptions returns an empty in-memory store; only the retention
// fields of opts are used.
func NewMemoryWithOptions(opts Options) *Memory {
	return &Memory{
		pol:      newPolicy(opts),
		boxes:    map[string]Box{},
		names:    map[string]string{},
		execs:    map[string]*memExec{},
		boxExecs: map[string]map[string]struct{}{},
	}
}

func (m *Memory) PutBox(b Box) error {
	if err := checkID("box", b.ID); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if b.Name != "" {
		if owner, ok := m.names[b.Name]; ok && owner != b.ID {
			return nameTaken(b.Name)
		}
		if _, ok := m.boxes[b.Name]; ok && b.Name != b.ID {
			return nameTaken(b.Name)
		}
	}
	if old, ok := m.boxes[b.ID]; ok && old.Name != "" && old.Name != b.Name {
		delete(m.names, old.Name)
	}
	if b.Name != "" {
		m.names[b.Name] = b.ID
	}
	m.boxes[b.ID] = cloneBox(b)
	return nil
}

func (m *Memory) GetBox(idOrName string) (Box, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if b, ok := m.boxes[idOrName]; ok {
		return cloneBox(b), nil
	}
	if id, ok := m.names[idOrName]; ok {
		return cloneBox(m.boxes[id]), nil
	}
	return Box{}, boxNotFound(idOrName)
}

func (m *Memory) ListBoxes() ([]Box, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Box, 0, len(m.boxes))
	for _, b := range m.boxes {
		out = append(out, cloneBox(b))
	}
	sortBoxes(out)
	return out, nil
}

func (m *Memory) DeleteBox(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.boxes[id]
	if !ok {
		return boxNotFound(id)
	}
	delete(m.boxes, id)
	if b.Name != "" && m.names[b.Name] == id {
		delete(m.names, b.Name)
	}
	for xid := range m.boxExecs[id] {
		delete(m.execs, xid)
	}
	delete(m.boxExecs, id)
	return nil
}

func (m *Memory) PutExec(x Exec) error {
	if err := checkID("exec", x.ID); err != nil {
		return err
	}
	if err := checkID("box", x.BoxID); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.boxes[x.BoxID]; !ok {
		return boxNotFound(x.BoxID)
	}
	x = cloneExec(x)
	x.DroppedEvents, x.DroppedBytes = 0, 0
	e, ok := m.execs[x.ID]
	if !ok {
		e = &memExec{}
		m.execs[x.ID] = e
	} else if e.x.BoxID != x.BoxID {
		delete(m.boxExecs[e.x.BoxID], x.ID)
	}
	e.x = x
	if m.boxExecs[x.BoxID] == nil {
		m.boxExecs[x.BoxID] = map[string]struct{}{}
	}
	m.boxExecs[x.BoxID][x.ID] = struct{}{}
	return nil
}

func (e *memExec) view() Exec {
	x := cloneExec(e.x)
	x.DroppedEvents, x.DroppedBytes = e.meta.DroppedEvents, e.meta.DroppedBytes
	return x
}

func (m *Memory) GetExec(id string) (Exec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.execs[id]
	if !ok {
		return Exec{}, execNotFound(id)
	}
	return e.view(), nil
}

func (m *Memory) ListExecs(boxID string) ([]Exec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.boxes[boxID]; !ok {
		return nil, boxNotFound(boxID)
	}
	out := make([]Exec, 0, len(m.boxExecs[boxID]))
	for xid := range m.boxExecs[boxID] {
		out = append(out, m.execs[xid].view())
	}
	sortExecs(out)
	return out, nil
}

func (m *Memory) AppendEvent(execID string, ev Event) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.execs[execID]
	if !ok {
		return execNotFound(execID)
	}
	if err := m.pol.prepare(execID, &e.meta, &ev); err != nil {
		return err
	}
	e.ev = append(e.ev, ev)
	// Drop the oldest log events while over the caps. The event just
	// appended fits the caps on its own, so this stops before it.
	for m.pol.over(&e.meta) && e.head < len(e.ev) {
		front := &e.ev[e.head]
		m.work.Add(1)
		if front.Type != EventLog {
			break // only the exit event, which is last and never dropped
		}
		e.meta.drop(len(front.Data))
		*front = Event{} // let the chunk be collected
		e.head++
	}
	if e.head < len(e.ev) {
		e.meta.First = e.ev[e.head].Seq
	}
	// Compact once the dropped prefix is the larger half: amortised O(1).
	if e.head > 64 && e.head*2 > len(e.ev) {
		n := copy(e.ev, e.ev[e.head:])
		clear(e.ev[n:])
		e.ev, e.head = e.ev[:n], 0
	}
	return nil
}

func (m *Memory) Events(execID string, fromSeq int) ([]Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.execs[execID]
	if !ok {
		return nil, execNotFound(execID)
	}
	stored := e.ev[e.head:]
	i, _ := searchSeq(stored, fromSeq)
	out := make([]Event, len(stored)-i)
	copy(out, stored[i:])
	return out, nil
}

// searchSeq returns the index of the first event with Seq >= seq.
func searchSeq(evs []Event, seq int) (int, bool) {
	lo, hi := 0, len(evs)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if evs[mid].Seq < seq {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo, lo < len(evs) && evs[lo].Seq == seq
}

func (m *Memory) Close() error { return nil }

// storedEvents counts the events stored for an exec (tests).
func (m *Memory) storedEvents(execID string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e, ok := m.execs[execID]; ok {
		return len(e.ev) - e.head
	}
	return 0
}

func (m *Memory) retentionWork() int64 { return m.work.Load() }
