package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun/network"
	"github.com/boxrun/boxrun/runtime"
)

const netBytes = 32 << 20

// netVM is a guest running bench/netinit: 'g' on its agent port makes it
// download from 10.0.2.2:<port> and answer the byte count.
type netVM struct {
	agent io.ReadWriteCloser
	lines *bufio.Reader
	stop  func()
}

func (v *netVM) download(b *testing.B) time.Duration {
	start := time.Now()
	if _, err := v.agent.Write([]byte("g")); err != nil {
		b.Fatal(err)
	}
	line, err := v.lines.ReadString('\n')
	if err != nil {
		b.Fatal(err)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(line)); n != netBytes {
		b.Fatalf("guest downloaded %q bytes, want %d", strings.TrimSpace(line), netBytes)
	}
	return time.Since(start)
}

// BenchmarkNetwork: a guest's TCP download from a server on the host,
// through boxrun's userspace network (package network: policy-checked NAT
// on gVisor's netstack) against QEMU's built-in user-mode network (slirp,
// which boxrun used before and which let guests reach the host's
// loopback). Same guest (netinit), kernel and flags; downloads alternate
// in one loop. Goal: boxrun/slirp ≥ 0.8.
func BenchmarkNetwork(b *testing.B) {
	setup(b)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		zero := make([]byte, 256<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				for n := 0; n < netBytes; n += len(zero) {
					if _, err := c.Write(zero); err != nil {
						break
					}
				}
				c.Close()
			}()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	init := filepath.Join(env.tmp, "netinit")
	build := exec.Command("go", "build", "-o", init, "github.com/boxrun/boxrun/bench/netinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build netinit: %v\n%s", err, out)
	}
	initrd, err := runtime.BuildInitramfs(env.kernel, init, filepath.Join(env.tmp, "cache"))
	if err != nil {
		b.Fatal(err)
	}
	cfg := func(name string, mtu int) runtime.VMConfig {
		dir := filepath.Join(env.tmp, name)
		os.MkdirAll(dir, 0o700)
		return runtime.VMConfig{ID: name, Dir: dir, CPUs: 1, MemoryMB: 256, Kernel: env.kernel.Vmlinux, Initramfs: initrd,
			Cmdline: fmt.Sprintf("netbench.port=%d netbench.mtu=%d", port, mtu), Network: true}
	}
	slirp := slirpVM(b, cfg("net-slirp", 1500)) // slirp's MTU
	defer slirp.stop()
	ours := boxrunNetVM(b, cfg("net-boxrun", network.MTU), port) // as the engine sets it
	defer ours.stop()
	slirp.download(b) // warm both paths up once
	ours.download(b)
	b.ResetTimer()
	var ts, to time.Duration
	for i := 0; i < b.N; i++ {
		ts += slirp.download(b)
		to += ours.download(b)
	}
	mb := float64(netBytes*b.N) / 1e6
	b.ReportMetric(mb/ts.Seconds(), "slirp-MB/s")
	b.ReportMetric(mb/to.Seconds(), "boxrun-MB/s")
	b.ReportMetric(ts.Seconds()/to.Seconds(), "boxrun/slirp")
}

// slirpVM boots the guest with QEMU's user-mode network: the same command
// line as runtime.QEMU's, with the NIC's backend swapped.
func slirpVM(b *testing.B, cfg runtime.VMConfig) *netVM {
	args := (&runtime.QEMU{}).Args(cfg)
	swapped := false
	for i, a := range args {
		if strings.HasPrefix(a, "stream,id=net0") {
			args[i], swapped = "user,id=net0", true
		}
		if strings.HasPrefix(a, "socket,id=console,") {
			args[i] = "null,id=console" // nobody relays this VM's console
		}
	}
	if !swapped {
		b.Fatal("no stream netdev in QEMU's arguments")
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.Dir = cfg.Dir
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	stop := func() { cmd.Process.Kill(); cmd.Wait() }
	var conn net.Conn
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if conn, err = net.Dial("unix", filepath.Join(cfg.Dir, "agent.sock")); err == nil {
			break
		}
	}
	if err != nil {
		stop()
		b.Fatal(err)
	}
	return &netVM{agent: conn, lines: bufio.NewReader(conn), stop: func() { conn.Close(); stop() }}
}

// boxrunNetVM boots the guest through the runtime, its NIC served by a
// network.Network that allows the host's port.
func boxrunNetVM(b *testing.B, cfg runtime.VMConfig, port int) *netVM {
	ctx := context.Background()
	vm, err := (&runtime.QEMU{}).Start(ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	f, err := network.NewFilter(network.Policy{AllowHostPorts: []int{port}})
	if err != nil {
		vm.Kill()
		b.Fatal(err)
	}
	nw, err := network.New(network.Config{Filter: f})
	if err != nil {
		vm.Kill()
		b.Fatal(err)
	}
	nconn, err := vm.DialNetwork(ctx)
	if err != nil {
		vm.Kill()
		nw.Close()
		b.Fatal(err)
	}
	nw.Attach(nconn)
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		vm.Kill()
		nw.Close()
		b.Fatal(err)
	}
	return &netVM{agent: conn, lines: bufio.NewReader(conn), stop: func() { conn.Close(); vm.Kill(); nw.Close() }}
}
