package exec

import (
	"bytes"
	"context"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The installed toolchain's sysmon is the one patchSysmon knows: a Go
// release that changes it fails here, not silently in the agent's speed.
func TestPatchSysmon(t *testing.T) {
	if _, err := findGo(); err != nil {
		t.Skip(err)
	}
	tc, err := newAgentToolchain(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if tc.patched == nil {
		t.Fatalf("%s: runtime.sysmon has no `delay = 20` lines where patchSysmon expects them; update exec/sysmon.go", tc.goVersion)
	}
	src, err := os.ReadFile(filepath.Join(tc.goroot, "src", "runtime", "proc.go"))
	if err != nil {
		t.Fatal(err)
	}
	// Only the two lines changed, and the result is still Go.
	a, b := strings.Split(string(src), "\n"), strings.Split(string(tc.patched), "\n")
	if len(a) != len(b) {
		t.Fatalf("line count %d -> %d", len(a), len(b))
	}
	var changed []string
	for i := range a {
		if a[i] != b[i] {
			changed = append(changed, strings.TrimSpace(a[i])+" -> "+strings.TrimSpace(b[i]))
		}
	}
	want := "delay = 20 -> delay = " + strconv.Itoa(sysmonMinDelayUS)
	if len(changed) != 2 || changed[0] != want || changed[1] != want {
		t.Fatalf("changed lines: %q", changed)
	}
	if _, err := parser.ParseFile(token.NewFileSet(), "proc.go", tc.patched, parser.SkipObjectResolution); err != nil {
		t.Fatalf("patched proc.go does not parse: %v", err)
	}
	if !strings.Contains(tc.patchKey, strconv.Itoa(sysmonMinDelayUS)) {
		t.Errorf("cache key %q does not name the patch", tc.patchKey)
	}

	for name, s := range map[string]string{
		"no sysmon":        "package runtime\nfunc main() {\n\tdelay = 20\n}\n",
		"one delay line":   "package runtime\n\nfunc sysmon() {\n\t\t\tdelay = 20\n\tusleep(delay)\n}\n",
		"no usleep(delay)": "package runtime\n\nfunc sysmon() {\n\t\t\tdelay = 20\n\t\t\tdelay = 20\n}\n",
	} {
		if _, ok := patchSysmon([]byte(s), 5000); ok {
			t.Errorf("%s: patched", name)
		}
	}
	ok := "package runtime\n\nfunc sysmon() {\n\t\t\tdelay = 20\n\tusleep(delay)\n\t\t\t\t\tdelay = 20\n}\n\nfunc other() {\n\t\t\tdelay = 20\n}\n"
	p, patched := patchSysmon([]byte(ok), 5000)
	if !patched || bytes.Count(p, []byte("delay = 5000")) != 2 || !bytes.HasSuffix(p, []byte("func other() {\n\t\t\tdelay = 20\n}\n")) {
		t.Errorf("patched:\n%s", p)
	}
}

// The overlay really changes the runtime of what is built with it: with
// one P, a goroutine made runnable just before the only running one
// blocks in a system call runs when sysmon takes the P away from that
// call, after one tick, 20 us stock; with the patch the call (which the
// goroutine itself ends, by writing to the pipe the call reads) is over
// only after a patched tick. Two programs, one run each in turns; medians
// compared, with a wide margin.
func TestSysmonOverlayTakesEffect(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the Go runtime")
	}
	if _, err := findGo(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tc, err := newAgentToolchain(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if tc.patched == nil {
		t.Skip("no patch for this toolchain (TestPatchSysmon says why)")
	}
	dir := t.TempDir()
	prog := `package main

import (
	"fmt"
	"runtime"
	"syscall"
	"time"
)

func main() {
	runtime.GOMAXPROCS(1)
	var p [2]int
	if err := syscall.Pipe(p[:]); err != nil { // blocking: read is a real system call
		panic(err)
	}
	time.Sleep(50 * time.Millisecond) // sysmon settles
	start := time.Now()
	ran := make(chan time.Duration, 1)
	go func() {
		ran <- time.Since(start)
		syscall.Write(p[1], []byte("x"))
	}()
	buf := make([]byte, 1)
	if _, err := syscall.Read(p[0], buf); err != nil {
		panic(err)
	}
	fmt.Println((<-ran).Microseconds())
}
`
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module sysmontest\n\ngo 1.21\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ovDir := t.TempDir()
	ov, err := tc.flags(ovDir)
	if err != nil {
		t.Fatal(err)
	}
	env := append(tc.env, "GOFLAGS=", "GOOS=", "GOARCH=", "GOWORK=off")
	build := func(out string, flags ...string) {
		args := append(append([]string{"build"}, flags...), "-o", out, ".")
		if _, err := goOutput(ctx, tc.goBin, dir, env, args...); err != nil {
			t.Fatal(err)
		}
	}
	stock, patched := filepath.Join(dir, "stock"), filepath.Join(dir, "patched")
	build(stock)
	build(patched, ov[len(agentBuildFlags):]...)
	run := func(bin string) float64 {
		out, err := goOutput(ctx, bin, dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(out), 64)
		if err != nil {
			t.Fatalf("%s printed %q", bin, out)
		}
		return v
	}
	var s, p []float64
	for i := 0; i < 7; i++ {
		s, p = append(s, run(stock)), append(p, run(patched))
	}
	sort.Float64s(s)
	sort.Float64s(p)
	t.Logf("goroutine ran after (us, sorted): stock %v, patched %v", s, p)
	if p[3] < float64(sysmonMinDelayUS)/2 || p[3] < 4*s[3] {
		t.Errorf("median wait: stock %.0f us, patched %.0f us; want the patched one at least %d us and 4x the stock one",
			s[3], p[3], sysmonMinDelayUS/2)
	}
}
