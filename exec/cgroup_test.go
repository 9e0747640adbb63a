package exec

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
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

// What finished execs left running is a fork bomb when a fork of it was
// refused and it holds three quarters of its task limit or more.
func TestIsBomb(t *testing.T) {
	for _, tc := range []struct {
		events, current, limit string
		want                   bool
	}{
		{"max 12\n", "411\n", "411\n", true},
		{"max 1\n", "309\n", "411\n", true},
		{"max 1\n", "307\n", "411\n", false}, // below three quarters
		{"max 3\n", "1\n", "411\n", false},   // a daemon refused a fork once
		{"max 0\n", "411\n", "411\n", false}, // never refused
		{"max 5\n", "411\n", "max\n", false}, // no limit of its own
		{"", "", "", false},
	} {
		if got := isBomb([]byte(tc.events), []byte(tc.current), []byte(tc.limit)); got != tc.want {
			t.Errorf("isBomb(%q, %q, %q) = %v, want %v", tc.events, tc.current, tc.limit, got, tc.want)
		}
	}
}

// When few of the execs' tasks are free, the bombs among the cgroups that
// finished execs left running are killed (cgroup.kill), the rest left
// alone; with enough free, nothing is. On stand-in cgroup files: the
// kernel's side is the hostile integration test.
func TestKillBombs(t *testing.T) {
	parent := t.TempDir()
	write := func(p, s string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mk := func(name, events, current string) string {
		p := filepath.Join(parent, name)
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		write(filepath.Join(p, "pids.events"), events)
		write(filepath.Join(p, "pids.current"), current)
		write(filepath.Join(p, "pids.max"), "411\n")
		write(filepath.Join(p, "cgroup.kill"), "")
		return p
	}
	bomb := mk("exec-1", "max 40\n", "411\n")
	daemon := mk("exec-2", "max 2\n", "1\n")
	busy := mk("exec-3", "max 0\n", "400\n")
	sv := &server{opts: ServerOptions{Cgroup: parent}, log: testLogger()}
	sv.lingering = []string{bomb, daemon, busy}
	write(filepath.Join(parent, "pids.max"), "823\n")
	killedAs := func(p string) string {
		b, _ := os.ReadFile(filepath.Join(p, "cgroup.kill"))
		return string(b)
	}

	write(filepath.Join(parent, "pids.current"), "700\n") // 123 free: enough
	if sv.tasksLow() {
		t.Fatal("tasksLow with 123 of 823 tasks free")
	}
	write(filepath.Join(parent, "pids.current"), "812\n")
	if !sv.tasksLow() {
		t.Fatal("not tasksLow with 11 of 823 tasks free")
	}
	// The killed bomb's tasks go away, as the kernel's would.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			if killedAs(bomb) == "1" {
				os.WriteFile(filepath.Join(bomb, "pids.current"), []byte("0\n"), 0o644)
			}
		}
	}()
	if !sv.killBombs(slices.Clone(sv.lingering)) {
		t.Fatal("killBombs killed nothing")
	}
	if killedAs(bomb) != "1" || killedAs(daemon) != "" || killedAs(busy) != "" {
		t.Errorf("cgroup.kill written: bomb %q, daemon %q, busy %q; want only the bomb", killedAs(bomb), killedAs(daemon), killedAs(busy))
	}
	write(filepath.Join(parent, "pids.max"), "max\n")
	if sv.tasksLow() {
		t.Error("tasksLow without a limit")
	}
}

// A cgroup made ahead (the agent makes one at boot, before a template is
// taken) is the first exec's.
func TestPrepareCgroup(t *testing.T) {
	parent := cgroup2Parent(t)
	if err := PrepareCgroup(parent, 0); err != nil {
		t.Fatal(err)
	}
	made, _ := filepath.Glob(filepath.Join(parent, "exec-*"))
	if len(made) != 1 {
		t.Fatalf("PrepareCgroup made %v", made)
	}
	c := startServer(t, ServerOptions{Cgroup: parent})
	r := run(t, c, sh("grep ^0:: /proc/self/cgroup"))
	if got := filepath.Base(strings.TrimSpace(r.stdout)); got != filepath.Base(made[0]) {
		t.Errorf("the first exec ran in %q, want the prepared %s", r.stdout, filepath.Base(made[0]))
	}
	if left, _ := filepath.Glob(filepath.Join(parent, "exec-*")); len(left) != 1 {
		t.Errorf("cgroups after the first exec: %v, want only the prepared one", left)
	}
}
