package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

// BenchmarkAgents compares guest agents with each other in one run: the
// way to measure a change to the agent, since the host's load moves the
// ratios to the bare baselines by more than most changes do. Each agent
// gets an engine of its own, the same image and box shape; the agents
// take turns, and each one's median is reported with its ratio to the
// first's. Build each agent as the engine does, from the source checked
// out at the time, with `go run ./exec/internal/buildagent -o PATH`:
//
//	BOXRUN_BENCH_AGENTS=old=/tmp/agent-old,new=/tmp/agent-new \
//	  go test -run XXX -bench Agents -benchtime 300x ./bench/
//
// exec times `exec true` in a box per agent, exec-busy the same with a
// background process left in each box; warm times a warm create to
// its first `exec true` answered (each agent makes its own template
// first). Under TCG, the same agent in two boxes differs by 2-5% in such
// a run: smaller differences are noise.
func BenchmarkAgents(b *testing.B) {
	spec := os.Getenv("BOXRUN_BENCH_AGENTS")
	if spec == "" {
		b.Skip("set BOXRUN_BENCH_AGENTS=name=path,name=path,... to compare agents")
	}
	setup(b)
	type agent struct {
		name string
		eng  *boxrun.Engine
		box  string
	}
	var agents []*agent
	for i, kv := range strings.Split(spec, ",") {
		name, path, ok := strings.Cut(kv, "=")
		if !ok || name == "" || path == "" {
			b.Fatalf("BOXRUN_BENCH_AGENTS: %q is not name=path", kv)
		}
		eng, err := boxrun.New(context.Background(), boxrun.Config{
			DataDir: filepath.Join(env.tmp, fmt.Sprintf("agent%d", i)), AgentPath: path, MaxCPU: 64})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { eng.Close() })
		box, err := eng.Create(context.Background(), boxSpec()) // also makes the template
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { eng.Remove(context.Background(), box.ID, boxrun.Force) })
		agents = append(agents, &agent{name: name, eng: eng, box: box.ID})
	}
	// execTrue runs `true`; b is the (sub-)benchmark calling it: FailNow
	// must come from its own goroutine.
	execTrue := func(b *testing.B, eng *boxrun.Engine, box string) {
		res, err := eng.Exec(context.Background(), box, boxrun.ExecSpec{Cmd: []string{"true"}})
		if err != nil || res.ExitCode != 0 {
			b.Fatal(res, err)
		}
	}
	// compare runs once per agent in turns; once returns what it timed, in ms.
	compare := func(b *testing.B, once func(a *agent) float64) {
		times := make([][]float64, len(agents))
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			for j := range agents {
				k := (i + j) % len(agents) // each agent goes first in turn
				times[k] = append(times[k], once(agents[k]))
			}
		}
		b.StopTimer()
		first := median(times[0])
		for k, a := range agents {
			m := median(times[k])
			b.ReportMetric(m, a.name+"-ms")
			b.ReportMetric(m/first, a.name+"/"+agents[0].name)
		}
	}
	b.Run("exec", func(b *testing.B) {
		for _, a := range agents {
			for range 10 { // the box's first execs are slower
				execTrue(b, a.eng, a.box)
			}
		}
		compare(b, func(a *agent) float64 {
			t0 := time.Now()
			execTrue(b, a.eng, a.box)
			return time.Since(t0).Seconds() * 1000
		})
	})
	b.Run("warm", func(b *testing.B) {
		compare(b, func(a *agent) float64 {
			t0 := time.Now()
			box, err := a.eng.Create(context.Background(), boxSpec())
			if err != nil {
				b.Fatal(err)
			}
			execTrue(b, a.eng, box.ID)
			ms := time.Since(t0).Seconds() * 1000
			b.StopTimer()
			a.eng.Remove(context.Background(), box.ID, boxrun.Force)
			b.StartTimer()
			return ms
		})
	})
	// exec again, with a process left running in each box (an orphan of
	// the agent, as a box's background service is): the agent's reaper
	// then blocks in waitid whenever an exec's command exits. Last: the
	// processes stay.
	b.Run("exec-busy", func(b *testing.B) {
		for _, a := range agents {
			res, err := a.eng.Exec(context.Background(), a.box, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "sleep 100000 >/dev/null 2>&1 &"}})
			if err != nil || res.ExitCode != 0 {
				b.Fatal(res, err)
			}
			for range 10 {
				execTrue(b, a.eng, a.box)
			}
		}
		compare(b, func(a *agent) float64 {
			t0 := time.Now()
			execTrue(b, a.eng, a.box)
			return time.Since(t0).Seconds() * 1000
		})
	})
}
