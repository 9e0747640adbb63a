package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

// A hostile guest (root in the box) must not make the host store or hold
// more than bounded amounts, nor make its box uncontrollable.

// The host keeps at most this much of a box's console (runtime: two files
// of half of it each).
const consoleCapBytes = 256 << 10

func boxDir(box *boxrun.Box) string { return filepath.Join(fx.dataDir, "boxes", box.ID) }

// alive checks that the box answers an exec with a timeout.
func alive(t *testing.T, box *boxrun.Box, what string) {
	t.Helper()
	start := time.Now()
	res, err := fx.eng.Exec(ctxT(t, 2*time.Minute), box.ID, boxrun.ExecSpec{
		Cmd: []string{"echo", "alive"}, Timeout: 60 * time.Second,
	})
	if err != nil || res.Stdout != "alive\n" {
		t.Fatalf("after %s the box does not answer: %+v %v", what, res, err)
	}
	t.Logf("after %s: exec answered in %v", what, time.Since(start).Round(time.Millisecond))
}

// removeLeavesNoVMM removes the box and checks its VMM is gone.
func removeLeavesNoVMM(t *testing.T, box *boxrun.Box) {
	t.Helper()
	if err := fx.eng.Remove(ctxT(t, time.Minute), box.ID, boxrun.Force); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if left := vmmProcesses(boxDir(box)); len(left) > 0 {
		t.Fatalf("VMM left after remove: %v", left)
	}
}

func TestHostileConsoleFlood(t *testing.T) {
	box := sharedBox(t)
	// 4 times the cap and some: the serial port runs at ~150 KB/s under
	// TCG. Not a multiple of the file's size: a flood that ends just as
	// console.log fills ends with no console.log (rotated, none started).
	const flood = 1<<20 + 1000
	start := time.Now()
	res := sh(t, box, "head -c "+strconv.Itoa(flood)+" /dev/zero | tr '\\0' x > /dev/ttyS0 && echo flooded")
	if res.Stdout != "flooded\n" {
		t.Fatalf("flood: %+v", res)
	}
	t.Logf("%d bytes written to /dev/ttyS0 in %v", flood, time.Since(start).Round(time.Millisecond))
	alive(t, box, "a console flood")
	// "flooded" comes once the guest's tty took the bytes, not once its
	// UART sent them: the relay may still be writing, and rotating (a new
	// console.log appears just after the old one is renamed). Read the
	// files once they have stopped changing.
	settled := ""
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		var now string
		for _, name := range []string{"console.log", "console.log.1"} {
			st, err := os.Stat(filepath.Join(boxDir(box), name))
			if err != nil {
				now += name + " none;"
				continue
			}
			now += fmt.Sprintf("%s %d;", name, st.Size())
		}
		if now == settled {
			break
		}
		settled = now
	}
	var total int64
	for _, name := range []string{"console.log", "console.log.1"} {
		st, err := os.Stat(filepath.Join(boxDir(box), name))
		if err != nil {
			t.Fatalf("console file: %v", err) // both exist: the flood rotated
		}
		t.Logf("%s: %d bytes", name, st.Size())
		if st.Size() > consoleCapBytes/2 {
			t.Errorf("%s is %d bytes (cap %d)", name, st.Size(), consoleCapBytes/2)
		}
		total += st.Size()
	}
	if total > consoleCapBytes {
		t.Errorf("console files hold %d bytes (cap %d)", total, consoleCapBytes)
	}
	// What is kept is the flood's end.
	b, _ := os.ReadFile(filepath.Join(boxDir(box), "console.log.1"))
	if !strings.Contains(string(b), strings.Repeat("x", 1000)) {
		t.Errorf("the kept console is not the flood's tail")
	}
}

func vmRSS(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// A command that writes as fast as it can to a caller who pauses: credit
// flow control stalls it in the guest; the host does not buffer.
func TestHostileStdoutFloodPausedReader(t *testing.T) {
	box := sharedBox(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	before := vmRSS(t)
	events, err := fx.eng.Stream(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"cat", "/dev/zero"}})
	if err != nil {
		t.Fatal(err)
	}
	drained := make(chan struct{})
	defer func() { cancel(); <-drained }()
	read := func(n int) (got int) {
		for got < n {
			ev, ok := <-events
			if !ok {
				t.Fatal("stream ended")
			}
			got += len(ev.Data)
		}
		return got
	}
	read(1 << 20) // it flows
	time.Sleep(5 * time.Second)
	grown := vmRSS(t) - before
	t.Logf("RSS %d MiB before, grew by %.1f MiB while the reader paused for 5s", before>>20, float64(grown)/(1<<20))
	if grown > 64<<20 {
		t.Errorf("RSS grew by %d MiB while the reader paused", grown>>20)
	}
	read(1 << 20) // it flows again
	go func() {
		defer close(drained)
		for range events {
		}
	}()
	cancel()
	select {
	case <-drained:
	case <-time.After(30 * time.Second):
		t.Fatal("stream did not end after cancel")
	}
	alive(t, box, "a stdout flood")
}

// A box can fill its disk, not the host's: ENOSPC in the guest, and the
// host file never grows past DiskSizeGB.
// Exec (and Run, and REST /v1/run through it) holds a command's output
// in the caller's memory: it keeps the last ExecSpec.MaxOutputBytes of
// each stream and counts the rest, however much the box writes. Before,
// `cat /dev/zero` under Exec grew the host process until it was killed.
func TestHostileExecOutputBounded(t *testing.T) {
	box := sharedBox(t)
	const limit = 256 << 10
	seq := func(from, to int) string {
		var b strings.Builder
		for i := from; i <= to; i++ {
			b.WriteString(strconv.Itoa(i))
			b.WriteByte('\n')
		}
		return b.String()
	}
	wantOut, wantErr := seq(1, 1500000), seq(1, 100000) // 10.9 MB, 589 kB
	res, err := fx.eng.Exec(ctxT(t, 5*time.Minute), box.ID, boxrun.ExecSpec{
		Cmd: []string{"sh", "-c", "seq 1 100000 >&2; seq 1 1500000"}, MaxOutputBytes: limit})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d + %d bytes written, %d + %d kept", len(wantOut), len(wantErr), len(res.Stdout), len(res.Stderr))
	if res.Stdout != wantOut[len(wantOut)-limit:] || res.StdoutDropped != int64(len(wantOut)-limit) {
		t.Errorf("stdout: kept %d bytes, dropped %d; want the last %d, %d dropped", len(res.Stdout), res.StdoutDropped, limit, len(wantOut)-limit)
	}
	if res.Stderr != wantErr[len(wantErr)-limit:] || res.StderrDropped != int64(len(wantErr)-limit) {
		t.Errorf("stderr: kept %d bytes, dropped %d; want the last %d, %d dropped", len(res.Stderr), res.StderrDropped, limit, len(wantErr)-limit)
	}
	// What it holds meanwhile (at most twice the limit) is TestTailBuffer's.
	// Under the limit (and with the engine's default), all of it.
	res = sh(t, box, "seq 1 1000")
	if res.Stdout != seq(1, 1000) || res.StdoutDropped != 0 {
		t.Errorf("a short output: %d bytes, %d dropped", len(res.Stdout), res.StdoutDropped)
	}
}

// A command's timeout holds even against root in the box that moves
// itself out of the exec's cgroup (its own cgroup2 mount) and leaves a
// process out of its group (setsid) writing to the exec's output now and
// then: at the timeout, killed or not, the agent reads what the pipe
// holds and no more. Before, the exec's output was read for as long as
// that process wrote, and Exec (and an ephemeral /v1/run) never returned.
func TestHostileTimeoutEscape(t *testing.T) {
	box := sharedBox(t)
	// The escaped writers die of SIGPIPE once the agent stops reading;
	// the shared box keeps none of them, nor the mount, either way.
	t.Cleanup(func() {
		sh(t, box, "pkill -9 -f 'seq 200' 2>/dev/null; umount /tmp/zzcg 2>/dev/null; rmdir /tmp/zzcg 2>/dev/null; true")
	})
	escape := `mkdir -p /tmp/zzcg && { grep -q ' /tmp/zzcg ' /proc/mounts || mount -t cgroup2 none /tmp/zzcg; } || exit 1
		echo $$ > /tmp/zzcg/cgroup.procs || exit 1
		grep -qx '0::/' /proc/self/cgroup || exit 1
		setsid sh -c 'for i in $(seq 200); do echo x; sleep 0.3; done' &
		`
	for _, c := range []struct {
		name, tail string
		killed     bool // by its timeout: TIMEOUT; else it ended in time, with its own exit
	}{
		{"exited in time", "sleep 0.5; exit 0", false},
		{"killed at its timeout", "sleep 60", true},
	} {
		start := time.Now()
		res, err := fx.eng.Exec(ctxT(t, 2*time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", escape + c.tail}, Timeout: 2 * time.Second})
		el := time.Since(start)
		t.Logf("%s: ended after %v: %v, %+v", c.name, el.Round(time.Millisecond), err, res)
		switch {
		case res == nil:
			t.Fatalf("%s: %v", c.name, err)
		case c.killed && (boxrun.CodeOf(err) != boxrun.Timeout || !res.TimedOut):
			t.Errorf("%s: want TIMEOUT with TimedOut set, got %v %+v", c.name, err, res)
		case !c.killed && (err != nil || res.ExitCode != 0 || res.TimedOut):
			t.Errorf("%s: want its own exit 0, got %v %+v", c.name, err, res)
		}
		if !strings.Contains(res.Stdout, "x") {
			t.Errorf("%s: the output before the timeout is missing: %q", c.name, res.Stdout)
		}
		// 2s and a read of what was left, with room for TCG; the host's
		// own backstop (exec.TimeoutBackstop, 10s) would end it later.
		if el > 8*time.Second {
			t.Errorf("%s: a 2s timeout ended after %v", c.name, el)
		}
	}
	alive(t, box, "a timeout escape")
}

// A follower (an SSE client, however slow) reads an exec's stored output
// a page at a time, not all of it at once (up to 16 MiB per follower
// before); paging must not lose any of it, while the exec runs or after
// it ended.
func TestExecEventsPageByPage(t *testing.T) {
	box := sharedBox(t)
	const size = 3000000 // three pages
	info, err := fx.eng.StartExec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' r"}})
	if err != nil {
		t.Fatal(err)
	}
	follow := func(what string) {
		evs, err := fx.eng.ExecEvents(ctxT(t, time.Minute), info.ID)
		if err != nil {
			t.Fatal(err)
		}
		n, seq := 0, 0
		var last boxrun.Event
		for ev := range evs {
			if ev.Seq != seq {
				t.Fatalf("%s: event %d after %d", what, ev.Seq, seq-1)
			}
			seq++
			if ev.Type == "log" {
				n += len(ev.Data)
			}
			last = ev
		}
		if n != size || last.Type != "exit" || last.ExitCode != 0 {
			t.Errorf("%s: %d of %d bytes, last event %+v", what, n, size, last)
		}
	}
	follow("followed as it ran")
	follow("replayed after it ended")
}

func TestHostileDiskFill(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	start := time.Now()
	res, err := fx.eng.Exec(ctxT(t, 5*time.Minute), box.ID, boxrun.ExecSpec{
		// O_DIRECT: the guest's page cache copies cost more than the
		// disk under TCG; every block still goes to the virtual disk.
		Cmd: []string{"sh", "-c", "dd if=/dev/zero of=/fill bs=4M oflag=direct 2>&1; sync; df -k /"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dd in %v: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(res.Stdout))
	if !strings.Contains(res.Stdout, "No space left on device") {
		t.Errorf("dd did not end with ENOSPC: %+v", res)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(boxDir(box), "disk.ext4"), &st); err != nil {
		t.Fatal(err)
	}
	t.Logf("host disk.ext4: apparent %d bytes, allocated %d bytes", st.Size, st.Blocks*512)
	if st.Blocks*512 > st.Size || st.Size > 1<<30 {
		t.Errorf("disk.ext4: allocated %d, apparent %d bytes (limit %d)", st.Blocks*512, st.Size, 1<<30)
	}
	alive(t, box, "a full disk")
	res = sh(t, box, "rm /fill && echo freed")
	if res.Stdout != "freed\n" {
		t.Errorf("rm: %+v", res)
	}
	removeLeavesNoVMM(t, box)
}

// Fork bomb, memory hog, then a fork bomb that escapes its exec, in one
// small box: each is ended by its timeout or the guest's OOM killer, or
// confined, and the box stays controllable.
func TestHostileForkBombAndMemoryHog(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})

	start := time.Now()
	res, err := fx.eng.Exec(ctxT(t, 3*time.Minute), box.ID, boxrun.ExecSpec{
		Cmd: []string{"sh", "-c", "b() { b | b & }; b; sleep 1000"}, Timeout: 8 * time.Second,
	})
	t.Logf("fork bomb: %v after %v (%+v)", err, time.Since(start).Round(time.Millisecond), res)
	if boxrun.CodeOf(err) != boxrun.Timeout {
		t.Errorf("fork bomb: got %v, want a TIMEOUT error", err)
	}
	alive(t, box, "a fork bomb")
	// The timeout killed the bomb's whole process group (and cgroup): once
	// its processes have died, only the sh counting them is left.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
		res = sh(t, box, "ps -o comm | grep -c '^sh$'")
		if strings.TrimSpace(res.Stdout) == "1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s sh processes survived the fork bomb's timeout", strings.TrimSpace(res.Stdout))
		}
	}

	// Three processes that each touch 150 MiB (dd's buffer, filled from
	// /dev/zero), 450 MiB in a 256 MiB box without swap. One that big
	// alone would be refused by malloc (the kernel's overcommit heuristic),
	// and head -c 600m | tail is far too slow under TCG to get anywhere.
	start = time.Now()
	res, err = fx.eng.Exec(ctxT(t, 3*time.Minute), box.ID, boxrun.ExecSpec{
		Cmd:     []string{"sh", "-c", "for i in 1 2 3; do dd if=/dev/zero of=/dev/null bs=150M count=3 & done; wait; dmesg | grep -ci 'out of memory'"},
		Timeout: 60 * time.Second,
	})
	t.Logf("memory hog: %v after %v: %+v", err, time.Since(start).Round(time.Millisecond), res)
	if err != nil || res.Stdout == "0\n" {
		t.Errorf("no OOM kill for 450 MiB in a 256 MiB box")
	}
	ooms := res.Stdout
	alive(t, box, "a memory hog")
	// However the hog is shaped, the OOM killer never picks the agent (the
	// kernel exempts init: the box is alive above), and the box's commands
	// are killable from their first instruction: nothing lowers their
	// oom_score_adj, nor that of what a command forks at once.
	if res := sh(t, box, "cat /proc/self/oom_score_adj; (cat /proc/self/oom_score_adj)"); res.Stdout != "0\n0\n" {
		t.Errorf("oom_score_adj of a command and its child: %q, want 0 and 0", res.Stdout)
	}

	// Fork bombs that leave their exec's process group (setsid) and
	// outlive the exec: confined to that exec's cgroup (task limit, CPU
	// share; see exec.ServerOptions.Cgroup), and all execs together below
	// the kernel's own task limit (threads-max: about 1500 tasks here) and
	// below what the guest's memory holds, two of them at their limits do
	// not keep the next exec from starting, nor its command from forking.
	// A daemon an earlier exec left behind is not a fork bomb: it lives on.
	if res = sh(t, box, "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo started"); res.Stdout != "started\n" {
		t.Fatalf("daemon: %+v", res)
	}
	for range 2 {
		res = sh(t, box, "setsid sh -c 'b() { b | b & }; b' </dev/null >/dev/null 2>&1 & echo started")
		if res.Stdout != "started\n" {
			t.Fatalf("escaped fork bomb: %+v", res)
		}
	}
	// Let them grow to their limits: each exec may have half of the tasks
	// of all execs together (about 820 here: one per 256 KiB of the
	// guest's memory, so that they fit in it), which they reach in seconds.
	time.Sleep(15 * time.Second)
	// The next command starts and can fork: the bombs at their limits
	// leave it less than an eighth of the execs' tasks, so the agent kills
	// them before it starts it. (Waiting for its own fork to fail would
	// let the command start whenever a bomb's task happened to be exiting,
	// and then fail at its first fork.) The guest never ran out of memory.
	start = time.Now()
	res, err = fx.eng.Exec(ctxT(t, 2*time.Minute), box.ID, boxrun.ExecSpec{
		Cmd:     []string{"sh", "-c", "echo $(echo forked); ps -o comm | grep -c '^sh$'; ps -o comm | grep -c '^sleep$'; dmesg | grep -ci 'out of memory'"},
		Timeout: 60 * time.Second,
	})
	t.Logf("first exec after two escaped fork bombs at their limits: %v after %v: %+v", err, time.Since(start).Round(time.Millisecond), res)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("after two escaped fork bombs: %+v %v", res, err)
	}
	if want := "forked\n1\n1\n" + ooms; res.Stdout != want {
		t.Errorf("after two escaped fork bombs: got %q, want %q (the command forked; one sh left, its own; the daemon alive; no new OOM kill)", res.Stdout, want)
	}

	// Processes that keep the CPU busy, left behind by a finished exec,
	// share the CPU per exec (cgroup cpu controller), not per process: the
	// next command gets its share, and the agent its own.
	res = sh(t, box, "setsid sh -c 'for i in $(seq 32); do (while :; do :; done) & done' </dev/null >/dev/null 2>&1 & echo started")
	if res.Stdout != "started\n" {
		t.Fatalf("CPU hogs: %+v", res)
	}
	time.Sleep(3 * time.Second)
	alive(t, box, "32 processes spinning on the CPU")
	sh(t, box, "kill -9 -1")
	removeLeavesNoVMM(t, box)
}

// The cpu controller, which makes execs share the CPU per exec (and all of
// them with the agent), is on only while execs compete for it: another
// exec runs, a finished one left processes running, or the command has
// run a while. A short command alone pays no group scheduling (a sixth of
// its round trip under TCG). Root in the box reads it from the cgroup
// tree, which it can mount.
func TestExecCPUControllerOnlyWhenShared(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	const read = `d=$(mktemp -d) && mount -t cgroup2 cgroup2 $d && cat $d/cgroup.subtree_control $d/execs/cgroup.subtree_control; umount $d; rmdir $d`
	const off, on = "pids\npids\n", "cpu pids\ncpu pids\n"
	// check reads the state until it is want (a leftover that was killed
	// may take a moment to be reaped), for at most 30 s.
	check := func(what, script, want string) {
		t.Helper()
		var got string
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
			if got = sh(t, box, script).Stdout; got == want {
				return
			}
		}
		t.Errorf("%s: root's and execs' subtree_control %q, want %q", what, got, want)
	}
	check("a command alone", read, off)

	x, err := fx.eng.StartExec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sleep", "600"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := sh(t, box, read).Stdout; got != on {
		t.Errorf("while another exec runs: %q, want %q", got, on)
	}
	if _, err := fx.eng.CancelExec(ctxT(t, time.Minute), x.ID); err != nil {
		t.Fatal(err)
	}
	check("after the other exec ended", read, off)

	if got := sh(t, box, "sleep 1; "+read).Stdout; got != on {
		t.Errorf("a command that has run for a second: %q, want %q", got, on)
	}
	check("the next command alone", read, off)

	if res := sh(t, box, "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo started"); res.Stdout != "started\n" {
		t.Fatalf("leftover: %+v", res)
	}
	if got := sh(t, box, read).Stdout; got != on {
		t.Errorf("a finished exec left a process running: %q, want %q", got, on)
	}
	sh(t, box, "kill -9 -1")
	check("the leftover is gone", read, off)
}
