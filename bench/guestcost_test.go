package bench

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/boxrun/boxrun"
)

// BenchmarkGuestCost says where an `exec true`'s guest time goes, from
// the guest's own counters read before and after b.N execs (by two
// commands in the box, which add under 1% at 200 execs): the CPU time of
// the agent's threads (PID 1), of the kernel's threads, and the guest's
// context switches, per exec. Under TCG a context switch between
// processes flushes QEMU's software TLB, so switches cost the command
// too, not only the switcher. sysmon-ms is the Go runtime's monitor
// thread, the agent's first thread after its main one.
//
//	go test -run XXX -bench GuestCost -benchtime 200x ./bench/
func BenchmarkGuestCost(b *testing.B) {
	setup(b)
	run := func(cmd string) string {
		res, err := env.eng.Exec(context.Background(), env.box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", cmd}})
		if err != nil || res.ExitCode != 0 {
			b.Fatal(res, err)
		}
		return res.Stdout
	}
	type counters struct {
		agent, sysmon, kthreads, switches float64
	}
	// schedstat's first field: ns on the CPU. Kernel threads have an
	// empty cmdline.
	snap := func() counters {
		var c counters
		sysmon := ""
		out := run(`for t in /proc/1/task/*; do echo A ${t##*/} $(cat $t/schedstat); done
for p in /proc/[0-9]*; do [ -z "$(cat $p/cmdline 2>/dev/null)" ] && echo K $(cat $p/schedstat 2>/dev/null); done
grep ctxt /proc/stat`)
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			switch f[0] {
			case "A":
				if len(f) < 3 { // the thread ended between the listing and the read
					continue
				}
				v, _ := strconv.ParseFloat(f[2], 64)
				c.agent += v
				if tid, _ := strconv.Atoi(f[1]); tid > 1 {
					if s, _ := strconv.Atoi(sysmon); sysmon == "" || tid < s {
						sysmon, c.sysmon = f[1], v
					}
				}
			case "K":
				v, _ := strconv.ParseFloat(f[1], 64)
				c.kthreads += v
			case "ctxt":
				c.switches, _ = strconv.ParseFloat(f[1], 64)
			}
		}
		return c
	}
	for i := 0; i < 20; i++ { // warm the path
		run("true")
	}
	before := snap()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		res, err := env.eng.Exec(context.Background(), env.box.ID, boxrun.ExecSpec{Cmd: []string{"true"}})
		if err != nil || res.ExitCode != 0 {
			b.Fatal(res, err)
		}
	}
	b.StopTimer()
	after := snap()
	n := float64(b.N)
	b.ReportMetric((after.agent-before.agent)/n/1e6, "agent-ms")
	b.ReportMetric((after.sysmon-before.sysmon)/n/1e6, "sysmon-ms")
	b.ReportMetric((after.kthreads-before.kthreads)/n/1e6, "kthreads-ms")
	b.ReportMetric((after.switches-before.switches)/n, "switches")
}
