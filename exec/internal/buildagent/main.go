// Command buildagent builds the guest agent from this module's source the
// way the engine does ([exec.BuildAgent]: static, stripped, with the
// agent's patched runtime scheduler): scripts/build.sh embeds what it
// builds, and agent benchmarks compare such builds.
//
//	go run ./exec/internal/buildagent -o /tmp/agent [-goarch arm64]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/boxrun/boxrun/exec"
)

func main() {
	out := flag.String("o", "agent", "where to write the agent binary")
	goarch := flag.String("goarch", "", "the guest's architecture (default: this program's)")
	flag.Parse()
	if err := exec.BuildAgent(context.Background(), *out, *goarch); err != nil {
		fmt.Fprintln(os.Stderr, "buildagent:", err)
		os.Exit(1)
	}
}
