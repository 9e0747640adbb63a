package client

import (
	"context"
	"encoding/json"
	"net/url"
	"strconv"
)

// Box is a box as the API shows it (spec §6.1): the 17 keys of upstream,
// and boxrund's network_policy and ports (null without network).
type Box struct {
	ID            string            `json:"id"`
	Name          *string           `json:"name"`
	Status        string            `json:"status"`
	Image         string            `json:"image"`
	CPU           int               `json:"cpu"`
	MemoryMB      int               `json:"memory_mb"`
	DiskSizeGB    int               `json:"disk_size_gb"`
	Network       bool              `json:"network"`
	Workdir       string            `json:"workdir"`
	Env           map[string]string `json:"env"`
	Volumes       []Volume          `json:"volumes"`
	BoxliteID     *string           `json:"boxlite_id"`
	ErrorCode     *string           `json:"error_code"`
	ErrorMessage  *string           `json:"error_message"`
	CreatedAt     string            `json:"created_at"`
	StartedAt     *string           `json:"started_at"`
	StoppedAt     *string           `json:"stopped_at"`
	NetworkPolicy json.RawMessage   `json:"network_policy,omitempty"`
	Ports         json.RawMessage   `json:"ports,omitempty"`
}

// DisplayName is the box's name, or "" when it has none.
func (b *Box) DisplayName() string {
	if b.Name == nil {
		return ""
	}
	return *b.Name
}

// Volume is a host directory shared into a box.
type Volume struct {
	HostPath  string `json:"host_path"`
	GuestPath string `json:"guest_path"`
	ReadOnly  bool   `json:"readonly"`
}

// Port publishes a box's TCP port on the host (boxrund only).
type Port struct {
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	HostIP    string `json:"host_ip,omitempty"`
}

// CreateRequest is the body of POST /v1/boxes. Zero values are left out,
// so the server's defaults apply (cpu 2, memory 1024 MiB, disk 8 GiB,
// workdir /root, no network).
type CreateRequest struct {
	Image      string            `json:"image"`
	Name       string            `json:"name,omitempty"`
	CPU        int               `json:"cpu,omitempty"`
	MemoryMB   int               `json:"memory_mb,omitempty"`
	DiskSizeGB int               `json:"disk_size_gb,omitempty"`
	Network    bool              `json:"network,omitempty"`
	Workdir    string            `json:"workdir,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	Volumes    []Volume          `json:"volumes,omitempty"`
	Ports      []Port            `json:"ports,omitempty"`
}

// Info is GET /v1/info. Upstream answers the first two only.
type Info struct {
	MaxCPU       int    `json:"max_cpu"`
	MaxMemoryMB  int    `json:"max_memory_mb"`
	UsedCPU      int    `json:"used_cpu"`
	UsedMemoryMB int    `json:"used_memory_mb"`
	RunningBoxes int    `json:"running_boxes"`
	Hypervisor   string `json:"hypervisor,omitempty"`
	Version      string `json:"version,omitempty"`
}

// Info returns the server's limits and what is in use.
func (c *Client) Info(ctx context.Context) (*Info, error) {
	var in Info
	if err := c.do(ctx, "GET", "/v1/info", nil, &in); err != nil {
		return nil, err
	}
	return &in, nil
}

// CreateBox creates and starts a box; it answers once the box runs.
func (c *Client) CreateBox(ctx context.Context, req CreateRequest) (*Box, error) {
	var b Box
	if err := c.do(ctx, "POST", "/v1/boxes", req, &b); err != nil {
		return nil, err
	}
	return &b, nil
}

// ListBoxes lists the boxes, newest first; status "" (or "all") lists
// every box, else those of that status.
func (c *Client) ListBoxes(ctx context.Context, status string) ([]Box, error) {
	p := "/v1/boxes"
	if status != "" {
		p += "?status=" + url.QueryEscape(status)
	}
	var bs []Box
	if err := c.do(ctx, "GET", p, nil, &bs); err != nil {
		return nil, err
	}
	if bs == nil {
		bs = []Box{}
	}
	return bs, nil
}

// GetBox gets a box by id or name.
func (c *Client) GetBox(ctx context.Context, box string) (*Box, error) {
	var b Box
	if err := c.do(ctx, "GET", "/v1/boxes/"+seg(box), nil, &b); err != nil {
		return nil, err
	}
	return &b, nil
}

// StopBox stops a running box (its disk is kept).
func (c *Client) StopBox(ctx context.Context, box string) (*Box, error) {
	return c.boxAction(ctx, box, "stop")
}

// StartBox starts a stopped box.
func (c *Client) StartBox(ctx context.Context, box string) (*Box, error) {
	return c.boxAction(ctx, box, "start")
}

func (c *Client) boxAction(ctx context.Context, box, verb string) (*Box, error) {
	var b Box
	if err := c.do(ctx, "POST", "/v1/boxes/"+seg(box)+":"+verb, nil, &b); err != nil {
		return nil, err
	}
	return &b, nil
}

// RemoveBox removes a box; a running one needs force
// (BOX_ALREADY_RUNNING otherwise).
func (c *Client) RemoveBox(ctx context.Context, box string, force bool) error {
	return c.do(ctx, "DELETE", "/v1/boxes/"+seg(box)+"?force="+strconv.FormatBool(force), nil, nil)
}

// GC removes the boxes stopped (or failed) more than olderThan seconds
// ago and returns how many.
func (c *Client) GC(ctx context.Context, olderThan int64) (int, error) {
	var out struct {
		Removed int `json:"removed"`
	}
	if err := c.do(ctx, "POST", "/v1/gc", map[string]int64{"older_than": olderThan}, &out); err != nil {
		return 0, err
	}
	return out.Removed, nil
}

// RunRequest is the body of POST /v1/run: an ephemeral box, one command.
type RunRequest struct {
	Image      string            `json:"image"`
	Cmd        []string          `json:"cmd"`
	CPU        int               `json:"cpu,omitempty"`
	MemoryMB   int               `json:"memory_mb,omitempty"`
	DiskSizeGB int               `json:"disk_size_gb,omitempty"`
	Network    bool              `json:"network,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	Volumes    []Volume          `json:"volumes,omitempty"`
	TimeoutMS  int64             `json:"timeout_ms,omitempty"`
}

// RunResult is what a POST /v1/run command did.
type RunResult struct {
	ExitCode     *int    `json:"exit_code"`
	Stdout       string  `json:"stdout"`
	Stderr       string  `json:"stderr"`
	ErrorMessage *string `json:"error_message"`
}

// Run creates a box, runs one command in it to its end, removes the box
// and returns the command's output.
func (c *Client) Run(ctx context.Context, req RunRequest) (*RunResult, error) {
	var r RunResult
	if err := c.do(ctx, "POST", "/v1/run", req, &r); err != nil {
		return nil, err
	}
	return &r, nil
}
