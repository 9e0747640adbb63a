// Package state keeps the engine's records of boxes, execs and exec output.
//
// The records are the truth the engine reports (List, Get, exec events) and
// what it needs to find a box's VM and disks again. Badger (Open) is the
// Store: durable, on disk, in github.com/dgraph-io/badger/v4.
//
// # Output retention
//
// Exec output is stored as events (seq 0, 1, 2, ... per exec). To keep a
// chatty process from filling memory or disk, each exec keeps at most
// Options.MaxOutputBytes of log data and at most Options.MaxOutputEvents log
// events; when a new log event goes over either cap the oldest log events
// are dropped (the exit event never is) and the exec's DroppedEvents /
// DroppedBytes grow accordingly. A single log event larger than
// MaxOutputBytes is stored truncated to its last MaxOutputBytes bytes (the
// cut bytes count in DroppedBytes). Dropping costs O(dropped events), not a
// rescan of the stored ones.
//
// # Durability (Badger)
//
// Box records (PutBox, DeleteBox) are fsynced before the call returns.
// Exec records change at each command's start and end, and events are
// high-rate, so PutExec and AppendEvent do not fsync; the store syncs in
// the background at least once a second. A committed write
// is in the kernel's page cache, so it survives the engine process being
// killed (SIGKILL, panic, OOM kill); only an OS crash or power loss can
// lose up to the last second of events. Only one engine may have a data
// dir open: Open takes a lock and fails fast otherwise.
//
// DroppedEvents and DroppedBytes are owned by the store: PutExec ignores the
// values it is given and GetExec / ListExecs report the store's counters, so
// an engine that rewrites an exec record (status, exit code) never resets
// them.
package state

import (
	"github.com/boxrun/boxrun/network"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// Box statuses.
const (
	Creating = "creating"
	Running  = "running"
	Stopped  = "stopped"
	Error    = "error"
)

// Exec statuses.
const (
	ExecRunning   = "running"
	ExecSucceeded = "succeeded"
	ExecFailed    = "failed"
	ExecCanceled  = "canceled"
)

// Event types and log streams.
const (
	EventLog  = "log"
	EventExit = "exit"
	Stdout    = "stdout"
	Stderr    = "stderr"
)

// Retention defaults (see Options).
const (
	DefaultMaxOutputBytes  int64 = 16 << 20
	DefaultMaxOutputEvents       = 256 << 10
)

// Box is the record of one box, shaped like the BoxRun box record.
type Box struct {
	ID      string `json:"id"`
	Name    string `json:"name,omitempty"`
	Status  string `json:"status"`
	Image   string `json:"image"`
	ImageID string `json:"image_id,omitempty"`
	// RootfsDir is the host tree a box boots on instead of an image
	// (BoxSpec.Rootfs); ImageID is then its base disk's key.
	RootfsDir     string            `json:"rootfs_dir,omitempty"`
	RootfsPrivate bool              `json:"rootfs_private,omitempty"` // its base disk goes with it
	CPU           int               `json:"cpu"`
	MemoryMB      int               `json:"memory_mb"`
	DiskSizeGB    int               `json:"disk_size_gb"`
	Network       bool              `json:"network"`
	Workdir       string            `json:"workdir,omitempty"`
	Env           map[string]string `json:"env,omitempty"`
	Volumes       []Volume          `json:"volumes,omitempty"`
	// NetworkPolicy and Ports apply when Network is on.
	NetworkPolicy network.Policy `json:"network_policy,omitempty"`
	Ports         []network.Port `json:"ports,omitempty"`
	// RuntimeID names the VM: the hypervisor driver and the VMM's pid.
	RuntimeID    string     `json:"runtime_id,omitempty"`
	ErrorCode    string     `json:"error_code,omitempty"`
	ErrorMessage string     `json:"error_message,omitempty"`
	CreatedAt    time.Time  `json:"created_at"`
	StartedAt    *time.Time `json:"started_at,omitempty"`
	StoppedAt    *time.Time `json:"stopped_at,omitempty"`
}

// Exec is the record of one command run in a box, shaped like the BoxRun
// exec record (plus the retention counters).
type Exec struct {
	ID           string            `json:"id"`
	BoxID        string            `json:"box_id"`
	Status       string            `json:"status"`
	Cmd          []string          `json:"cmd"`
	Env          map[string]string `json:"env"`        // nil when not given
	Workdir      string            `json:"workdir"`    // "" when not given
	TimeoutMS    int64             `json:"timeout_ms"` // 0 when not given
	ExitCode     *int              `json:"exit_code"`
	ErrorMessage string            `json:"error_message"`
	CreatedAt    time.Time         `json:"created_at"`
	FinishedAt   *time.Time        `json:"finished_at"`
	// Output retention: how much earlier output was dropped to respect the
	// caps. Maintained by the store; ignored by PutExec.
	DroppedEvents int   `json:"dropped_events"`
	DroppedBytes  int64 `json:"dropped_bytes"`
}

// Event is one item of an exec's output stream.
type Event struct {
	// Seq is 0, 1, 2, ... per exec, one counter across stdout and stderr;
	// the exit event gets the next value.
	Seq int `json:"seq"`
	// Type is EventLog or EventExit.
	Type string `json:"type"`
	// Stream is Stdout or Stderr for a log event, "" for the exit event.
	Stream string `json:"stream"`
	// Data is the raw output chunk of a log event (any bytes, stored
	// verbatim), or for the exit event JSON text like {"exit_code":0} or
	// {"exit_code":-1,"error":"..."}.
	Data string `json:"data"`
	// Time is when the event was produced; AppendEvent fills in the
	// current time when it is zero.
	Time time.Time `json:"time"`
}

// Volume is a host directory mounted in a box.
type Volume struct {
	HostPath  string `json:"host_path"`
	GuestPath string `json:"guest_path"`
	ReadOnly  bool   `json:"readonly"`
}

// Store holds box and exec records and exec output events.
type Store interface {
	// PutBox inserts or replaces a record. Names are unique: putting a box
	// whose name another box has, or which equals another box's id, fails
	// with NAME_ALREADY_EXISTS. Renaming a box (or clearing its name) frees
	// the old name.
	PutBox(b Box) error
	// GetBox finds a box by id, then by name; BOX_NOT_FOUND otherwise.
	GetBox(idOrName string) (Box, error)
	// ListBoxes returns every box, newest first (CreatedAt).
	ListBoxes() ([]Box, error)
	// DeleteBox removes a box by id, with its execs and their events;
	// BOX_NOT_FOUND if there is no such box.
	DeleteBox(id string) error
	// PutExec inserts or replaces an exec record. Its box must exist
	// (BOX_NOT_FOUND otherwise). DroppedEvents/DroppedBytes are ignored.
	PutExec(x Exec) error
	// GetExec returns an exec by id; EXEC_NOT_FOUND otherwise.
	GetExec(id string) (Exec, error)
	// ListExecs returns the execs of a box (by id), newest first
	// (CreatedAt); BOX_NOT_FOUND if there is no such box.
	ListExecs(boxID string) ([]Exec, error)
	// AppendEvent stores an event of an exec and enforces retention.
	// Seqs must be strictly increasing per exec (VALIDATION_ERROR
	// otherwise); nothing may follow the exit event
	// (EXEC_ALREADY_FINISHED); EXEC_NOT_FOUND for an unknown exec.
	AppendEvent(execID string, ev Event) error
	// Events returns the stored events with Seq >= fromSeq, in seq order;
	// EXEC_NOT_FOUND for an unknown exec.
	Events(execID string, fromSeq int) ([]Event, error)
	// EventsPage is Events up to about maxBytes of event data (at least
	// one event; all of them if maxBytes <= 0): what a follower reads at
	// a time, so that one holds a page, not all an exec stored.
	EventsPage(execID string, fromSeq, maxBytes int) ([]Event, error)
	Close() error
}

// Options configure a store.
type Options struct {
	// MaxOutputBytes caps the log data stored per exec; 0 (or negative)
	// means DefaultMaxOutputBytes (16 MiB). The oldest log events are
	// dropped to respect it, never the exit event.
	MaxOutputBytes int64
	// MaxOutputEvents caps the number of log events stored per exec, so
	// that a process writing many tiny chunks cannot store millions of
	// records; 0 (or negative) means DefaultMaxOutputEvents (262144).
	MaxOutputEvents int
	// Logger receives the store's own warnings and badger's messages
	// (badger's info/debug chatter at debug level). nil: slog.Default().
	Logger *slog.Logger
}

// policy is the retention policy both stores apply.
type policy struct {
	maxBytes  int64
	maxEvents int
}

func newPolicy(o Options) policy {
	p := policy{maxBytes: o.MaxOutputBytes, maxEvents: o.MaxOutputEvents}
	if p.maxBytes <= 0 {
		p.maxBytes = DefaultMaxOutputBytes
	}
	if p.maxEvents <= 0 {
		p.maxEvents = DefaultMaxOutputEvents
	}
	return p
}

// evMeta is the per-exec bookkeeping of the event stream.
type evMeta struct {
	Next          int // every new event's seq must be >= Next
	First         int // no stored event has a seq below First
	LogBytes      int64
	LogCount      int
	DroppedEvents int
	DroppedBytes  int64
	Exited        bool
}

// over reports whether the stored log events exceed the caps.
func (p policy) over(m *evMeta) bool {
	return m.LogBytes > p.maxBytes || m.LogCount > p.maxEvents
}

// drop accounts for the removal of a stored log event of n data bytes.
func (m *evMeta) drop(n int) {
	m.LogBytes -= int64(n)
	m.LogCount--
	m.DroppedEvents++
	m.DroppedBytes += int64(n)
}

// prepare validates ev against m, normalises it (time, truncation of an
// oversized chunk) and accounts for it in m. On error m and ev are
// unchanged.
func (p policy) prepare(execID string, m *evMeta, ev *Event) error {
	if m.Exited {
		return errdefs.New(errdefs.ExecAlreadyFinished, "Exec already finished")
	}
	if ev.Seq < m.Next {
		return errdefs.New(errdefs.ValidationError,
			"event seq %d of exec '%s' out of order: seq must be >= %d", ev.Seq, execID, m.Next)
	}
	switch ev.Type {
	case EventLog:
		if ev.Stream != Stdout && ev.Stream != Stderr {
			return errdefs.New(errdefs.ValidationError, "log event stream must be stdout or stderr, not %q", ev.Stream)
		}
		if cut := int64(len(ev.Data)) - p.maxBytes; cut > 0 {
			ev.Data = strings.Clone(ev.Data[cut:])
			m.DroppedBytes += cut
		}
		m.LogBytes += int64(len(ev.Data))
		m.LogCount++
	case EventExit:
		if ev.Stream != "" {
			return errdefs.New(errdefs.ValidationError, "exit event must have no stream, not %q", ev.Stream)
		}
		m.Exited = true
	default:
		return errdefs.New(errdefs.ValidationError, "event type must be log or exit, not %q", ev.Type)
	}
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	m.Next = ev.Seq + 1
	return nil
}

// checkID rejects ids the stores cannot key on.
func checkID(kind, id string) error {
	if id == "" {
		return errdefs.New(errdefs.ValidationError, "%s id must not be empty", kind)
	}
	if strings.IndexByte(id, 0) >= 0 {
		return errdefs.New(errdefs.ValidationError, "%s id must not contain NUL", kind)
	}
	return nil
}

func boxNotFound(idOrName string) error {
	return errdefs.New(errdefs.BoxNotFound, "Box '%s' not found", idOrName)
}

func execNotFound(id string) error {
	return errdefs.New(errdefs.ExecNotFound, "Exec '%s' not found", id)
}

func nameTaken(name string) error {
	return errdefs.New(errdefs.NameAlreadyExists, "A box with name '%s' already exists", name)
}

// sortBoxes orders newest first; ties by id for a stable answer.
func sortBoxes(bs []Box) {
	sort.Slice(bs, func(i, j int) bool {
		if !bs[i].CreatedAt.Equal(bs[j].CreatedAt) {
			return bs[i].CreatedAt.After(bs[j].CreatedAt)
		}
		return bs[i].ID < bs[j].ID
	})
}

// sortExecs orders newest first; ties by id for a stable answer.
func sortExecs(xs []Exec) {
	sort.Slice(xs, func(i, j int) bool {
		if !xs[i].CreatedAt.Equal(xs[j].CreatedAt) {
			return xs[i].CreatedAt.After(xs[j].CreatedAt)
		}
		return xs[i].ID < xs[j].ID
	})
}

func cloneTime(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	c := *t
	return &c
}

func cloneBox(b Box) Box {
	b.Env = maps.Clone(b.Env)
	b.StartedAt = cloneTime(b.StartedAt)
	b.StoppedAt = cloneTime(b.StoppedAt)
	return b
}

func cloneExec(x Exec) Exec {
	x.Cmd = slices.Clone(x.Cmd)
	x.Env = maps.Clone(x.Env)
	if x.ExitCode != nil {
		c := *x.ExitCode
		x.ExitCode = &c
	}
	x.FinishedAt = cloneTime(x.FinishedAt)
	return x
}
