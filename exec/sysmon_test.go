package exec

import (
	"bytes"
	"context"
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	goruntime "runtime"
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
	tc, err := newAgentToolchain(context.Background(), "", "")
	if err != nil {
		t.Fatal(err)
	}
	// Patched whether or not this toolchain may take an overlay (one in
	// the module cache may not: tc.patchKey says so).
	src, err := os.ReadFile(filepath.Join(tc.goroot, "src", "runtime", "proc.go"))
	if err != nil {
		t.Fatal(err)
	}
	patched, ok := patchSysmon(src, sysmonMinDelayUS)
	if !ok {
		t.Fatalf("%s: runtime.sysmon has no `delay = 20` lines where patchSysmon expects them; update exec/sysmon.go", tc.goVersion)
	}
	t.Logf("%s at %s: %s", tc.goVersion, tc.goroot, tc.patchKey)
	// Only the two lines changed, and the result is still Go.
	a, b := strings.Split(string(src), "\n"), strings.Split(string(patched), "\n")
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
	if _, err := parser.ParseFile(token.NewFileSet(), "proc.go", patched, parser.SkipObjectResolution); err != nil {
		t.Fatalf("patched proc.go does not parse: %v", err)
	}
	if tc.patched != nil && !strings.Contains(tc.patchKey, strconv.Itoa(sysmonMinDelayUS)) {
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
	good := "package runtime\n\nfunc sysmon() {\n\t\t\tdelay = 20\n\tusleep(delay)\n\t\t\t\t\tdelay = 20\n}\n\nfunc other() {\n\t\t\tdelay = 20\n}\n"
	p, patchedOK := patchSysmon([]byte(good), 5000)
	if !patchedOK || bytes.Count(p, []byte("delay = 5000")) != 2 || !bytes.HasSuffix(p, []byte("func other() {\n\t\t\tdelay = 20\n}\n")) {
		t.Errorf("patched:\n%s", p)
	}
}

// The overlay really changes the runtime of what is built with it: the
// machine code of runtime.sysmon in a program built with it loads the
// patched delay (twice) and the stock one's does not. Then what it does,
// logged (timings are not asserted): with one P, a goroutine made runnable
// just before the only running one blocks in a system call runs when
// sysmon takes the P from that call, a tick or two later (the goroutine
// itself ends the call, by writing to the pipe it reads): tens of
// microseconds stock, milliseconds patched.
func TestSysmonOverlayTakesEffect(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the Go runtime")
	}
	if _, err := findGo(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tc, err := newAgentToolchain(ctx, "", "")
	if err != nil {
		t.Fatal(err)
	}
	if tc.patched == nil {
		t.Skipf("no patch for this toolchain (%s; TestPatchSysmon says why)", tc.patchKey)
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
	buf := make([]byte, 1)
	for i := 0; i < 8; i++ {
		start := time.Now()
		ran := make(chan time.Duration, 1)
		go func() {
			ran <- time.Since(start)
			syscall.Write(p[1], []byte("x"))
		}()
		if _, err := syscall.Read(p[0], buf); err != nil {
			panic(err)
		}
		fmt.Println((<-ran).Microseconds())
	}
}
`
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module sysmontest\n\ngo 1.21\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ov, err := tc.flags(t.TempDir())
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
	// MOVL $0x1388 (5000, or whatever the patch sets) in sysmon's code;
	// the format is amd64's.
	if goruntime.GOARCH != "amd64" {
		t.Skipf("the check reads amd64 code; this is %s", goruntime.GOARCH)
	}
	imm := fmt.Sprintf("$%#x,", sysmonMinDelayUS)
	for bin, want := range map[string]bool{stock: false, patched: true} {
		out, err := goOutput(ctx, tc.goBin, dir, env, "tool", "objdump", "-s", "^runtime.sysmon$", bin)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "TEXT runtime.sysmon") {
			t.Fatalf("objdump of %s has no runtime.sysmon:\n%.500s", bin, out)
		}
		if n := strings.Count(out, imm); (n > 0) != want {
			t.Errorf("%s: runtime.sysmon has %d instructions with %s", filepath.Base(bin), n, imm)
		}
	}
	for _, bin := range []string{stock, patched} {
		out, err := goOutput(ctx, bin, dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: the goroutine ran after %s us", filepath.Base(bin), strings.Join(strings.Fields(out), " "))
	}
}

func TestOverlayAllowed(t *testing.T) {
	for _, c := range []struct {
		goroot, modcache string
		want             bool
	}{
		{"/usr/local/go", "/root/go/pkg/mod", true},
		{"/root/go/pkg/mod/golang.org/toolchain@v0.0.1-go1.26.8.linux-amd64", "/root/go/pkg/mod", false},
		{"/root/go/pkg/mod", "/root/go/pkg/mod", false},
		{"/root/go/pkg/modx/go", "/root/go/pkg/mod", true},
		{"/usr/local/go", "", true},
	} {
		if got := overlayAllowed(c.goroot, c.modcache); got != c.want {
			t.Errorf("overlayAllowed(%q, %q) = %v", c.goroot, c.modcache, got)
		}
	}
}
