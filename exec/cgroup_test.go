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

// What finished execs left running is killed for new execs: every
// leftover refused a fork that holds an eighth of the execs' tasks or
// more, however many are free; then, while fewer than an eighth would be
// free, the others that hold the most first. A small daemon stays. On
// stand-in cgroup files: the kernel's side is the hostile integration test.
func TestKillLeftovers(t *testing.T) {
	write := func(p, s string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	killed := func(p string) bool {
		b, _ := os.ReadFile(filepath.Join(p, "cgroup.kill"))
		return string(b) == "1"
	}
	type left struct {
		tasks   int
		refused bool
	}
	// run makes a parent with a task limit, used of them in use, and
	// leftovers, and kills among them; it returns the leftovers killed and
	// the lingering list after.
	run := func(t *testing.T, limit, used string, leftovers map[string]left, short bool) (map[string]bool, []string) {
		parent := t.TempDir()
		write(filepath.Join(parent, "pids.max"), limit)
		write(filepath.Join(parent, "pids.current"), used)
		sv := &server{opts: ServerOptions{Cgroup: parent}, log: testLogger()}
		for name, l := range leftovers {
			p := filepath.Join(parent, name)
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
			write(filepath.Join(p, "pids.current"), strconv.Itoa(l.tasks)+"\n")
			ev := "max 0\n"
			if l.refused {
				ev = "max 17\n"
			}
			write(filepath.Join(p, "pids.events"), ev)
			write(filepath.Join(p, "cgroup.kill"), "")
			sv.lingering = append(sv.lingering, p)
		}
		sv.lingering = append(sv.lingering, filepath.Join(parent, "gone")) // removed meanwhile
		// Killed tasks go away, as the kernel's would.
		paths := slices.Clone(sv.lingering)
		stop, stopped := make(chan struct{}), make(chan struct{})
		defer func() { close(stop); <-stopped }()
		go func() {
			defer close(stopped)
			for {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
				for _, p := range paths {
					if killed(p) {
						os.WriteFile(filepath.Join(p, "pids.current"), []byte("0\n"), 0o644)
					}
				}
			}
		}()
		sv.killLeftovers(short)
		got := map[string]bool{}
		for name := range leftovers {
			got[name] = killed(filepath.Join(parent, name))
		}
		return got, sv.lingering
	}
	for _, tc := range []struct {
		name, limit, used string
		leftovers         map[string]left
		short             bool
		want              []string // killed
	}{
		{"two bombs, few tasks free", "823\n", "812\n",
			map[string]left{"bomb1": {411, true}, "bomb2": {400, true}, "daemon": {1, true}}, false,
			[]string{"bomb1", "bomb2"}},
		{"two bombs in a dip", "823\n", "600\n",
			map[string]left{"bomb1": {300, true}, "bomb2": {250, true}, "daemon": {1, false}}, false,
			[]string{"bomb1", "bomb2"}},
		{"a big daemon never refused, tasks free", "823\n", "600\n",
			map[string]left{"workers": {300, false}, "daemon": {3, true}}, false,
			nil},
		{"a refused daemon of 60 threads, tasks free", "823\n", "600\n",
			map[string]left{"jvm": {60, true}}, false,
			nil},
		{"a big daemon and two bombs, few tasks free", "823\n", "815\n",
			// The bombs free enough: the daemon stays.
			map[string]left{"workers": {300, false}, "bomb1": {250, true}, "bomb2": {250, true}}, false,
			[]string{"bomb1", "bomb2"}},
		{"many small bombs, few tasks free", "823\n", "815\n",
			// 94 tasks lacking: the three largest (40+39+38).
			map[string]left{"b0": {40, true}, "b1": {39, true}, "b2": {38, false}, "b3": {37, true}, "b4": {36, true}, "daemon": {2, false}}, false,
			[]string{"b0", "b1", "b2"}},
		{"a fork refused, tasks free", "823\n", "700\n",
			map[string]left{"d1": {5, false}, "d2": {3, false}}, true,
			[]string{"d1"}},
		{"no limit", "max\n", "815\n",
			map[string]left{"bomb": {600, true}}, false,
			nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, lingering := run(t, tc.limit, tc.used, tc.leftovers, tc.short)
			for name := range tc.leftovers {
				if want := slices.Contains(tc.want, name); got[name] != want {
					t.Errorf("%s killed: %v, want %v", name, got[name], want)
				}
			}
			if tc.limit != "max\n" && slices.ContainsFunc(lingering, func(p string) bool { return filepath.Base(p) == "gone" }) {
				t.Errorf("a cgroup that is gone is still lingering: %v", lingering)
			}
		})
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

// With FairCPU, the cpu controller is on only while execs compete for the
// CPU: another exec's process runs, or a finished exec left processes
// running. (Stand-in files: the kernel's side, including the order of the
// writes, is checked by the integration tests.)
func TestShareCPU(t *testing.T) {
	parent := t.TempDir()
	execs := filepath.Join(parent, "execs")
	if err := os.Mkdir(execs, 0o755); err != nil {
		t.Fatal(err)
	}
	ctls := []string{filepath.Join(parent, "cgroup.subtree_control"), filepath.Join(execs, "cgroup.subtree_control")}
	setCtls := func(s string) {
		for _, f := range ctls {
			if err := os.WriteFile(f, []byte(s), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The last write to each file: "+cpu", "-cpu", or what was there.
	state := func() string {
		var s []string
		for _, f := range ctls {
			b, _ := os.ReadFile(f)
			s = append(s, strings.TrimSpace(string(b)))
		}
		return strings.Join(s, " | ")
	}
	check := func(what, want string) {
		t.Helper()
		if got := state(); got != want {
			t.Errorf("%s: subtree_control %q, want %q", what, got, want)
		}
	}
	setCtls("pids\n")
	sv := &server{opts: ServerOptions{Cgroup: execs, FairCPU: true}, log: testLogger(), pgids: map[int]struct{}{}}

	sv.shareCPU()
	check("alone", "pids | pids") // already off: nothing written
	sv.pgids[42] = struct{}{}
	sv.shareCPU()
	check("another exec runs", "+cpu | +cpu")
	delete(sv.pgids, 42)
	sv.shareCPU()
	check("alone again", "-cpu | -cpu")
	sv.lingering = []string{filepath.Join(execs, "exec-x")}
	sv.shareCPU()
	check("a finished exec left processes", "+cpu | +cpu")
	sv.lingering = nil
	sv.shareCPU()
	check("they are gone", "-cpu | -cpu")

	// An exec that ends and leaves processes turns it on at once, before
	// the next exec asks.
	left := filepath.Join(execs, "exec-left")
	if err := os.Mkdir(left, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(left, "cgroup.events"), []byte("populated 1\nfrozen 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := openCgroup(left, 0)
	if err != nil {
		t.Fatal(err)
	}
	sv.release(c)
	check("an exec left a process behind", "+cpu | +cpu")
	if !slices.Contains(sv.lingering, left) {
		t.Errorf("lingering %v, want %s in it", sv.lingering, left)
	}
	sv.lingering = nil

	// Without FairCPU nothing is written.
	setCtls("pids\n")
	other := &server{opts: ServerOptions{Cgroup: execs}, log: testLogger(), pgids: map[int]struct{}{42: {}}}
	other.shareCPU()
	check("without FairCPU", "pids | pids")

	// A switch reads the kernel's state first: on, an exec alone turns it
	// off. A write that fails leaves the switch alone from then on.
	parent2 := t.TempDir()
	execs2 := filepath.Join(parent2, "execs")
	if err := os.Mkdir(execs2, 0o755); err != nil {
		t.Fatal(err)
	}
	ctls = []string{filepath.Join(parent2, "cgroup.subtree_control"), filepath.Join(execs2, "cgroup.subtree_control")}
	setCtls("cpu pids\n")
	sv2 := &server{opts: ServerOptions{Cgroup: execs2, FairCPU: true}, log: testLogger(), pgids: map[int]struct{}{}}
	sv2.shareCPU()
	check("found on, exec alone", "-cpupids | -cpupids") // "-cpu" written over "cpu pids"
	os.Remove(ctls[1])
	if err := os.Mkdir(ctls[1], 0o755); err != nil { // writing it fails
		t.Fatal(err)
	}
	sv2.pgids[7] = struct{}{}
	sv2.shareCPU()
	if b, _ := os.ReadFile(ctls[0]); strings.TrimSpace(string(b)) != "+cpupids" {
		t.Errorf("parent's subtree_control %q, want +cpu first", b)
	}
	os.WriteFile(ctls[0], []byte("pids\n"), 0o644)
	delete(sv2.pgids, 7)
	sv2.shareCPU()
	if b, _ := os.ReadFile(ctls[0]); strings.TrimSpace(string(b)) != "pids" {
		t.Errorf("after a failed write the switch wrote again: parent's %q", b)
	}
}
