package network

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// guestStack is a second netstack playing the box: 10.0.2.15 behind the
// network's frame stream, as a VM's NIC would be.
func guestStack(t *testing.T, n *Network) *stack.Stack {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	link := channel.New(1024, MTU+header.EthernetMinimumSize, tcpip.LinkAddress([]byte{2, 0, 0, 0, 0, 15}))
	if err := s.CreateNIC(1, ethernet.New(link)); err != nil {
		t.Fatal(err)
	}
	s.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddressWithPrefix{
		Address: tcpip.AddrFrom4(Guest.As4()), PrefixLen: 24}}, stack.AddressProperties{})
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4(Gateway.As4()), NIC: 1}})
	host, vm := net.Pipe()
	n.Attach(host)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); vm.Close(); link.Close(); s.Close() })
	go func() { // guest → network
		for {
			pkt := link.ReadContext(ctx)
			if pkt == nil {
				return
			}
			v := pkt.ToView()
			pkt.DecRef()
			out := binary.BigEndian.AppendUint32(nil, uint32(v.Size()))
			out = append(out, v.AsSlice()...)
			v.Release()
			if _, err := vm.Write(out); err != nil {
				return
			}
		}
	}()
	go func() { // network → guest
		var hdr [4]byte
		for {
			if _, err := io.ReadFull(vm, hdr[:]); err != nil {
				return
			}
			buf := make([]byte, binary.BigEndian.Uint32(hdr[:]))
			if _, err := io.ReadFull(vm, buf); err != nil {
				return
			}
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(buf)})
			link.InjectInbound(0, pkt)
			pkt.DecRef()
		}
	}()
	return s
}

func dialFromGuest(s *stack.Stack, dst netip.AddrPort) (*gonet.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return gonet.DialContextTCP(ctx, s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(dst.Addr().As4()), Port: dst.Port()}, ipv4.ProtocolNumber)
}

// serveHost runs fn for each connection to a new host listener on
// 127.0.0.1 and returns its port.
func serveHost(t *testing.T, fn func(net.Conn)) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); fn(c) }()
		}
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// TestStackTCP: a connection the policy allows goes through the stack to
// the host and back; one it refuses is reset at once.
func TestStackTCP(t *testing.T) {
	echo := serveHost(t, func(c net.Conn) { io.Copy(c, c) })
	closed := serveHost(t, func(c net.Conn) { c.Write([]byte("must not be reached")) })
	n := newTestNetwork(t, Policy{AllowHostPorts: []int{int(echo)}}, nil)
	g := guestStack(t, n)
	c, err := dialFromGuest(g, netip.AddrPortFrom(Gateway, echo))
	if err != nil {
		t.Fatalf("allowed host port: %v", err)
	}
	msg := make([]byte, 1<<20)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	go func() { c.Write(msg); c.CloseWrite() }()
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || string(got) != string(msg) {
		t.Fatalf("echo through the stack: %d bytes, %v", len(got), err)
	}
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(Gateway, closed), netip.AddrPortFrom(DNS, closed), netip.AddrPortFrom(netip.MustParseAddr("10.0.2.1"), closed),
	} {
		start := time.Now()
		if c, err := dialFromGuest(g, dst); err == nil {
			c.Close()
			t.Errorf("%s reachable from the box", dst)
		} else if time.Since(start) > 5*time.Second {
			t.Errorf("%s: refused only after %v (want an immediate reset)", dst, time.Since(start))
		}
	}
}

// (A loopback destination sent out of the box is a martian the stack
// drops: TestDefaultPolicy covers that Allowed refuses it too.)

// TestStackBoundsIdleSenders: a box that opens many connections, gets
// data and half-closes without ever reading cannot make the host hold
// more than the endpoint cap's worth of buffers.
func TestStackBoundsIdleSenders(t *testing.T) {
	var served atomic.Int64
	port := serveHost(t, func(c net.Conn) {
		served.Add(1)
		c.Write(make([]byte, 2<<20))
	})
	f, _ := NewFilter(Policy{AllowHostPorts: []int{int(port)}})
	n, err := New(Config{Filter: f, MaxConns: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	g := guestStack(t, n)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	refused := 0
	for range 60 {
		c, err := dialFromGuest(g, netip.AddrPortFrom(Gateway, port))
		if err != nil {
			refused++
			continue
		}
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		c.Read(make([]byte, 1))
		c.CloseWrite() // and never read again
	}
	time.Sleep(time.Second)
	eps := len(n.stack.RegisteredEndpoints())
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("60 connections: %d refused, %d served, %d host-side endpoints, heap +%d MiB", refused, served.Load(), eps, grew>>20)
	if eps > n.maxEps {
		t.Errorf("%d endpoints held, cap %d", eps, n.maxEps)
	}
	if refused == 0 {
		t.Errorf("no connection refused past the cap")
	}
	if grew > int64(n.maxEps)*(rcvMax+sndMax)+(16<<20) {
		t.Errorf("heap grew by %d MiB, beyond the cap's bound", grew>>20)
	}
}

// countingResolver counts lookups and answers from a table.
type countingResolver struct {
	fakeResolver
	n atomic.Int64
}

func (c *countingResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	c.n.Add(1)
	return c.fakeResolver.LookupNetIP(ctx, network, host)
}

// TestDNSPolicy: a denied name's addresses are refused even when the box
// never asked DNS for it; with an allow list, other names never reach the
// host's resolver; link-local answers of an allowed name stay closed;
// repeated queries neither grow the learnt table nor escape the rate
// limit.
func TestDNSPolicy(t *testing.T) {
	a := netip.MustParseAddr
	r := &countingResolver{fakeResolver: fakeResolver{
		"evil.example.": {a("198.51.100.66")}, "evil.example": {a("198.51.100.66")},
		"api.example.": {a("198.51.100.9")}, "meta.example.": {a("169.254.169.254")},
	}}
	dn := newTestNetwork(t, Policy{Deny: []string{"evil.example"}}, r)
	dn.cfg.Filter.hostAddrs = func() []netip.Addr { return nil }
	deadline := time.Now().Add(5 * time.Second)
	for { // learnt at the start, without any query
		if ok, _ := dn.cfg.Filter.Allowed(netip.MustParseAddrPort("198.51.100.66:443")); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a denied name's address is reachable without a DNS query")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code, _ := ask(t, dn, "evil.example.", dnsmessage.TypeA); code != dnsmessage.RCodeNameError {
		t.Errorf("denied name answered %v", code)
	}

	an := newTestNetwork(t, Policy{Allow: []string{"api.example", "meta.example"}}, r)
	before := r.n.Load()
	if code, _ := ask(t, an, "tunnel-data-abc123.attacker.example.", dnsmessage.TypeA); code != dnsmessage.RCodeNameError {
		t.Errorf("name outside the allow list: %v", code)
	}
	if r.n.Load() != before {
		t.Errorf("a name outside the allow list reached the host's resolver")
	}
	if _, got := ask(t, an, "api.example.", dnsmessage.TypeA); len(got) != 1 {
		t.Errorf("allowed name: %v", got)
	}
	ask(t, an, "meta.example.", dnsmessage.TypeA)
	if ok, _ := an.cfg.Filter.Allowed(netip.MustParseAddrPort("169.254.169.254:80")); ok {
		t.Errorf("metadata address reachable through an allowed name")
	}
	for range 20000 {
		an.answer(query(t, "api.example.", dnsmessage.TypeA))
	}
	an.cfg.Filter.mu.Lock()
	entries := len(an.cfg.Filter.resolved[a("198.51.100.9")])
	an.cfg.Filter.mu.Unlock()
	if entries != 1 {
		t.Errorf("%d learnt entries for one address after 20000 queries", entries)
	}
	refused := 0
	for range 500 {
		if code, _ := ask(t, an, "api.example.", dnsmessage.TypeA); code == dnsmessage.RCodeRefused {
			refused++
		}
	}
	if refused == 0 {
		t.Errorf("500 queries at once: none refused by the rate limit")
	}
}
