package exec

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// sysmonMinDelayUS is the shortest sleep, in microseconds, of the guest
// agent's sysmon: the Go runtime's monitor thread (stock: 20).
//
// Why the agent's runtime is patched: with GOMAXPROCS=1 (a box of one
// vCPU), sysmon takes the only P away from any system call that has lasted
// more than one of its ticks, and hands it to another thread; the call's
// thread must then get a P back when it returns. Under TCG a system call of
// the exec path (openat2 on the overlay, a cgroup file, the virtio port,
// the reaper's waitid while `true` runs) lasts tens to thousands of
// microseconds, so at 20 us ticks every exec made some 70 guest context
// switches, most of them this hand-off, and the agent's threads used more
// CPU than the command itself. At 5 ms a short exec runs on one thread from
// request to answer (26-30 switches): `exec true` took 0.77-0.84 of the
// time (same-run A/B, bench/BenchmarkAgents; 2 ms: 0.85, 1 ms: 0.85-0.89,
// 10 ms: no better than 5) and a warm create 0.91. Putting sysmon's thread
// at SCHED_IDLE instead changed nothing (0.995): its hand-offs, not its
// own ticks, were the cost.
//
// What it costs: a goroutine that needs the P while another blocks in a
// system call waits for sysmon's next tick or two (5-10 ms; up to 20 ms
// after a quiet spell, when the ticks have grown to their 10 ms maximum),
// once per blocking call. The reaper's waitid, the one blocking call of
// every exec, gives its P up instead when it blocks while children live on
// (Reaper.loop, waitChildBlocking). Nothing else sysmon does is on a
// shorter clock: it polls the network after 10 ms without a poll and
// preempts after 10 ms of running. Deep sleep, when every P is idle, is
// unchanged, so an idle box stays quiet.
const sysmonMinDelayUS = 5000

// sysmonDelay is the statement of runtime.sysmon that sets its shortest
// sleep, on lines of its own: at the start of each round and after a
// wake-up by a system call. (No regexp: this package is in the agent.)
const sysmonDelay = "delay = 20"

// patchSysmon returns the runtime's proc.go (src) with sysmon's shortest
// sleep set to us, and false when src does not have the sysmon this patch
// knows (a Go release that changed it): the agent is then built with the
// stock runtime, slower but correct. TestPatchSysmon checks the installed
// toolchain, so such a release fails the tests rather than going unseen.
func patchSysmon(src []byte, us int) ([]byte, bool) {
	start := bytes.Index(src, []byte("\nfunc sysmon() {\n"))
	if start < 0 {
		return nil, false
	}
	end := bytes.Index(src[start:], []byte("\n}\n"))
	if end < 0 {
		return nil, false
	}
	end += start
	lines := bytes.SplitAfter(src[start:end], []byte("\n"))
	n := 0
	for i, l := range lines {
		if t := bytes.TrimLeft(l, "\t"); len(t) < len(l) && string(bytes.TrimSuffix(t, []byte("\n"))) == sysmonDelay {
			indent, nl := l[:len(l)-len(t)], l[len(l)-1:]
			if nl[0] != '\n' {
				nl = nil
			}
			lines[i] = fmt.Appendf(nil, "%sdelay = %d%s", indent, us, nl)
			n++
		}
	}
	if n != 2 || !bytes.Contains(src[start:end], []byte("usleep(delay)")) {
		return nil, false
	}
	out := make([]byte, 0, len(src)+8)
	out = append(out, src[:start]...)
	out = append(out, bytes.Join(lines, nil)...)
	return append(out, src[end:]...), true
}

// sysmonOverlay reads GOROOT's runtime/proc.go and patches it (see
// sysmonMinDelayUS). key names the result for the agent's cache key.
func sysmonOverlay(goroot string) (patched []byte, key string, err error) {
	src, err := os.ReadFile(filepath.Join(goroot, "src", "runtime", "proc.go"))
	if err != nil {
		return nil, "", err
	}
	p, ok := patchSysmon(src, sysmonMinDelayUS)
	if !ok {
		return nil, "sysmon: stock", nil
	}
	return p, fmt.Sprintf("sysmon: min delay %d us", sysmonMinDelayUS), nil
}

// writeOverlay writes patched into dir with a `go build -overlay` file
// that puts it in place of GOROOT's runtime/proc.go, and returns the
// build flag that uses it.
func writeOverlay(goroot, dir string, patched []byte) (string, error) {
	proc := filepath.Join(dir, "proc.go")
	if err := os.WriteFile(proc, patched, 0o644); err != nil {
		return "", err
	}
	ov, err := json.Marshal(map[string]map[string]string{
		"Replace": {filepath.Join(goroot, "src", "runtime", "proc.go"): proc},
	})
	if err != nil {
		return "", err
	}
	file := filepath.Join(dir, "overlay.json")
	if err := os.WriteFile(file, ov, 0o644); err != nil {
		return "", err
	}
	return "-overlay=" + file, nil
}
