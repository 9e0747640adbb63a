package exec

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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
	// The directory (for CLONE_INTO_CGROUP), its cgroup.events and its
	// pids.events (-1 without the pids controller), open for as long as
	// the cgroup is kept for reuse: opened once per cgroup, not per exec.
	// (A profile of the agent under TCG put a tenth of its time per exec
	// into opening and reading cgroup.events alone.)
	fd, events, pidsEvents int

	mu       sync.Mutex
	released bool // given back: a late kill (timeout, cancel) must not reach the next exec
}

// newExecCgroup returns the cgroup of a new exec: an emptied one of an
// earlier exec, or a new one; nil when execs get none. Making a new one
// first removes the cgroups of finished execs that have emptied since.
func (sv *server) newExecCgroup() (*execCgroup, error) {
	sv.mu.Lock()
	if sv.opts.Cgroup == "" {
		sv.mu.Unlock()
		return nil, nil
	}
	// Fork bombs that finished execs left behind go before the next exec
	// starts (killLeftovers): waiting until the exec's own fork fails
	// would let the command start whenever the bombs' tasks happen to dip,
	// and then fail at its own first fork. (Outside sv.mu: they may take a
	// while to die.)
	if len(sv.lingering) > 0 {
		sv.unlocked(func() { sv.killLeftovers(false) })
	}
	// An emptied cgroup of an earlier exec is taken again: making and
	// removing one costs milliseconds under TCG, on every exec.
	if c := freeCgroups.take(sv.opts.Cgroup); c != nil {
		sv.mu.Unlock()
		return c, nil
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
	c, err := openCgroup(p, sv.opts.PidsMax)
	if err != nil {
		unix.Rmdir(p)
		return nil, err
	}
	return c, nil
}

// PrepareCgroup makes an exec cgroup below parent (ServerOptions.Cgroup)
// with a task limit of pidsMax, and keeps it for the next exec, as if an
// earlier exec had emptied it. The agent makes one at boot: a VM restored
// from a template that holds it does not make the first exec's cgroup,
// which is slow kernel work done for the first time in that VM.
func PrepareCgroup(parent string, pidsMax int) error {
	p := filepath.Join(parent, fmt.Sprintf("exec-%d", cgroupSeq.Add(1)))
	if err := os.Mkdir(p, 0o755); err != nil {
		return err
	}
	c, err := openCgroup(p, pidsMax)
	if err != nil {
		unix.Rmdir(p)
		return err
	}
	if !freeCgroups.put(c) {
		c.close()
		unix.Rmdir(p)
	}
	return nil
}

// openCgroup sets a new cgroup's task limit (0: none) and opens it.
func openCgroup(p string, pidsMax int) (*execCgroup, error) {
	if pidsMax > 0 {
		if err := writeSmall(filepath.Join(p, "pids.max"), strconv.Itoa(pidsMax)); err != nil {
			return nil, err
		}
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	events, err := unix.Openat(fd, "cgroup.events", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	pidsEvents, err := unix.Openat(fd, "pids.events", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		pidsEvents = -1
	}
	return &execCgroup{path: p, fd: fd, events: events, pidsEvents: pidsEvents}, nil
}

// close closes the cgroup's descriptors (it is not kept for reuse).
func (c *execCgroup) close() {
	unix.Close(c.fd)
	unix.Close(c.events)
	if c.pidsEvents >= 0 {
		unix.Close(c.pidsEvents)
	}
}

// empty reports whether no process is left in the cgroup. A read at
// offset 0 of a cgroup file regenerates it: the descriptor is read again.
func (c *execCgroup) empty() bool {
	var buf [256]byte
	n, err := unix.Pread(c.events, buf[:], 0)
	return err == nil && bytes.Contains(buf[:max(n, 0)], []byte("populated 0"))
}

// refusedFork reports whether a fork in the cgroup was refused
// (pids.events counts them, and never goes back). Such a cgroup is not
// taken again: a count in a cgroup then always belongs to its last exec,
// and marks what that exec left behind (killLeftovers).
func (c *execCgroup) refusedFork() bool {
	if c.pidsEvents < 0 {
		return false
	}
	var buf [64]byte
	n, err := unix.Pread(c.pidsEvents, buf[:], 0)
	return err != nil || forksRefused(buf[:max(n, 0)])
}

// forksRefused parses pids.events ("max N"): N > 0.
func forksRefused(ev []byte) bool {
	f := strings.Fields(string(ev))
	return len(f) >= 2 && f[0] == "max" && f[1] != "0"
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
		_ = writeSmall(filepath.Join(c.path, "cgroup.kill"), "1")
	}
}

// release keeps the cgroup of a finished exec for the next exec once it
// is empty (at most maxFreeCgroups of them; the others are removed), or
// for later removal while processes it left behind still run in it.
func (sv *server) release(c *execCgroup) {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.released = true // from here on, kill is a no-op
	c.mu.Unlock()
	empty := c.empty()
	if empty && !c.refusedFork() && freeCgroups.put(c) {
		return
	}
	c.close()
	if !empty {
		// What it left runs on: the next execs share the CPU with it.
		sv.cpu().set(true, sv)
	}
	sv.removeCgroup(c.path)
}

// cgroupSeq names exec cgroups.
var cgroupSeq atomic.Int64

// freeCgroups are emptied exec cgroups kept for the next execs.
var freeCgroups cgroupList

type cgroupList struct {
	mu   sync.Mutex
	free []*execCgroup
}

const maxFreeCgroups = 8 // per parent

// take returns a free cgroup below parent, or nil. One that is not empty
// any more, or gone (root in the box can mount the cgroup tree and move
// processes or remove directories), is closed and passed over.
func (l *cgroupList) take(parent string) *execCgroup {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.free) - 1; i >= 0; i-- {
		if c := l.free[i]; filepath.Dir(c.path) == parent {
			l.free = append(l.free[:i], l.free[i+1:]...)
			if !c.empty() {
				c.close()
				continue
			}
			return &execCgroup{path: c.path, fd: c.fd, events: c.events, pidsEvents: c.pidsEvents}
		}
	}
	return nil
}

// put keeps c, unless maxFreeCgroups of its parent's are kept already.
// Kept cgroups of other parents that are gone (a server's parent removed,
// as tests do) are dropped on the way.
func (l *cgroupList) put(c *execCgroup) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	kept := l.free[:0]
	for _, f := range l.free {
		switch {
		case filepath.Dir(f.path) == filepath.Dir(c.path):
			n++
		case !f.empty():
			f.close()
			continue
		}
		kept = append(kept, f)
	}
	l.free = kept
	if n >= maxFreeCgroups {
		return false
	}
	l.free = append(l.free, c)
	return true
}

func (sv *server) removeCgroup(p string) {
	if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.ENOENT) {
		sv.mu.Lock()
		sv.lingering = append(sv.lingering, p)
		sv.mu.Unlock()
	}
}

// killLeftovers kills what finished execs left running (sv.lingering)
// where it keeps new execs from their tasks. With m the tasks all execs
// may have together (the parent cgroup's pids.max):
//   - every leftover that was refused a fork and holds an eighth of m or
//     more (at least 32) goes: fork bombs, all of them at once, or those
//     left would take the freed tasks again; and whatever is free at the
//     moment, since a bomb's tasks come and go, and a command started in
//     a dip would fail at its own first fork;
//   - then, if fewer than an eighth of m would be free, or short (the new
//     exec's fork was refused), the others, those that hold the most
//     tasks first, until enough would be: bombs that keep each other below
//     their own limits may not show a refusal of their own (from Linux
//     6.12 the parent's refusals count in the parent). A daemon of a few
//     tasks is the last to go.
//
// Leftovers that have emptied, or are gone, are removed. Called without
// sv.mu; it returns once what it killed is gone (or after drainTimeout).
func (sv *server) killLeftovers(short bool) {
	sv.killMu.Lock()
	defer sv.killMu.Unlock()
	sv.mu.Lock()
	lingering := slices.Clone(sv.lingering)
	sv.mu.Unlock()
	if sv.tasksMax == 0 {
		sv.tasksMax = -1
		if b, err := readSmall(filepath.Join(sv.opts.Cgroup, "pids.max")); err == nil {
			if n, err := strconv.Atoi(string(bytes.TrimSpace(b))); err == nil && n > 0 {
				sv.tasksMax = n
			}
		}
	}
	m := sv.tasksMax
	if m < 0 {
		return
	}
	big := max(m/8, 32)
	type leftover struct {
		path    string
		tasks   int
		refused bool
	}
	var drop, killed []string
	var rest []leftover
	kill := func(l leftover, why string) {
		if writeSmall(filepath.Join(l.path, "cgroup.kill"), "1") == nil {
			killed = append(killed, l.path)
			sv.log.Warn("killed what a finished exec left running", "why", why, "cgroup", l.path, "tasks", l.tasks)
		}
	}
	freed := 0
	for _, p := range lingering {
		ev, err := readSmall(filepath.Join(p, "pids.events"))
		if err != nil {
			drop = append(drop, p) // gone
			continue
		}
		cur, err := readSmall(filepath.Join(p, "pids.current"))
		n, err2 := strconv.Atoi(string(bytes.TrimSpace(cur)))
		switch {
		case err != nil || err2 != nil:
			drop = append(drop, p)
		case n == 0:
			drop = append(drop, p) // emptied: removed below
		case n >= big && forksRefused(ev):
			kill(leftover{p, n, true}, "a fork bomb: refused a fork, holds many tasks")
			freed += n
		default:
			rest = append(rest, leftover{p, n, false})
		}
	}
	cur, err := readSmall(filepath.Join(sv.opts.Cgroup, "pids.current"))
	c, err2 := strconv.Atoi(string(bytes.TrimSpace(cur)))
	if err == nil && err2 == nil {
		need := max(m/8, 8) - (m - c) - freed
		if short {
			need = max(need, 1)
		}
		slices.SortStableFunc(rest, func(a, b leftover) int { return b.tasks - a.tasks })
		for _, l := range rest {
			if need <= 0 {
				break
			}
			kill(l, "the execs' tasks ran out")
			need -= l.tasks
		}
	}
	deadline := time.Now().Add(drainTimeout)
	for _, p := range killed {
		for time.Now().Before(deadline) {
			if cur, err := readSmall(filepath.Join(p, "pids.current")); err != nil || string(bytes.TrimSpace(cur)) == "0" {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		drop = append(drop, p)
	}
	for _, p := range drop {
		if err := unix.Rmdir(p); err == nil || errors.Is(err, unix.ENOENT) {
			sv.mu.Lock()
			sv.lingering = slices.DeleteFunc(sv.lingering, func(l string) bool { return l == p })
			sv.mu.Unlock()
		}
	}
}

// drainTimeout bounds the wait for killed fork bombs to be gone (their
// tasks reaped) before the exec that killed them forks.
const drainTimeout = 10 * time.Second

// longExec is how long an exec runs before it counts as a long one: the
// cpu controller is turned on for it (ServerOptions.FairCPU), and the
// host learns that it started if Command.LateStart held that back. Long
// enough that a short command (`true`, `ls`: 10-20 ms under TCG) never
// gets there, short enough that a command which goes on to fill the CPU
// soon shares it with the agent again.
const longExec = 50 * time.Millisecond

// cpuSwitch turns the cpu controller on and off for the execs below one
// Cgroup (ServerOptions.FairCPU). On, each exec's cgroup gets an even
// share of the CPU against every other exec, and all execs together
// against the agent; but a task in any cgroup of its own (not the root's)
// pays for group scheduling at every fork, exec, sleep and exit, and
// under TCG that is a sixth of a short exec's round trip (0.85 without
// it, same-run A/B of 200 `exec true`). Nothing needs sharing while one
// exec runs alone and no finished exec left anything running: the
// controller is on only while something competes for the CPU.
type cpuSwitch struct {
	// The parent's and Cgroup's cgroup.subtree_control: turned on in this
	// order, off in reverse (a controller must be on in a cgroup's parent
	// before it can be on in the cgroup).
	ctls [2]string

	mu     sync.Mutex
	on     bool
	known  bool // on was read from the kernel, or written
	broken bool // a write failed: left as it is from then on
}

// cpuSwitches are the cpu switches of the Cgroups servers use: the
// switch outlives a server (a host session), like the kernel's state.
var cpuSwitches sync.Map // Cgroup -> *cpuSwitch

// cpu returns the server's cpu switch; nil without FairCPU.
func (sv *server) cpu() *cpuSwitch {
	if !sv.opts.FairCPU || sv.opts.Cgroup == "" {
		return nil
	}
	if v, ok := cpuSwitches.Load(sv.opts.Cgroup); ok {
		return v.(*cpuSwitch)
	}
	v, _ := cpuSwitches.LoadOrStore(sv.opts.Cgroup, &cpuSwitch{ctls: [2]string{
		filepath.Join(filepath.Dir(sv.opts.Cgroup), "cgroup.subtree_control"),
		filepath.Join(sv.opts.Cgroup, "cgroup.subtree_control"),
	}})
	return v.(*cpuSwitch)
}

// isOn reports whether the controller is on, as far as the switch knows.
func (c *cpuSwitch) isOn() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.on
}

// set turns the controller on or off. A failed write is logged and
// leaves the switch as it is from then on: on, execs still share the CPU
// fairly; off, they run as without the controller.
func (c *cpuSwitch) set(on bool, sv *server) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken {
		return
	}
	if !c.known {
		b, err := readSmall(c.ctls[1])
		c.on, c.known = err == nil && slices.Contains(strings.Fields(string(b)), "cpu"), true
	}
	if c.on == on {
		return
	}
	ctls, op := []string{c.ctls[0], c.ctls[1]}, "+cpu"
	if !on {
		ctls, op = []string{c.ctls[1], c.ctls[0]}, "-cpu"
	}
	for _, f := range ctls {
		if err := writeSmall(f, op); err != nil {
			c.broken = true
			sv.log.Warn("exec cgroups: cpu controller", "op", op, "file", f, "err", err)
			return
		}
	}
	c.on = on
	sv.log.Debug("exec cgroups: cpu controller", "on", on)
}

// shareCPU sets the cpu switch for an exec about to start: on when
// another exec's process runs or a finished exec left processes running,
// off when it will run alone.
func (sv *server) shareCPU() {
	c := sv.cpu()
	if c == nil {
		return
	}
	sv.mu.Lock()
	busy := len(sv.pgids) > 0 || len(sv.lingering) > 0
	sv.mu.Unlock()
	c.set(busy, sv)
}
