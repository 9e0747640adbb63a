package exec

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// execCgroup is the cgroup v2 directory one exec runs in (see
// ServerOptions.Cgroup).
type execCgroup struct {
	path string
	fd   int // the directory, for CLONE_INTO_CGROUP; -1 once closed

	mu       sync.Mutex
	released bool // given back: a late kill (timeout, cancel) must not reach the next exec
}

// newExecCgroup creates the cgroup of a new exec, or returns nil when
// execs get none. It first removes the cgroups of finished execs that have
// emptied since.
func (sv *server) newExecCgroup() (*execCgroup, error) {
	sv.mu.Lock()
	if sv.opts.Cgroup == "" {
		sv.mu.Unlock()
		return nil, nil
	}
	// An emptied cgroup of an earlier exec is taken again: making and
	// removing one costs milliseconds under TCG, on every exec.
	if p := freeCgroups.take(sv.opts.Cgroup); p != "" {
		sv.mu.Unlock()
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err == nil {
			return &execCgroup{path: p, fd: fd}, nil
		}
		unix.Rmdir(p)
		sv.mu.Lock()
	}
	// Named by a counter of the process, not of the session: a new host
	// connection must not collide with cgroups an earlier one left.
	p := filepath.Join(sv.opts.Cgroup, fmt.Sprintf("exec-%d", cgroupSeq.Add(1)))
	lingering := sv.lingering
	sv.lingering = nil
	sv.mu.Unlock()
	for _, l := range lingering {
		sv.removeCgroup(l)
	}
	if err := os.Mkdir(p, 0o755); err != nil {
		return nil, err
	}
	if sv.opts.PidsMax > 0 {
		if err := os.WriteFile(filepath.Join(p, "pids.max"), []byte(strconv.Itoa(sv.opts.PidsMax)), 0); err != nil {
			unix.Rmdir(p)
			return nil, err
		}
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Rmdir(p)
		return nil, err
	}
	return &execCgroup{path: p, fd: fd}, nil
}

// closeFD closes the directory once the process is in the cgroup.
func (c *execCgroup) closeFD() {
	if c != nil && c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
}

// kill SIGKILLs every process in the cgroup, including those that left the
// exec's process group (kernel 5.14+; older kernels only get the group
// kill).
func (c *execCgroup) kill() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.released {
		_ = os.WriteFile(filepath.Join(c.path, "cgroup.kill"), []byte("1"), 0)
	}
}

// release keeps the cgroup of a finished exec for the next exec once it
// is empty (at most maxFreeCgroups of them; the others are removed), or
// for later removal while processes it left behind still run in it.
func (sv *server) release(c *execCgroup) {
	if c == nil {
		return
	}
	c.closeFD()
	c.mu.Lock()
	c.released = true // from here on, kill is a no-op
	c.mu.Unlock()
	if ev, err := readSmall(filepath.Join(c.path, "cgroup.events")); err == nil && bytes.Contains(ev, []byte("populated 0")) {
		if freeCgroups.put(c.path) {
			return
		}
	}
	sv.removeCgroup(c.path)
}

// cgroupSeq names exec cgroups.
var cgroupSeq atomic.Int64

// freeCgroups are emptied exec cgroups kept for the next execs.
var freeCgroups cgroupList

type cgroupList struct {
	mu    sync.Mutex
	paths []string
}

const maxFreeCgroups = 8

// take returns a free cgroup below parent, or "".
func (l *cgroupList) take(parent string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.paths) - 1; i >= 0; i-- {
		if p := l.paths[i]; filepath.Dir(p) == parent {
			l.paths = append(l.paths[:i], l.paths[i+1:]...)
			return p
		}
	}
	return ""
}

func (l *cgroupList) put(p string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.paths) >= maxFreeCgroups {
		return false
	}
	l.paths = append(l.paths, p)
	return true
}

func (sv *server) removeCgroup(p string) {
	if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.ENOENT) {
		sv.mu.Lock()
		sv.lingering = append(sv.lingering, p)
		sv.mu.Unlock()
	}
}

// killFullLeftovers kills what finished execs left running in cgroups that
// reached their task limit (pids.events counts a refused fork): fork
// bombs, which together can take every task the execs may have, so that
// no new command starts. Called, with sv.mu held, when a new exec could
// not get a task; it reports whether it killed any, once they are gone.
// Daemons an exec left behind that stay within their limit are left
// alone.
func (sv *server) killFullLeftovers() bool {
	var killed []string
	for _, p := range sv.lingering {
		ev, err := readSmall(filepath.Join(p, "pids.events")) // "max N"
		if f := strings.Fields(string(ev)); err != nil || len(f) < 2 || f[0] != "max" || f[1] == "0" {
			continue
		}
		if writeSmall(filepath.Join(p, "cgroup.kill"), "1") == nil {
			killed = append(killed, p)
			sv.log.Warn("killed what a finished exec left running at its task limit (a fork bomb)", "cgroup", p)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range killed {
		for time.Now().Before(deadline) {
			if cur, err := readSmall(filepath.Join(p, "pids.current")); err != nil || string(bytes.TrimSpace(cur)) == "0" {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return len(killed) > 0
}
