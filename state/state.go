// Package state keeps the engine's records of boxes.
//
// The records are the truth the engine reports (List, Get) and what it needs
// to find a box's VM and disks again. This is the in-memory store; a durable
// store implements the same interface.
package state

import (
	"sort"
	"sync"
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

// Box is the record of one box, shaped like the BoxRun box record.
type Box struct {
	ID         string            `json:"id"`
	Name       string            `json:"name,omitempty"`
	Status     string            `json:"status"`
	Image      string            `json:"image"`
	ImageID    string            `json:"image_id,omitempty"`
	CPU        int               `json:"cpu"`
	MemoryMB   int               `json:"memory_mb"`
	DiskSizeGB int               `json:"disk_size_gb"`
	Network    bool              `json:"network"`
	Workdir    string            `json:"workdir,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	// RuntimeID names the VM: the hypervisor driver and the VMM's pid.
	RuntimeID    string     `json:"runtime_id,omitempty"`
	ErrorCode    string     `json:"error_code,omitempty"`
	ErrorMessage string     `json:"error_message,omitempty"`
	CreatedAt    time.Time  `json:"created_at"`
	StartedAt    *time.Time `json:"started_at,omitempty"`
	StoppedAt    *time.Time `json:"stopped_at,omitempty"`
}

// Store holds box records.
type Store interface {
	// PutBox inserts or replaces a record. Names are unique: putting a box
	// whose name another box (or another box's id) has fails with
	// NAME_ALREADY_EXISTS.
	PutBox(b Box) error
	// GetBox finds a box by id, then by name; BOX_NOT_FOUND otherwise.
	GetBox(idOrName string) (Box, error)
	// ListBoxes returns every box, newest first.
	ListBoxes() ([]Box, error)
	DeleteBox(id string) error
	Close() error
}

// Memory is a Store in memory.
type Memory struct {
	mu    sync.Mutex
	boxes map[string]Box
}

// NewMemory returns an empty in-memory store.
func NewMemory() *Memory { return &Memory{boxes: map[string]Box{}} }

func (m *Memory) PutBox(b Box) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if b.Name != "" {
		for id, o := range m.boxes {
			if id != b.ID && (o.Name == b.Name || o.ID == b.Name) {
				return errdefs.New(errdefs.NameAlreadyExists, "A box with name '%s' already exists", b.Name)
			}
		}
	}
	m.boxes[b.ID] = b
	return nil
}

func (m *Memory) GetBox(idOrName string) (Box, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if b, ok := m.boxes[idOrName]; ok {
		return b, nil
	}
	for _, b := range m.boxes {
		if b.Name != "" && b.Name == idOrName {
			return b, nil
		}
	}
	return Box{}, errdefs.New(errdefs.BoxNotFound, "Box '%s' not found", idOrName)
}

func (m *Memory) ListBoxes() ([]Box, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Box, 0, len(m.boxes))
	for _, b := range m.boxes {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

func (m *Memory) DeleteBox(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.boxes[id]; !ok {
		return errdefs.New(errdefs.BoxNotFound, "Box '%s' not found", id)
	}
	delete(m.boxes, id)
	return nil
}

func (m *Memory) Close() error { return nil }
