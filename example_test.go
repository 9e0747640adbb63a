package boxrun_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/boxrun/boxrun"
)

// The whole life of a box: create it from an image, run a command, remove it.
func Example() {
	ctx := context.Background()
	eng, err := boxrun.New(ctx, boxrun.Config{})
	if err != nil {
		log.Fatal(err)
	}
	defer eng.Close()

	box, err := eng.Create(ctx, boxrun.BoxSpec{Image: "alpine", CPU: 1, MemoryMB: 512})
	if err != nil {
		log.Fatal(err)
	}
	defer eng.Remove(ctx, box.ID, boxrun.Force)

	res, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "echo hi; echo oops >&2; exit 3"}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("exit %d, stdout %q, stderr %q\n", res.ExitCode, res.Stdout, res.Stderr)
}

// Stream delivers output as the command produces it, then one exit event.
func ExampleEngine_Stream() {
	ctx := context.Background()
	eng, _ := boxrun.New(ctx, boxrun.Config{})
	defer eng.Close()
	box, _ := eng.Create(ctx, boxrun.BoxSpec{Image: "alpine"})
	defer eng.Remove(ctx, box.ID, boxrun.Force)

	events, err := eng.Stream(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.1; done"}})
	if err != nil {
		log.Fatal(err)
	}
	for ev := range events {
		switch ev.Type {
		case "log":
			fmt.Printf("#%d %s: %s", ev.Seq, ev.Stream, ev.Data)
		case "exit":
			fmt.Printf("#%d exit %d\n", ev.Seq, ev.ExitCode)
		}
	}
}

// A timeout kills the command's whole process group and reports TIMEOUT.
func ExampleEngine_Exec_timeout() {
	ctx := context.Background()
	eng, _ := boxrun.New(ctx, boxrun.Config{})
	defer eng.Close()
	box, _ := eng.Create(ctx, boxrun.BoxSpec{Image: "alpine"})
	defer eng.Remove(ctx, box.ID, boxrun.Force)

	_, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sleep", "1000"}, Timeout: 2 * time.Second})
	if boxrun.CodeOf(err) == boxrun.Timeout {
		fmt.Println("timed out")
	}
}

// Copy moves files and directory trees in and out of a box, like docker cp.
func ExampleEngine_Copy() {
	ctx := context.Background()
	eng, _ := boxrun.New(ctx, boxrun.Config{})
	defer eng.Close()
	box, _ := eng.Create(ctx, boxrun.BoxSpec{Image: "python"})
	defer eng.Remove(ctx, box.ID, boxrun.Force)

	if err := eng.Copy(ctx, "./script.py", box.ID+":/root/script.py"); err != nil {
		log.Fatal(err)
	}
	if _, err := eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"python3", "/root/script.py"}}); err != nil {
		log.Fatal(err)
	}
	if err := eng.Copy(ctx, box.ID+":/root/results", "./results"); err != nil {
		log.Fatal(err)
	}
}

// Errors carry BoxRun codes.
func ExampleCodeOf() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "boxrun-example-")
	defer os.RemoveAll(dir)
	eng, err := boxrun.New(ctx, boxrun.Config{DataDir: dir})
	if err != nil {
		log.Fatal(err)
	}
	defer eng.Close()

	_, err = eng.Get(ctx, "box_doesnotexist")
	fmt.Println(boxrun.CodeOf(err))
	_, err = eng.Create(ctx, boxrun.BoxSpec{Image: "alpine", CPU: -1})
	fmt.Println(err)
	// Output:
	// BOX_NOT_FOUND
	// [VALIDATION_ERROR] cpu must be greater than 0
}
