// Command demo boots a box from a locally built busybox image, runs a
// command in it and prints the output and the time each step took.
//
//	scripts/demo.sh            # sets the host up, then: go run ./examples/demo
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/internal/testenv"
)

func main() {
	cmd := flag.String("c", `echo "hello from $(hostname), kernel $(uname -r)"; echo "$(nproc) cpu, $(free -m | awk '/Mem/{print $2}') MiB"`, "shell command to run in the box")
	verbose := flag.Bool("v", false, "log the engine's steps")
	flag.Parse()
	if err := run(*cmd, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(script string, verbose bool) error {
	ctx := context.Background()
	step := func(name string, start time.Time) {
		fmt.Printf("%-28s %8.2fs\n", name, time.Since(start).Seconds())
	}
	t := time.Now()
	layout := filepath.Join(os.TempDir(), "boxrun-demo-busybox")
	os.RemoveAll(layout)
	if err := testenv.WriteBusyboxLayout(layout, testenv.LayoutOptions{}); err != nil {
		return err
	}
	defer os.RemoveAll(layout)
	step("build busybox OCI image", t)

	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	t = time.Now()
	eng, err := boxrun.New(ctx, boxrun.Config{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))})
	if err != nil {
		return err
	}
	defer eng.Close()
	step("open engine", t)

	t = time.Now()
	box, err := eng.Create(ctx, boxrun.BoxSpec{Image: "oci:" + layout + ":latest", CPU: 1, MemoryMB: 512, DiskSizeGB: 1})
	if err != nil {
		return err
	}
	step("create box "+box.ID, t)

	t = time.Now()
	res, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", script}})
	if err != nil {
		return err
	}
	step("exec", t)

	t = time.Now()
	if _, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"true"}}); err != nil {
		return err
	}
	step("exec true (round trip)", t)

	t = time.Now()
	if err := eng.Remove(ctx, box.ID, boxrun.Force); err != nil {
		return err
	}
	step("remove box", t)

	// A second box of the same shape is restored from the template the
	// first one made (the warm start), instead of booting.
	t = time.Now()
	box2, err := eng.Create(ctx, boxrun.BoxSpec{Image: "oci:" + layout + ":latest", CPU: 1, MemoryMB: 512, DiskSizeGB: 1})
	if err != nil {
		return err
	}
	if _, err := eng.Exec(ctx, box2.ID, boxrun.ExecSpec{Cmd: []string{"true"}}); err != nil {
		return err
	}
	step("second box to first exec", t)
	if err := eng.Remove(ctx, box2.ID, boxrun.Force); err != nil {
		return err
	}
	b := eng.Info().Boots
	fmt.Printf("boots: %d cold, %d warm (templates made: %d, fallbacks: %d)\n", b.Cold, b.Warm, b.Templates, b.Fallbacks)

	fmt.Printf("\n--- output (exit code %d) ---\n%s", res.ExitCode, res.Stdout)
	if res.Stderr != "" {
		fmt.Printf("--- stderr ---\n%s", res.Stderr)
	}
	return nil
}
