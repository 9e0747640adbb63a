package runtime

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// consoleFiles returns the sizes of dir's console files (-1: missing).
func consoleFiles(dir string) (cur, old int64) {
	cur, old = -1, -1
	if st, err := os.Stat(filepath.Join(dir, consoleLog)); err == nil {
		cur = st.Size()
	}
	if st, err := os.Stat(filepath.Join(dir, consoleOld)); err == nil {
		old = st.Size()
	}
	return cur, old
}

// The relay keeps the last consoleMax bytes at most, in two files whose
// concatenation is the stream's tail, and continues a console.log left by an
// earlier relay (an engine restart) without exceeding the cap.
func TestConsoleRelayCaps(t *testing.T) {
	dir := t.TempDir()
	// An earlier relay's file, nearly full.
	if err := os.WriteFile(filepath.Join(dir, consoleLog), bytes.Repeat([]byte("a"), consoleFileMax-10), 0o600); err != nil {
		t.Fatal(err)
	}
	var stream bytes.Buffer
	for i := 0; stream.Len() < 3*consoleMax+12345; i++ {
		fmt.Fprintf(&stream, "line %d %s\n", i, strings.Repeat("y", i%200))
	}
	guest, host := net.Pipe()
	r := startRelay(dir, host)
	if runningRelay(dir) != r {
		t.Fatal("relay not registered")
	}
	go func() {
		for p := stream.Bytes(); len(p) > 0; {
			n := min(len(p), 7777)
			guest.Write(p[:n])
			p = p[n:]
		}
		guest.Close()
	}()
	if !r.wait(10 * time.Second) {
		t.Fatal("relay did not stop at EOF")
	}
	if runningRelay(dir) != nil {
		t.Error("a stopped relay is still registered")
	}
	cur, old := consoleFiles(dir)
	if cur > consoleFileMax || old > consoleFileMax || cur < 0 || old < 0 {
		t.Fatalf("console files of %d and %d bytes (cap %d each)", cur, old, consoleFileMax)
	}
	a, _ := os.ReadFile(filepath.Join(dir, consoleOld))
	b, _ := os.ReadFile(filepath.Join(dir, consoleLog))
	if kept := append(a, b...); !bytes.HasSuffix(stream.Bytes(), kept) || len(kept) < consoleFileMax {
		t.Errorf("the files (%d bytes) are not the stream's tail", len(kept))
	}
	want := stream.Bytes()[stream.Len()-consoleTailLen:]
	if got := consoleTail(dir, consoleTailLen); got != string(want) {
		t.Errorf("tail of %d bytes is not the stream's last %d", len(got), consoleTailLen)
	}
	// A tail that spans both files.
	if got, want := consoleTail(dir, int(cur)+100), string(stream.Bytes()[stream.Len()-int(cur)-100:]); got != want {
		t.Errorf("tail across the rotation: %d bytes, want %d", len(got), len(want))
	}
}

var tickRE = regexp.MustCompile(`tick (\d+)\r?\n`)

// lastTick is the number of the last "tick N" line on the console, or 0.
func lastTick(vm VM) int {
	m := tickRE.FindAllStringSubmatch(vm.Console(), -1)
	if len(m) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(m[len(m)-1][1])
	return n
}

// On a real VM: early boot output is kept, a flood leaves at most consoleMax
// bytes on the host, the console keeps working after the relay's process
// "died" and a new one attached, and the tail is there after QEMU is gone.
func TestQEMUConsoleBoundedAndReattached(t *testing.T) {
	const flood = 384 << 10 // 1.5 times the cap: rotates, and drops a file
	vm, _ := bootInitVM(t, "github.com/boxrun/boxrun/runtime/testdata/consoleinit", "console", "flood="+strconv.Itoa(flood))
	qv := vm.(*qemuVM)
	waitConsole := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for !cond() {
			if time.Now().After(deadline) || qv.exited() {
				t.Fatalf("console: no %s\n%s", what, vm.Console())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	start := time.Now()
	waitConsole("flood", func() bool { return strings.Contains(vm.Console(), "consoleinit: flooded") })
	waitConsole("tick", func() bool { return lastTick(vm) > 0 })
	t.Logf("%d bytes flooded after %v", flood, time.Since(start).Round(time.Millisecond))
	cur, old := consoleFiles(qv.dir)
	t.Logf("console files: %d + %d bytes", cur, old)
	if cur > consoleFileMax || old > consoleFileMax || old < 0 {
		t.Errorf("console files of %d and %d bytes after a %d-byte flood (cap %d each)", cur, old, flood, consoleFileMax)
	}

	// The engine's process dies: its relay's connection goes away. The
	// guest goes on (QEMU drops its console output meanwhile), and a new
	// engine's Attach relays it again.
	qv.relay.conn.Close()
	if !qv.relay.wait(5 * time.Second) {
		t.Fatal("relay did not stop")
	}
	before := lastTick(vm)
	time.Sleep(500 * time.Millisecond)
	if qv.exited() {
		t.Fatal("QEMU exited without its console client")
	}
	if got := lastTick(vm); got != before {
		t.Fatalf("tick %d written with no relay", got)
	}
	att, err := (&QEMU{}).Attach(context.Background(), qv.dir, "console")
	if err != nil {
		t.Fatal(err)
	}
	defer att.Kill()
	if att.(*qemuVM).relay == nil {
		t.Fatal("Attach did not relay the console")
	}
	waitConsole("tick after Attach", func() bool { return lastTick(att) > before+1 })
	// QEMU dropped what the guest wrote meanwhile: it neither stalled the
	// guest nor kept the output (10 ticks of 50ms went by without a relay).
	first := 0
	for _, m := range tickRE.FindAllStringSubmatch(att.Console(), -1) {
		if n, _ := strconv.Atoi(m[1]); n > before {
			first = n
			break
		}
	}
	t.Logf("last tick before the relay went away: %d; first after Attach: %d", before, first)
	if first < before+5 {
		t.Errorf("tick %d before the relay went away, tick %d first after Attach: output was held, not dropped", before, first)
	}
	// A second Attach in this process shares the running relay.
	att2, err := (&QEMU{}).Attach(context.Background(), qv.dir, "console")
	if err != nil {
		t.Fatal(err)
	}
	if att2.(*qemuVM).relay != att.(*qemuVM).relay {
		t.Error("a second Attach started a second relay")
	}

	if err := att.Kill(); err != nil {
		t.Fatal(err)
	}
	<-vm.Done()
	if !strings.Contains(vm.Console(), "tick ") || !strings.Contains(att.Console(), "tick ") {
		t.Errorf("no console tail after QEMU exited:\n%s", att.Console())
	}
	if _, err := os.Stat(filepath.Join(qv.dir, consoleSock)); err == nil {
		t.Error("console socket left after Kill")
	}
}
