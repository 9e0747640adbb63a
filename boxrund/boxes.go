package boxrund

import (
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/boxrun/boxrun"
)

// createRequest is POST /v1/boxes. Pointers tell an absent or null field
// (the default) from a given one.
type createRequest struct {
	Image      *string           `json:"image"`
	Name       *string           `json:"name"`
	CPU        *int              `json:"cpu"`
	MemoryMB   *int              `json:"memory_mb"`
	DiskSizeGB *int              `json:"disk_size_gb"`
	Network    *bool             `json:"network"`
	Workdir    *string           `json:"workdir"`
	Env        map[string]string `json:"env"`
	Volumes    []volumeJSON      `json:"volumes"`
	// Beyond upstream (unknown to its SDK, harmless to it): what the box
	// may reach, and its ports published on the host.
	NetworkPolicy *boxrun.NetworkPolicy `json:"network_policy"`
	Ports         []boxrun.Port         `json:"ports"`
}

// Upper bounds of the request's sizes, far above any real machine: a value
// beyond them is a mistake (or an attack on an overflow), answered 422.
const (
	maxCPU        = 1024
	maxMemoryMB   = 16 << 20 // 16 TiB
	maxDiskSizeGB = 64 << 10 // 64 TiB
	maxTimeoutMS  = 30 * 24 * 3600 * 1000
)

// spec validates the request (422 with upstream's messages) and fills in
// upstream's defaults: cpu 2, memory 1024 MiB, disk 8 GiB, workdir /root.
func (c *createRequest) spec() (boxrun.BoxSpec, error) {
	var s boxrun.BoxSpec
	if c.Image == nil || strings.TrimSpace(*c.Image) == "" {
		return s, invalid("image is required")
	}
	s.Image = *c.Image
	for _, f := range []struct {
		v        *int
		def, max int
		dst      *int
		name     string
	}{
		{c.CPU, 2, maxCPU, &s.CPU, "cpu"},
		{c.MemoryMB, 1024, maxMemoryMB, &s.MemoryMB, "memory_mb"},
		{c.DiskSizeGB, 8, maxDiskSizeGB, &s.DiskSizeGB, "disk_size_gb"},
	} {
		*f.dst = f.def
		if f.v != nil {
			if *f.v <= 0 {
				return s, invalid("%s must be greater than 0", f.name)
			}
			if *f.v > f.max {
				return s, invalid("%s must be at most %d", f.name, f.max)
			}
			*f.dst = *f.v
		}
	}
	s.Workdir = "/root"
	if c.Workdir != nil {
		if !strings.HasPrefix(*c.Workdir, "/") {
			return s, invalid("workdir must be an absolute path (starting with /)")
		}
		s.Workdir = *c.Workdir
	}
	if c.Name != nil {
		s.Name = *c.Name
	}
	if c.Network != nil {
		s.Network = *c.Network
	}
	s.Env = c.Env
	if c.NetworkPolicy != nil {
		s.NetworkPolicy = *c.NetworkPolicy
	}
	s.Ports = c.Ports
	for _, v := range c.Volumes {
		if !strings.HasPrefix(v.HostPath, "/") || !strings.HasPrefix(v.GuestPath, "/") {
			return s, invalid("volume paths must be absolute (host_path %q, guest_path %q)", v.HostPath, v.GuestPath)
		}
		s.Volumes = append(s.Volumes, boxrun.Volume{HostPath: v.HostPath, GuestPath: v.GuestPath, ReadOnly: v.ReadOnly})
	}
	return s, nil
}

func (a *API) createBox(w http.ResponseWriter, r *http.Request) error {
	var req createRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	spec, err := req.spec()
	if err != nil {
		return err
	}
	// The request's context: a client that gives up cancels the create,
	// which then leaves nothing behind.
	box, err := a.eng.Create(r.Context(), spec)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, boxOf(box))
	return nil
}

func (a *API) listBoxes(w http.ResponseWriter, r *http.Request) error {
	boxes, err := a.eng.List(r.Context(), boxrun.ListOptions{Status: r.URL.Query().Get("status")})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, boxesOf(boxes))
	return nil
}

func (a *API) getBox(w http.ResponseWriter, r *http.Request) error {
	box, err := a.eng.Get(r.Context(), firstColon(r.PathValue("seg")))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, boxOf(box))
	return nil
}

func (a *API) removeBox(w http.ResponseWriter, r *http.Request) error {
	var opts []boxrun.RemoveOption
	if r.URL.Query().Get("force") == "true" { // only the exact string, as upstream
		opts = append(opts, boxrun.Force)
	}
	// Not the request's context: a removal half done because the client
	// left would leave a box without its VM.
	if err := a.eng.Remove(detached(r), firstColon(r.PathValue("seg")), opts...); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
	return nil
}

// boxAction serves POST /v1/boxes/{id}:stop and :start.
func (a *API) boxAction(w http.ResponseWriter, r *http.Request) error {
	id, verb, ok := lastColon(r.PathValue("seg"))
	if !ok {
		return badRequest("Missing action (expected :stop or :start)")
	}
	var box *boxrun.Box
	var err error
	switch verb {
	case "stop":
		box, err = a.eng.Stop(detached(r), id)
	case "start":
		box, err = a.eng.Start(detached(r), id) // a client that gives up (the SDK waits 30 s) finds it running later
	default:
		return badRequest("Unknown action: %s", verb)
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, boxOf(box))
	return nil
}

type gcRequest struct {
	OlderThan *int64 `json:"older_than"`
}

// gc serves POST /v1/gc. Unlike upstream an empty body is accepted (the
// default, an hour).
func (a *API) gc(w http.ResponseWriter, r *http.Request) error {
	var req gcRequest
	if err := decode(w, r, &req, true); err != nil {
		return err
	}
	older := int64(3600)
	if req.OlderThan != nil {
		if *req.OlderThan < 0 {
			return invalid("older_than must not be negative")
		}
		older = *req.OlderThan
	}
	// Past what a Duration holds (~292 years) nothing is that old: clamp,
	// rather than let the product overflow into "everything".
	d := time.Duration(math.MaxInt64)
	if older <= math.MaxInt64/int64(time.Second) {
		d = time.Duration(older) * time.Second
	}
	n, err := a.eng.GC(detached(r), d)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]int{"removed": n})
	return nil
}
