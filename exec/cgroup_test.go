package exec

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cgroup2Parent makes a cgroup v2 directory for a test's execs (the host's
// unified hierarchy; controllers are not needed to place processes), and
// removes it and what is left below it at the end.
func cgroup2Parent(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("making cgroups needs root")
	}
	root := ""
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	for sc := bufio.NewScanner(f); sc.Scan(); {
		// ... mountpoint ... - cgroup2 ...
		fields := strings.Fields(sc.Text())
		for i, fl := range fields {
			if fl == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" {
				root = fields[4]
			}
		}
		if root != "" {
			break
		}
	}
	if root == "" {
		t.Skip("no cgroup v2 hierarchy mounted")
	}
	dir, err := os.MkdirTemp(root, "boxrun-test-")
	if err != nil {
		t.Skipf("cannot make a cgroup under %s: %v", root, err)
	}
	t.Cleanup(func() {
		subs, _ := filepath.Glob(filepath.Join(dir, "exec-*"))
		for _, s := range subs {
			writeSmall(filepath.Join(s, "cgroup.kill"), "1")
			for deadline := time.Now().Add(5 * time.Second); unix.Rmdir(s) == unix.EBUSY && time.Now().Before(deadline); {
				time.Sleep(10 * time.Millisecond)
			}
		}
		if err := unix.Rmdir(dir); err != nil {
			t.Errorf("cgroup %s left behind: %v", dir, err)
		}
	})
	return dir
}

// Each exec runs in a cgroup of its own below ServerOptions.Cgroup. An
// emptied one is taken again by the next exec; one that a finished exec
// left a process in is not, and is removed once it has emptied.
func TestExecCgroupReuse(t *testing.T) {
	parent := cgroup2Parent(t)
	c := startServer(t, ServerOptions{Cgroup: parent})
	rel := strings.TrimPrefix(parent, filepath.Dir(parent))
	cgroupOf := func(cmd Command) (string, string) {
		t.Helper()
		r := run(t, c, cmd)
		if r.exit.Code != 0 {
			t.Fatalf("%q: %+v %s", cmd.Args, r.exit, r.stderr)
		}
		lines := strings.Split(trim(r.stdout), "\n")
		cg := strings.TrimPrefix(lines[0], "0::")
		if filepath.Dir(cg) != rel || !strings.HasPrefix(filepath.Base(cg), "exec-") {
			t.Fatalf("%q ran in cgroup %q, want one below %s", cmd.Args, lines[0], rel)
		}
		return filepath.Base(cg), strings.Join(lines[1:], "\n")
	}
	first, _ := cgroupOf(sh("grep ^0:: /proc/self/cgroup"))
	for i := 0; i < 3; i++ {
		if got, _ := cgroupOf(sh("grep ^0:: /proc/self/cgroup")); got != first {
			t.Errorf("exec %d ran in %s, want the emptied %s again", i+2, got, first)
		}
	}
	// A free cgroup removed behind the agent's back (root in the box can
	// mount the cgroup tree) is passed over.
	if err := unix.Rmdir(filepath.Join(parent, first)); err != nil {
		t.Fatal(err)
	}
	if got, _ := cgroupOf(sh("grep ^0:: /proc/self/cgroup")); got == first {
		t.Fatalf("an exec ran in the removed cgroup %s", first)
	}
	// A daemon left behind keeps its exec's cgroup busy: the next exec
	// gets another one.
	busy, pid := cgroupOf(sh("grep ^0:: /proc/self/cgroup; sleep 60 </dev/null >/dev/null 2>&1 & echo $!"))
	daemon, err := strconv.Atoi(pid)
	if err != nil {
		t.Fatalf("daemon pid %q", pid)
	}
	next, _ := cgroupOf(sh("grep ^0:: /proc/self/cgroup"))
	if next == busy {
		t.Fatalf("an exec ran in %s, where a daemon of an earlier exec still runs", busy)
	}
	// Once the daemon is gone, the cgroup goes when a new one is made.
	unix.Kill(daemon, unix.SIGKILL)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		ev, _ := os.ReadFile(filepath.Join(parent, busy, "cgroup.events"))
		if strings.Contains(string(ev), "populated 0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon %d still in %s", daemon, busy)
		}
	}
	// Two execs at once: the second needs a new cgroup, whose making
	// removes the emptied leftover.
	p1, err := c.Start(t.Context(), sh("sleep 0.5"))
	if err != nil {
		t.Fatal(err)
	}
	cgroupOf(sh("grep ^0:: /proc/self/cgroup"))
	collect(t, p1)
	if _, err := os.Stat(filepath.Join(parent, busy)); !os.IsNotExist(err) {
		t.Errorf("the emptied cgroup %s of a finished exec was not removed: %v", busy, err)
	}
}

// pids.events counts the forks a cgroup's task limit refused: a cgroup
// with any is not reused, and what a finished exec left in one is a fork
// bomb.
func TestForksRefused(t *testing.T) {
	for ev, want := range map[string]bool{
		"max 3\n": true,
		"max 0\n": false,
		"":        false,
		"max\n":   false,
	} {
		if got := forksRefused([]byte(ev)); got != want {
			t.Errorf("forksRefused(%q) = %v, want %v", ev, got, want)
		}
	}
}
