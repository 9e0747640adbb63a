// Command netinit is the network benchmark's PID 1: it loads the virtio
// modules the initramfs lists, gives eth0 the box address (10.0.2.15/24),
// and for each 'g' read on the agent's virtio-serial port downloads
// everything 10.0.2.2:<netbench.port> sends and answers the byte count,
// so the benchmark can time one network backend against another with the
// same guest.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	os.MkdirAll("/sys", 0o755)
	os.MkdirAll("/dev", 0o755)
	os.MkdirAll("/proc", 0o755)
	unix.Mount("sysfs", "/sys", "sysfs", 0, "")
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	unix.Mount("proc", "/proc", "proc", 0, "")
	mods, _ := os.ReadFile("/etc/boxrun/modules")
	for _, m := range strings.Fields(string(mods)) {
		if f, err := os.Open("/lib/modules/" + m); err == nil {
			unix.FinitModule(int(f.Fd()), "", 0)
			f.Close()
		}
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	var target string
	mtu := 0
	for _, f := range strings.Fields(string(cmdline)) {
		if p, ok := strings.CutPrefix(f, "netbench.port="); ok {
			target = "10.0.2.2:" + p
		}
		if m, ok := strings.CutPrefix(f, "netbench.mtu="); ok {
			mtu, _ = strconv.Atoi(m)
		}
	}
	for {
		if _, err := os.Stat("/sys/class/net/eth0"); err == nil {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err := up("eth0", mtu); err != nil {
		fmt.Fprintln(os.Stderr, "netinit:", err)
	}
	port := agentPort()
	buf := make([]byte, 1)
	for {
		if n, _ := port.Read(buf); n == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		var got int64
		conn, err := net.Dial("tcp", target)
		if err == nil {
			got, _ = io.Copy(io.Discard, conn)
			conn.Close()
		}
		fmt.Fprintf(port, "%d\n", got)
	}
}

// up gives ifname 10.0.2.15/24 and brings it up (the /24 route follows).
func up(ifname string, mtu int) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for _, set := range []struct {
		req  uint
		addr []byte
	}{{unix.SIOCSIFADDR, []byte{10, 0, 2, 15}}, {unix.SIOCSIFNETMASK, []byte{255, 255, 255, 0}}} {
		ifr, err := unix.NewIfreq(ifname)
		if err != nil {
			return err
		}
		if err := ifr.SetInet4Addr(set.addr); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, set.req, ifr); err != nil {
			return err
		}
	}
	if mtu > 0 {
		ifr, _ := unix.NewIfreq(ifname)
		ifr.SetUint32(uint32(mtu))
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFMTU, ifr); err != nil {
			return err
		}
	}
	ifr, _ := unix.NewIfreq(ifname)
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

func agentPort() *os.File {
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			if b, _ := os.ReadFile(n); strings.TrimSpace(string(b)) == "boxrun.agent" {
				if f, err := os.OpenFile("/dev/"+filepath.Base(filepath.Dir(n)), os.O_RDWR, 0); err == nil {
					return f
				}
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
}
