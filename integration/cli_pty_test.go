package integration

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// TestCLIAttachPTY drives `boxrun attach` through a real PTY, as a person
// at a terminal would: type a command and read its output, resize the
// window and see `stty size` change, exit with a code that comes back, and
// find the terminal as it was.
func TestCLIAttachPTY(t *testing.T) {
	bin := cliBinary(t)
	tmp := t.TempDir()
	state := filepath.Join(tmp, "state")
	port := startServe(t, bin, state)
	c := &boxrunCLI{bin: bin, dir: tmp, env: cliEnv("BOXRUN_STATE_DIR="+state, "BOXRUN_PORT="+strconv.Itoa(port), "BOXRUN_NO_AUTOSTART=1")}
	out := c.must(t, "create", fx.regRef, "-n", "pty", "--cpu", "1", "-m", "256", "-d", "1")
	id := strings.SplitN(out, "\n", 2)[0]
	defer c.run(t, "rm", "-f", id)

	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 30, Cols: 100}); err != nil {
		t.Fatal(err)
	}
	before, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "attach", id)
	cmd.Env, cmd.Dir = c.env, tmp
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	var mu sync.Mutex
	var screen bytes.Buffer
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ptmx.Read(buf)
			mu.Lock()
			screen.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	expect := func(want string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			mu.Lock()
			got := screen.String()
			mu.Unlock()
			if strings.Contains(got, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %q on the terminal; it shows %q", want, got)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	typeLine := func(s string) {
		t.Helper()
		if _, err := ptmx.Write([]byte(s + "\r")); err != nil {
			t.Fatal(err)
		}
	}
	typeLine("stty size; echo ready-$((20+22))")
	expect("ready-42")
	expect("30 100")
	// While raw, the local terminal does not echo or cook: the box does.
	if raw, _ := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS); raw.Lflag&(unix.ICANON|unix.ECHO) != 0 {
		t.Errorf("attach did not put the terminal in raw mode (lflag %#x)", raw.Lflag)
	}
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 120}); err != nil { // SIGWINCH to boxrun
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	typeLine("stty size")
	expect("40 120")
	typeLine("exit 5")
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 5 {
			t.Errorf("boxrun attach ended with %v, want exit code 5", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("boxrun attach did not exit after `exit 5`")
	}
	after, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if after.Lflag != before.Lflag || after.Iflag != before.Iflag || after.Oflag != before.Oflag {
		t.Errorf("terminal not restored: lflag %#x→%#x iflag %#x→%#x oflag %#x→%#x",
			before.Lflag, after.Lflag, before.Iflag, after.Iflag, before.Oflag, after.Oflag)
	}
	tty.Close()
	// The box outlives the session.
	if code, o, _ := c.run(t, "exec", id, "--", "echo", "still-here"); code != 0 || o != "still-here\n" {
		t.Errorf("box after detach: exit %d %q", code, o)
	}
}
