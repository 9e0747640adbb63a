package runtime

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun/exec"
	"github.com/boxrun/boxrun/runtime/internal/vhostvsock"
)

// TestAgentServesOnGuestVsock boots the real agent under QEMU (TCG) with
// boxrun.vsock=1024 and a vhost-user-vsock device whose back-end speaks
// Cloud Hypervisor's hybrid vsock protocol, and pings the agent through
// dialHybridVsock: on a first connection, on a second once the first is
// closed, and on a third after 2 MiB sent to the guest (credit flow on a
// real kernel). That is the guest half of the CH driver's agent channel,
// which fakech (the agent as a host process) cannot reach.
func TestAgentServesOnGuestVsock(t *testing.T) {
	qemu, err := osexec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed: run scripts/setup.sh")
	}
	if _, err := FindKernel(""); err != nil {
		t.Skipf("no guest kernel: %v", err)
	}
	start := time.Now()
	cache := t.TempDir()
	k, err := PrepareKernel("", "", cache)
	if err != nil {
		t.Fatal(err)
	}
	bctx, bcancel := context.WithTimeout(context.Background(), 5*time.Minute)
	agent, err := exec.AgentPath(bctx, cache) // may build it: not the boot's time
	bcancel()
	if err != nil {
		t.Fatal(err)
	}
	initrd, err := BuildInitramfs(k, agent, cache)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s, agent and initramfs ready in %v", k.Version, time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	dir := t.TempDir()
	// The back-end logs until Close returns (a cleanup below); nothing
	// after the test.
	var logMu sync.Mutex
	var vlog bytes.Buffer
	logf := func(format string, args ...any) {
		logMu.Lock()
		defer logMu.Unlock()
		fmt.Fprintf(&vlog, "%s "+format+"\n", append([]any{time.Since(start).Round(time.Millisecond)}, args...)...)
	}
	// Closed by its cleanup only, after QEMU's (cleanups run last first).
	backend, err := vhostvsock.Serve(context.Background(), filepath.Join(dir, "vhost.sock"), filepath.Join(dir, chVsockSock), chGuestCID, logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { backend.Close() })

	console := filepath.Join(dir, "console.log")
	cmdline := (&CloudHypervisor{}).Cmdline(VMConfig{Cmdline: "boxrun.base=/dev/vda boxrun.data=/dev/vdb"})
	cmd := osexec.Command(qemu,
		"-machine", "q35,acpi=off,memory-backend=mem",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-smp", "1", "-m", "256M",
		"-object", "memory-backend-memfd,id=mem,size=256M,share=on",
		"-accel", "tcg,thread=multi,tb-size=64", "-cpu", "max",
		"-kernel", k.Vmlinux, "-initrd", initrd, "-append", cmdline,
		"-serial", "file:"+console,
		"-chardev", "socket,id=vsk,path="+filepath.Join(dir, "vhost.sock"),
		"-device", "vhost-user-vsock-pci,chardev=vsk",
	)
	var qout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qout, &qout
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	// Registered last, run first: QEMU dies before the back-end closes.
	// The console, QEMU's output and the back-end's log are shown on
	// failure, or always with VSOCK_DEBUG=1.
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() || os.Getenv("VSOCK_DEBUG") != "" {
			out, _ := os.ReadFile(console)
			if len(out) > 4000 {
				out = out[len(out)-4000:]
			}
			t.Logf("console (tail):\n%s", out)
			t.Logf("qemu output:\n%s", qout.String())
			logMu.Lock()
			t.Logf("back-end log:\n%s", vlog.String())
			logMu.Unlock()
		}
	})

	logger := slog.New(slog.DiscardHandler)
	ping := func(what string, junk int) {
		t.Helper()
		var conn net.Conn
		var lastErr error
		for conn == nil {
			select {
			case <-exited:
				t.Fatalf("%s: QEMU exited (last dial error: %v)", what, lastErr)
			case <-ctx.Done():
				t.Fatalf("%s: no connection to the agent within the timeout (last error: %v)", what, lastErr)
			default:
			}
			c, err := dialHybridVsock(ctx, dir, chVsockSock, chAgentPort)
			if err != nil {
				lastErr = err
				time.Sleep(200 * time.Millisecond)
				continue
			}
			conn = c
		}
		t.Logf("%s: connected after %v", what, time.Since(start).Round(time.Millisecond))
		if junk > 0 {
			// The agent discards what precedes the client's Sync frame:
			// host-to-guest bulk through the guest's credit.
			conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := conn.Write(make([]byte, junk)); err != nil {
				t.Fatalf("%s: writing %d bytes: %v", what, junk, err)
			}
			conn.SetWriteDeadline(time.Time{})
			t.Logf("%s: %d bytes written after %v", what, junk, time.Since(start).Round(time.Millisecond))
		}
		client := exec.NewClient(conn, logger)
		defer client.Close()
		pctx, pcancel := context.WithTimeout(ctx, 20*time.Second)
		defer pcancel()
		if err := client.Probe(pctx); err != nil {
			t.Fatalf("%s: ping: %v", what, err)
		}
		t.Logf("%s: agent answered ping after %v", what, time.Since(start).Round(time.Millisecond))
	}
	ping("first connection", 0)
	ping("second connection", 0)
	ping("third connection", 2<<20)
	st := backend.Stats()
	t.Logf("back-end: %+v", st)
	if st.RxPackets == 0 || st.TxPackets == 0 {
		t.Fatalf("no packets through the rings: %+v", st)
	}
}
