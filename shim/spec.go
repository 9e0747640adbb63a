package shim

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	boxrun "github.com/boxrun/boxrun"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Defaults is the shape of a box whose config.json sets no limits.
type Defaults struct {
	CPU        int // default 1
	MemoryMB   int // default 512
	DiskSizeGB int // the box's writable disk (sparse); default 8
}

func (d Defaults) withZeroesFilled() Defaults {
	if d.CPU <= 0 {
		d.CPU = 1
	}
	if d.MemoryMB <= 0 {
		d.MemoryMB = 512
	}
	if d.DiskSizeGB <= 0 {
		d.DiskSizeGB = 8
	}
	return d
}

func readSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, err
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("config.json: %w", err)
	}
	if s.Process == nil || len(s.Process.Args) == 0 {
		return nil, fmt.Errorf("config.json: no process args")
	}
	return &s, nil
}

// isSandbox says whether the config is a CRI pod's sandbox (pause)
// container, by the annotations containerd's CRI plugin sets (and
// cri-o's, which others follow).
func isSandbox(s *specs.Spec) bool {
	for _, k := range []string{"io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"} {
		if s.Annotations[k] == "sandbox" {
			return true
		}
	}
	return false
}

// fileMount is a host file the container's config mounts: copied into the
// box at create (a snapshot of it: later changes on the host are not seen).
type fileMount struct {
	host, guest string
	readOnly    bool
}

// boxShape turns the OCI config into the box's shape: CPUs from the CPU
// quota (rounded up), memory from the memory limit, the network from the
// network namespace, host directories bind-mounted as volumes.
func boxShape(s *specs.Spec, d Defaults) (spec boxrun.BoxSpec, files []fileMount) {
	d = d.withZeroesFilled()
	spec.CPU, spec.MemoryMB, spec.DiskSizeGB = d.CPU, d.MemoryMB, d.DiskSizeGB
	if l := s.Linux; l != nil && l.Resources != nil {
		if c := l.Resources.CPU; c != nil && c.Quota != nil && *c.Quota > 0 && c.Period != nil && *c.Period > 0 {
			spec.CPU = int((uint64(*c.Quota) + *c.Period - 1) / *c.Period)
		}
		if m := l.Resources.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
			// The guest kernel and agent need some of it: never under 128 MiB.
			spec.MemoryMB = max(int(*m.Limit>>20), 128)
		}
	}
	// A network namespace of its own without a path is a container with
	// no network (ctr run's default): no NIC. Joining an existing one (a
	// pod's, set up by CNI) or none at all (the host's) gives the box a
	// network of its own: the public internet, not the host's or the
	// CNI's (see README).
	spec.Network = true
	if s.Linux != nil {
		for _, ns := range s.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace && ns.Path == "" {
				spec.Network = false
			}
		}
	}
	for _, m := range s.Mounts {
		if m.Type != "bind" && m.Type != "rbind" && !slices.Contains(m.Options, "bind") && !slices.Contains(m.Options, "rbind") {
			continue // proc, sysfs, tmpfs, devpts...: the guest has its own
		}
		if !filepath.IsAbs(m.Source) || !strings.HasPrefix(m.Destination, "/") {
			continue
		}
		// The guest's own /dev, /proc and /sys: a pod's /dev/shm, a
		// kubelet's termination log are the box's.
		if skipMount(m.Destination) {
			continue
		}
		st, err := os.Stat(m.Source)
		if err != nil {
			continue
		}
		ro := slices.Contains(m.Options, "ro")
		if st.IsDir() {
			spec.Volumes = append(spec.Volumes, boxrun.Volume{HostPath: m.Source, GuestPath: m.Destination, ReadOnly: ro})
		} else if st.Mode().IsRegular() {
			files = append(files, fileMount{host: m.Source, guest: m.Destination, readOnly: ro})
		}
	}
	return spec, files
}

// processSpec is an OCI process as the engine runs it.
type processSpec struct {
	args     []string
	env      map[string]string
	cwd      string
	user     string
	terminal bool
	rows     uint16
	cols     uint16
}

func procOf(p *specs.Process) processSpec {
	ps := processSpec{args: p.Args, cwd: p.Cwd, terminal: p.Terminal, env: map[string]string{}}
	for _, kv := range p.Env {
		k, v, _ := strings.Cut(kv, "=")
		if k != "" {
			ps.env[k] = v
		}
	}
	if p.User.Username != "" {
		ps.user = p.User.Username
	} else {
		ps.user = strconv.FormatUint(uint64(p.User.UID), 10) + ":" + strconv.FormatUint(uint64(p.User.GID), 10)
	}
	if p.ConsoleSize != nil {
		ps.rows, ps.cols = uint16(p.ConsoleSize.Height), uint16(p.ConsoleSize.Width)
	}
	return ps
}
