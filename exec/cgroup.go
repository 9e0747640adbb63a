package exec

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// execCgroup is the cgroup v2 directory one exec runs in (see
// ServerOptions.Cgroup).
type execCgroup struct {
	path string
	fd   int // the directory, for CLONE_INTO_CGROUP; -1 once closed
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
	sv.cgroupSeq++
	p := filepath.Join(sv.opts.Cgroup, fmt.Sprintf("exec-%d", sv.cgroupSeq))
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
	if c != nil {
		_ = os.WriteFile(filepath.Join(c.path, "cgroup.kill"), []byte("1"), 0)
	}
}

// release removes the cgroup of a finished exec, or keeps it for later
// while processes it left behind still run in it.
func (sv *server) release(c *execCgroup) {
	if c == nil {
		return
	}
	c.closeFD()
	sv.removeCgroup(c.path)
}

func (sv *server) removeCgroup(p string) {
	if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.ENOENT) {
		sv.mu.Lock()
		sv.lingering = append(sv.lingering, p)
		sv.mu.Unlock()
	}
}
