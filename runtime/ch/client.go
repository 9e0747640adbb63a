// Package ch is a small typed client for Cloud Hypervisor's REST API (the
// HTTP server cloud-hypervisor serves on --api-socket), hand-written for
// the calls boxrun makes. The request and answer types carry only the
// fields boxrun sets or reads; their JSON matches the API document
// (vmm/src/api/openapi/cloud-hypervisor.yaml), which the driver's contract
// test checks every request against.
//
// Cloud Hypervisor's HTTP server is minimal: the client makes one request
// per connection. An answer outside 2xx is an *APIError carrying Cloud
// Hypervisor's own message, a JSON array of strings (the error and its
// causes).
package ch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Client talks to one cloud-hypervisor process through its API socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the API socket at path. Socket paths are
// limited to 107 bytes; a caller with a longer one passes a
// /proc/self/fd/N/NAME path or works from the socket's directory.
func NewClient(path string) *Client {
	return NewClientDial(path, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	})
}

// NewClientDial returns a client whose connections come from dial; name
// is the socket's path, for Socket.
func NewClientDial(name string, dial func(ctx context.Context) (net.Conn, error)) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx)
		},
		// One request per connection: CH's server closes idle connections
		// on its own schedule, and a reused one could fail mid-request.
		DisableKeepAlives: true,
		// A backstop only: callers bound each call with their context
		// (vm.snapshot and vm.restore write and read all guest memory,
		// and may take minutes for a big VM on a slow disk).
		ResponseHeaderTimeout: 10 * time.Minute,
	}
	return &Client{socket: name, http: &http.Client{Transport: tr}}
}

// Socket is the path of the API socket.
func (c *Client) Socket() string { return c.socket }

// base is the URL prefix of every endpoint (the host part is not used: the
// connection goes to the socket).
const base = "http://localhost/api/v1/"

// APIError is an answer outside 2xx.
type APIError struct {
	Method, Endpoint string // "PUT", "vm.boot"
	Status           int
	// Messages is CH's error: a JSON array of strings, the error first and
	// its causes after it. A body that is not such an array is kept whole
	// as the one message.
	Messages []string
}

func (e *APIError) Error() string {
	msg := strings.Join(e.Messages, ": ")
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	return fmt.Sprintf("cloud-hypervisor %s /%s: %d: %s", e.Method, e.Endpoint, e.Status, msg)
}

// IsNotFound reports whether err is CH's answer that there is no VM (404:
// not created, or already deleted).
func IsNotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}

// maxBody bounds what is read of an answer (vm.info carries the whole
// configuration and the device tree: a few KiB).
const maxBody = 4 << 20

// do sends one request. in, when non-nil, is the JSON body; out, when
// non-nil, receives the JSON answer of a 2xx.
func (c *Client) do(ctx context.Context, method, endpoint string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, base+endpoint, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cloud-hypervisor %s /%s: %w", method, endpoint, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("cloud-hypervisor %s /%s: reading the answer: %w", method, endpoint, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return &APIError{Method: method, Endpoint: endpoint, Status: resp.StatusCode, Messages: messages(data)}
	}
	if out == nil {
		return nil
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return fmt.Errorf("cloud-hypervisor %s /%s: %d with an empty body", method, endpoint, resp.StatusCode)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("cloud-hypervisor %s /%s: decoding the answer: %w", method, endpoint, err)
	}
	return nil
}

// messages parses CH's error body: a JSON array of strings.
func messages(data []byte) []string {
	var msgs []string
	if err := json.Unmarshal(data, &msgs); err == nil {
		return msgs
	}
	if s := strings.TrimSpace(string(data)); s != "" {
		if len(s) > 1024 {
			s = s[:1024] + "..."
		}
		return []string{s}
	}
	return nil
}

// Ping is GET /vmm.ping: the VMM answers once its API is up.
func (c *Client) Ping(ctx context.Context) (*VmmPingResponse, error) {
	var out VmmPingResponse
	if err := c.do(ctx, http.MethodGet, "vmm.ping", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// CreateVM is PUT /vm.create: the VM is created, not booted.
func (c *Client) CreateVM(ctx context.Context, cfg *VmConfig) error {
	return c.do(ctx, http.MethodPut, "vm.create", cfg, nil)
}

// BootVM is PUT /vm.boot.
func (c *Client) BootVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "vm.boot", nil, nil)
}

// Info is GET /vm.info.
func (c *Client) Info(ctx context.Context) (*VmInfo, error) {
	var out VmInfo
	if err := c.do(ctx, http.MethodGet, "vm.info", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// ShutdownVM is PUT /vm.shutdown: the VM stops at once (no guest
// involvement); the VMM keeps running.
func (c *Client) ShutdownVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "vm.shutdown", nil, nil)
}

// DeleteVM is PUT /vm.delete.
func (c *Client) DeleteVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "vm.delete", nil, nil)
}

// ShutdownVMM is PUT /vmm.shutdown: the VMM process exits. (v53 answers
// 200 where the document says 204; both are success.)
func (c *Client) ShutdownVMM(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "vmm.shutdown", nil, nil)
}

// PauseVM is PUT /vm.pause.
func (c *Client) PauseVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "vm.pause", nil, nil)
}

// ResumeVM is PUT /vm.resume.
func (c *Client) ResumeVM(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "vm.resume", nil, nil)
}

// Snapshot is PUT /vm.snapshot of a paused VM to destination, a URL such
// as "file:///var/lib/snap".
func (c *Client) Snapshot(ctx context.Context, destination string) error {
	return c.do(ctx, http.MethodPut, "vm.snapshot", &VmSnapshotConfig{DestinationURL: destination}, nil)
}

// Restore is PUT /vm.restore: a VMM without a VM restores one from a
// snapshot (paused unless cfg.Resume).
func (c *Client) Restore(ctx context.Context, cfg *RestoreConfig) error {
	return c.do(ctx, http.MethodPut, "vm.restore", cfg, nil)
}
