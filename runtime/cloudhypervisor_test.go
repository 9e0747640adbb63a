package runtime

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun/network"
)

func TestCHNetMTUIsTheNetworkMTU(t *testing.T) {
	if chNetMTU != network.MTU {
		t.Fatalf("chNetMTU %d, network.MTU %d", chNetMTU, network.MTU)
	}
}

// TestCHTapBridge checks DialNetwork's stream over the TAP the driver
// makes, with the test in CH's place on the TAP's other end: frames cross
// both ways, and the host's IP stack does not answer the guest (its ARP
// for a host address goes unanswered).
func TestCHTapBridge(t *testing.T) {
	if !canTap() {
		t.Skip("needs root and /dev/net/tun (CAP_NET_ADMIN, CAP_NET_RAW)")
	}
	const id = "box_taptest"
	tap, err := setupTap(id)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		deleteTap(id)
		tapName, br := tapNames(id)
		if linkExists(tapName) || linkExists(br) {
			t.Error("tap or bridge left behind")
		}
	}()
	// Attach as CH does: same flags, a 12-byte virtio-net header.
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ifr, _ := unix.NewIfreq(tap)
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, 12); err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(fd, true)
	guest := os.NewFile(uintptr(fd), "tap")
	defer guest.Close()
	ifc, err := net.InterfaceByName(tap)
	if err != nil || ifc.MTU != chNetMTU {
		t.Fatalf("tap %v, err %v (want MTU %d)", ifc, err, chNetMTU)
	}

	conn, err := dialTap(tap)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	guestMAC := []byte{0x52, 0x54, 0, 1, 2, 3}
	gwMAC := []byte{0x52, 0x54, 0, 9, 9, 9}
	frame := func(dst, src []byte, typ uint16, payload []byte) []byte {
		f := append(append(append([]byte{}, dst...), src...), byte(typ>>8), byte(typ))
		return append(f, payload...)
	}
	readGuest := func(d time.Duration) ([]byte, error) {
		guest.SetReadDeadline(time.Now().Add(d))
		buf := make([]byte, 70000)
		n, err := guest.Read(buf)
		if err != nil {
			return nil, err
		}
		return buf[12:n], nil // past the virtio-net header
	}

	// Guest -> engine: a frame of the largest size the MTU allows.
	big := frame(gwMAC, guestMAC, 0x0800, bytes.Repeat([]byte{0xab}, chNetMTU))
	if _, err := guest.Write(append(make([]byte, 12), big...)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4+len(big))
	done := make(chan error, 1)
	go func() { _, err := io.ReadFull(conn, got); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the guest's frame did not arrive")
	}
	if n := binary.BigEndian.Uint32(got); n != uint32(len(big)) || !bytes.Equal(got[4:], big) {
		t.Fatalf("engine read a frame of %d bytes, want the guest's %d", n, len(big))
	}

	// Engine -> guest, written in two pieces.
	small := frame(guestMAC, gwMAC, 0x0800, []byte("hello guest"))
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(small)))
	msg = append(msg, small...)
	if _, err := conn.Write(msg[:7]); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(msg[7:]); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := readGuest(5 * time.Second)
		if err != nil {
			t.Fatalf("the engine's frame did not arrive: %v", err)
		}
		if bytes.Equal(f, small) {
			break
		}
		t.Logf("other frame to the guest: % x", f[:min(len(f), 32)])
	}

	// The guest asks (ARP) for an address of the host: no answer.
	hostIP := net.IPv4(127, 0, 0, 1)
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ip, _, err := net.ParseCIDR(a.String()); err == nil && ip.To4() != nil && !ip.IsLoopback() {
				hostIP = ip
				break
			}
		}
	}
	arp := []byte{0, 1, 8, 0, 6, 4, 0, 1}
	arp = append(append(arp, guestMAC...), 10, 0, 2, 15)
	arp = append(append(arp, 0, 0, 0, 0, 0, 0), hostIP.To4()...)
	bcast := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	if _, err := guest.Write(append(make([]byte, 12), frame(bcast, guestMAC, 0x0806, arp)...)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		f, err := readGuest(time.Until(deadline))
		if err != nil {
			break
		}
		if len(f) >= 14 && f[12] == 0x08 && f[13] == 0x06 {
			t.Fatalf("the host answered the guest's ARP for %v: % x", hostIP, f)
		}
	}

	// The guest sends to the IEEE link-local group addresses, which a
	// bridge hands to the port's own stack rather than forwarding: UDP
	// to a host socket (any address of the host), and ARP. Nothing may
	// reach the host or come back.
	udpSrv, err := net.ListenUDP("udp4", &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer udpSrv.Close()
	port := udpSrv.LocalAddr().(*net.UDPAddr).Port
	payload := []byte("from the box")
	udp := binary.BigEndian.AppendUint16(nil, 40000)
	udp = binary.BigEndian.AppendUint16(udp, uint16(port))
	udp = binary.BigEndian.AppendUint16(udp, uint16(8+len(payload)))
	udp = append(append(udp, 0, 0), payload...) // no checksum: allowed in IPv4
	ip := []byte{0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15}
	ip = append(ip, hostIP.To4()...)
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	for last := byte(0); last <= 0x0f; last++ {
		group := []byte{0x01, 0x80, 0xc2, 0, 0, last}
		if _, err := guest.Write(append(make([]byte, 12), frame(group, guestMAC, 0x0800, append(ip, udp...))...)); err != nil {
			t.Fatal(err)
		}
		if _, err := guest.Write(append(make([]byte, 12), frame(group, guestMAC, 0x0806, arp)...)); err != nil {
			t.Fatal(err)
		}
	}
	udpSrv.SetReadDeadline(time.Now().Add(time.Second))
	if n, from, err := udpSrv.ReadFromUDP(make([]byte, 100)); err == nil {
		t.Errorf("a host UDP socket got %d bytes from %v: a guest frame to a link-local group address reached the host's IP stack", n, from)
	}
	deadline = time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		f, err := readGuest(time.Until(deadline))
		if err != nil {
			break
		}
		if len(f) >= 14 && f[12] == 0x08 && f[13] == 0x06 {
			t.Fatalf("the host answered an ARP sent to a link-local group address: % x", f)
		}
	}

	// The stream refuses a bad frame length.
	if _, err := conn.Write([]byte{0xff, 0xff, 0xff, 0xff}); err == nil {
		t.Error("a 4 GiB frame was accepted")
	}
}

// TestCHDialHybridVsock checks the host side of CH's hybrid vsock
// handshake against a listener that answers as CH does.
func TestCHDialHybridVsock(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(dir, chVsockSock))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	listening := make(chan bool, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			line := make([]byte, 0, 32)
			b := make([]byte, 1)
			for {
				if _, err := c.Read(b); err != nil || b[0] == '\n' {
					break
				}
				line = append(line, b[0])
			}
			if string(line) != "CONNECT 1024" || !<-listening {
				c.Close() // nothing listens in the guest: CH closes
				continue
			}
			// The answer and the guest's first bytes in one write: the
			// dialer must not swallow the latter.
			c.Write([]byte("OK 1073741824\nguest says hi"))
			go func() {
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	listening <- false
	if _, err := dialHybridVsock(ctx, dir, chVsockSock, chAgentPort); err == nil || !strings.Contains(err.Error(), "nothing listening") {
		t.Fatalf("dial while the guest does not listen: %v", err)
	}
	listening <- true
	conn, err := dialHybridVsock(ctx, dir, chVsockSock, chAgentPort)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, len("guest says hi"))
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "guest says hi" {
		t.Fatalf("read %q, %v", buf, err)
	}
	conn.Write([]byte("echo"))
	buf = buf[:4]
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "echo" {
		t.Fatalf("echo %q, %v", buf, err)
	}

	// DialAgent retries until the agent listens, bounded by ctx.
	vm := newCHVM(dir, "box_x")
	listening <- false
	listening <- false
	listening <- true
	c2, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
	short, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	go func() {
		for i := 0; i < 100; i++ {
			select {
			case listening <- false:
			case <-time.After(time.Second):
				return
			}
		}
	}()
	if _, err := vm.DialAgent(short); err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("DialAgent past its deadline: %v", err)
	}
}

func TestCHSelect(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"qemu", "qemu"}, {"cloud-hypervisor", "cloud-hypervisor"},
	} {
		h, err := Select(tc.name, "")
		if err != nil || h.Name() != tc.want {
			t.Errorf("Select(%q) = %v, %v", tc.name, h, err)
		}
	}
	if _, err := Select("firecracker", ""); err == nil || !strings.Contains(err.Error(), "want auto, cloud-hypervisor or qemu") {
		t.Errorf("unknown driver: %v", err)
	}
	// auto: CH only with both a binary and a /dev/kvm that runs guests.
	fake := filepath.Join(t.TempDir(), "cloud-hypervisor")
	os.WriteFile(fake, []byte("#!/bin/sh\necho cloud-hypervisor v53.0\n"), 0o755)
	h, _ := Select("auto", fake)
	want := "qemu"
	if KVMAvailable() {
		want = "cloud-hypervisor"
	}
	if h.Name() != want {
		t.Errorf("auto with a CH binary picked %s, want %s (KVM usable: %v)", h.Name(), want, KVMAvailable())
	}
	t.Setenv("BOXRUN_CLOUD_HYPERVISOR", filepath.Join(t.TempDir(), "none"))
	t.Setenv("PATH", t.TempDir())
	if h, _ := Select("", ""); h.Name() != "qemu" {
		t.Errorf("auto without a CH binary picked %s", h.Name())
	}
	t.Setenv("BOXRUN_CLOUD_HYPERVISOR", fake)
	d := Describe(&CloudHypervisor{})
	if d.Version != "v53.0" || d.Acceleration != "kvm" || d.Binary != fake {
		t.Errorf("describe %+v", d)
	}
	if m := Missing(DriverCloudHypervisor, filepath.Join(t.TempDir(), "none")); !strings.Contains(m, "no cloud-hypervisor binary") {
		t.Errorf("missing: %q", m)
	}
}
