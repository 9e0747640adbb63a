package boxrund

import (
	"time"

	"github.com/boxrun/boxrun"
)

// The wire shapes of the BoxRun API (spec §6.1, §3.1). Every key is always
// present, null when unset: clients build dataclasses from them.

type volumeJSON struct {
	HostPath  string `json:"host_path"`
	GuestPath string `json:"guest_path"`
	ReadOnly  bool   `json:"readonly"`
}

// boxJSON has exactly the 17 keys of a BoxRun box.
type boxJSON struct {
	ID           string            `json:"id"`
	Name         *string           `json:"name"`
	Status       string            `json:"status"`
	Image        string            `json:"image"`
	CPU          int               `json:"cpu"`
	MemoryMB     int               `json:"memory_mb"`
	DiskSizeGB   int               `json:"disk_size_gb"`
	Network      bool              `json:"network"`
	Workdir      string            `json:"workdir"`
	Env          map[string]string `json:"env"`
	Volumes      []volumeJSON      `json:"volumes"`
	BoxliteID    *string           `json:"boxlite_id"`
	ErrorCode    *string           `json:"error_code"`
	ErrorMessage *string           `json:"error_message"`
	CreatedAt    string            `json:"created_at"`
	StartedAt    *string           `json:"started_at"`
	StoppedAt    *string           `json:"stopped_at"`
	// Beyond upstream's 17 keys: null without network.
	NetworkPolicy *boxrun.NetworkPolicy `json:"network_policy"`
	Ports         []boxrun.Port         `json:"ports"`
}

// execJSON has exactly the 11 keys of a BoxRun exec: the Python SDK builds
// ExecInfo(**json), so an extra key breaks it.
type execJSON struct {
	ID           string            `json:"id"`
	BoxID        string            `json:"box_id"`
	Status       string            `json:"status"`
	Cmd          []string          `json:"cmd"`
	Env          map[string]string `json:"env"`
	Workdir      *string           `json:"workdir"`
	TimeoutMS    *int64            `json:"timeout_ms"`
	ExitCode     *int              `json:"exit_code"`
	ErrorMessage *string           `json:"error_message"`
	CreatedAt    string            `json:"created_at"`
	FinishedAt   *string           `json:"finished_at"`
}

type infoJSON struct {
	MaxCPU      int `json:"max_cpu"`
	MaxMemoryMB int `json:"max_memory_mb"`
	// Beyond upstream: what is in use, and what runs the boxes.
	UsedCPU      int    `json:"used_cpu"`
	UsedMemoryMB int    `json:"used_memory_mb"`
	RunningBoxes int    `json:"running_boxes"`
	Hypervisor   string `json:"hypervisor"`
	Version      string `json:"version"`
	// The hypervisor's own version ("v53.0", "7.2.22") and what runs the
	// guests' CPUs ("kvm", "tcg").
	HypervisorVersion string `json:"hypervisor_version"`
	Acceleration      string `json:"acceleration"`
	// How boxes started since the server did (warm start and pool), and
	// the ready boxes waiting in the pool.
	Boots     bootsJSON `json:"boots"`
	PoolReady int       `json:"pool_ready"`
}

type bootsJSON struct {
	Cold      int64 `json:"cold"`
	Warm      int64 `json:"warm"`
	Pooled    int64 `json:"pooled"`
	Templates int64 `json:"templates"`
	Fallbacks int64 `json:"fallbacks"`
	// Of warm: restored from an image's template (the box root mounted
	// already); image templates made (not in templates).
	Premounted     int64 `json:"premounted"`
	ImageTemplates int64 `json:"image_templates"`
}

type runJSON struct {
	ExitCode     *int    `json:"exit_code"`
	Stdout       string  `json:"stdout"`
	Stderr       string  `json:"stderr"`
	ErrorMessage *string `json:"error_message"`
}

// stamp formats a time the way the BoxRun server does (RFC 3339, UTC,
// "+00:00"), with microseconds so that every Python's
// datetime.fromisoformat reads it.
func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000000") + "+00:00" }

func stampPtr(t *time.Time) *string {
	if t == nil || t.IsZero() {
		return nil
	}
	s := stamp(*t)
	return &s
}

func strPtr(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func boxOf(b *boxrun.Box) boxJSON {
	j := boxJSON{
		ID: b.ID, Name: strPtr(b.Name), Status: b.Status, Image: b.Image, CPU: b.CPU, MemoryMB: b.MemoryMB,
		DiskSizeGB: b.DiskSizeGB, Network: b.Network, Workdir: b.Workdir, Env: b.Env,
		BoxliteID: strPtr(b.RuntimeID), ErrorCode: strPtr(b.ErrorCode), ErrorMessage: strPtr(b.ErrorMessage),
		CreatedAt: stamp(b.CreatedAt), StartedAt: stampPtr(b.StartedAt), StoppedAt: stampPtr(b.StoppedAt),
	}
	if j.Workdir == "" {
		j.Workdir = "/"
	}
	for _, v := range b.Volumes {
		j.Volumes = append(j.Volumes, volumeJSON{HostPath: v.HostPath, GuestPath: v.GuestPath, ReadOnly: v.ReadOnly})
	}
	if b.Network {
		p := b.NetworkPolicy
		j.NetworkPolicy, j.Ports = &p, b.Ports
		if j.Ports == nil {
			j.Ports = []boxrun.Port{}
		}
	}
	return j
}

func boxesOf(bs []*boxrun.Box) []boxJSON {
	out := make([]boxJSON, 0, len(bs))
	for _, b := range bs {
		out = append(out, boxOf(b))
	}
	return out
}

func execOf(x *boxrun.ExecInfo) execJSON {
	j := execJSON{
		ID: x.ID, BoxID: x.BoxID, Status: x.Status, Cmd: x.Cmd, Env: x.Env, Workdir: strPtr(x.Workdir),
		ExitCode: x.ExitCode, ErrorMessage: strPtr(x.ErrorMessage),
		CreatedAt: stamp(x.CreatedAt), FinishedAt: stampPtr(x.FinishedAt),
	}
	if j.Cmd == nil {
		j.Cmd = []string{}
	}
	if x.Timeout > 0 {
		ms := x.Timeout.Milliseconds()
		j.TimeoutMS = &ms
	}
	return j
}

func execsOf(xs []*boxrun.ExecInfo) []execJSON {
	out := make([]execJSON, 0, len(xs))
	for _, x := range xs {
		out = append(out, execOf(x))
	}
	return out
}
