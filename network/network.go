package network

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"golang.org/x/time/rate"
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
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The box's side of the network, as QEMU's user-mode network had it.
var (
	Subnet  = netip.MustParsePrefix("10.0.2.0/24")
	Gateway = netip.MustParseAddr("10.0.2.2") // the host: AllowHostPorts, published ports
	DNS     = netip.MustParseAddr("10.0.2.3")
	Guest   = netip.MustParseAddr("10.0.2.15")
)

const (
	nicID = tcpip.NICID(1)
	// MTU is the link's MTU; the box's NIC must be given the same. Large:
	// every frame costs a trip through the VMM (and, under TCG, emulated
	// guest work), so fewer, bigger frames carry more.
	MTU = 65520
	// defaultMaxConns caps the connections (TCP and UDP flows) one box
	// holds open through the host at once: each is a host socket. The
	// stack's endpoints (those of finished connections still sending
	// their last data included) are capped at 1.5 times that, each with at
	// most rcvMax+sndMax of buffers: a box that stops reading holds at most
	// 192 × 3 MiB of the host's memory.
	defaultMaxConns = 128
	rcvMax          = 1 << 20
	sndMax          = 2 << 20
	// userTimeout ends a connection whose data the box has not
	// acknowledged for this long (a box that never opens its window).
	userTimeout = time.Minute
	// maxFrame is the largest frame taken from the VMM; Ethernet frames
	// are far smaller, a longer length is a broken or hostile peer.
	maxFrame  = 64 << 10
	udpIdle   = time.Minute
	dialLimit = 30 * time.Second
)

// gatewayMAC is the host side's MAC address (locally administered).
var gatewayMAC = tcpip.LinkAddress([]byte{0x02, 0x62, 0x78, 0x00, 0x00, 0x02})

// Port publishes a port of the box on the host.
type Port struct {
	HostIP    string `json:"host_ip,omitempty"` // default 127.0.0.1
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	Protocol  string `json:"protocol,omitempty"` // "tcp" (the default; the only one for now)
}

// Resolver resolves names on the host side; *net.Resolver is one.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Config configures a box's network.
type Config struct {
	Filter   *Filter
	Ports    []Port
	Resolver Resolver // default net.DefaultResolver
	// Dial opens the host's side of an allowed connection; default a
	// net.Dialer.
	Dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	Logger *slog.Logger
	// MaxConns caps the box's open connections and flows; default 128.
	MaxConns int
	// DNSRate caps the box's DNS queries per second (burst twice that);
	// default 50.
	DNSRate int
}

// Network is one box's network: a userspace stack whose link is the VMM's
// NIC backend, a stream of Ethernet frames.
type Network struct {
	cfg     Config
	log     *slog.Logger
	stack   *stack.Stack
	link    *channel.Endpoint
	ctx     context.Context
	cancel  context.CancelFunc
	slots   chan struct{} // one per open connection: at most MaxConns
	maxEps  int           // cap on the stack's endpoints
	dnsRate *rate.Limiter
	wg      sync.WaitGroup

	mu     sync.Mutex
	conn   io.ReadWriteCloser // the VMM's frame stream, when attached
	closed bool
	open   map[io.Closer]bool // connections and listeners to close at Close
}

// New builds the network and binds its published ports (a port already in
// use is an error here, before any VM starts). Frames flow once Attach is
// given the VMM's stream.
func New(cfg Config) (*Network, error) {
	if cfg.Filter == nil {
		f, err := NewFilter(Policy{})
		if err != nil {
			return nil, err
		}
		cfg.Filter = f
	}
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = defaultMaxConns
	}
	if cfg.DNSRate <= 0 {
		cfg.DNSRate = 50
	}
	n := &Network{cfg: cfg, log: cfg.Logger, slots: make(chan struct{}, cfg.MaxConns), open: map[io.Closer]bool{},
		maxEps: cfg.MaxConns + cfg.MaxConns/2, dnsRate: rate.NewLimiter(rate.Limit(cfg.DNSRate), 2*cfg.DNSRate)}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	if err := n.buildStack(); err != nil {
		n.cancel()
		return nil, err
	}
	for _, p := range cfg.Ports {
		if err := n.publish(p); err != nil {
			n.Close()
			return nil, err
		}
	}
	n.wg.Add(2)
	go n.writeFrames()
	go n.refreshDenied()
	return n, nil
}

func (n *Network) buildStack() error {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	n.stack = s
	n.link = channel.New(1024, MTU+header.EthernetMinimumSize, gatewayMAC)
	if err := s.CreateNIC(nicID, ethernet.New(n.link)); err != nil {
		return errdefs.New(errdefs.RuntimeError, "network: create NIC: %v", err)
	}
	// The stack answers for every address the box sends to (promiscuous)
	// and replies from it (spoofing): it is the far end of every
	// connection, which it then makes from the host, or refuses.
	s.SetPromiscuousMode(nicID, true)
	s.SetSpoofing(nicID, true)
	for _, a := range []netip.Addr{Gateway, DNS} {
		pa := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddressWithPrefix{
			Address: tcpip.AddrFrom4(a.As4()), PrefixLen: Subnet.Bits()}}
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return errdefs.New(errdefs.RuntimeError, "network: address %s: %v", a, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: nicID}})
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: rcvMax, Max: rcvMax}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: sndMax}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcp.NewForwarder(s, 0, 256, n.forwardTCP).HandlePacket)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udp.NewForwarder(s, n.forwardUDP).HandlePacket)
	return nil
}

// Attach serves frames on conn, the VMM's NIC backend: each frame is
// preceded by its length (4 bytes, big endian), as QEMU's stream netdev
// sends them. A later Attach (the engine re-attached to a running box)
// replaces the earlier stream.
func (n *Network) Attach(conn io.ReadWriteCloser) {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		conn.Close()
		return
	}
	old := n.conn
	n.conn = conn
	n.mu.Unlock()
	if old != nil {
		old.Close()
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		n.readFrames(conn)
	}()
}

func (n *Network) readFrames(conn io.ReadWriteCloser) {
	defer conn.Close()
	var hdr [4]byte
	buf := make([]byte, maxFrame)
	r := bufio.NewReaderSize(conn, 256<<10) // many frames per read(2)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		size := binary.BigEndian.Uint32(hdr[:])
		if size < header.EthernetMinimumSize || size > maxFrame {
			n.log.Warn("network: dropping the VMM stream: bad frame length", "len", size)
			return
		}
		if _, err := io.ReadFull(r, buf[:size]); err != nil {
			return
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(append([]byte(nil), buf[:size]...))})
		n.link.InjectInbound(0, pkt)
		pkt.DecRef()
	}
}

// writeFrames sends the stack's frames to the VMM, every frame already
// queued in one write(2).
func (n *Network) writeFrames() {
	defer n.wg.Done()
	var out []byte
	for {
		pkt := n.link.ReadContext(n.ctx)
		if pkt == nil {
			return
		}
		out = out[:0]
		for pkt != nil {
			view := pkt.ToView()
			pkt.DecRef()
			out = binary.BigEndian.AppendUint32(out, uint32(view.Size()))
			out = append(out, view.AsSlice()...)
			view.Release()
			if len(out) >= 256<<10 {
				break
			}
			pkt = n.link.Read() // nil when none is queued
		}
		n.mu.Lock()
		conn := n.conn
		n.mu.Unlock()
		if conn != nil {
			conn.Write(out) // a failed write drops the frames; TCP resends
		}
	}
}

// Close tears the network down: published ports, every connection it
// holds, the stack.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	conn := n.conn
	open := n.open
	n.open = map[io.Closer]bool{}
	n.mu.Unlock()
	n.cancel()
	if conn != nil {
		conn.Close()
	}
	for c := range open {
		c.Close()
	}
	n.link.Close()
	n.stack.Close()
	n.wg.Wait()
	n.stack.Wait()
	return nil
}

// track registers c to be closed by Close; the returned func forgets it.
func (n *Network) track(c io.Closer) (untrack func(), ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, false
	}
	n.open[c] = true
	return func() {
		n.mu.Lock()
		delete(n.open, c)
		n.mu.Unlock()
	}, true
}

// acquire takes a connection slot, or reports that the box holds too many
// connections, or that the stack holds too many endpoints (closed
// connections still delivering their last data to a box that does not
// read count until they end).
func (n *Network) acquire() bool {
	if len(n.stack.RegisteredEndpoints()) >= n.maxEps {
		return false
	}
	select {
	case n.slots <- struct{}{}:
		return true
	default:
		return false
	}
}

func (n *Network) release() { <-n.slots }

// target says where a connection of the box to dst goes on the host side,
// or why it may not.
func (n *Network) target(dst netip.AddrPort) (string, string) {
	if Subnet.Contains(dst.Addr()) {
		if dst.Addr() == Gateway && n.cfg.Filter.HostPort(int(dst.Port())) {
			return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(dst.Port()))), ""
		}
		return "", "the box's own subnet (host ports need AllowHostPorts)"
	}
	if ok, why := n.cfg.Filter.Allowed(dst); !ok {
		return "", why
	}
	return dst.String(), ""
}

func addrOf(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

func (n *Network) forwardTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := netip.AddrPortFrom(addrOf(id.LocalAddress), id.LocalPort)
	to, why := n.target(dst)
	if to == "" {
		n.log.Debug("network: connection refused", "dst", dst, "why", why)
		r.Complete(true)
		return
	}
	if !n.acquire() {
		n.log.Warn("network: too many connections; refused", "dst", dst)
		r.Complete(true)
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, dialLimit)
	out, err := n.cfg.Dial(ctx, "tcp", to)
	cancel()
	if err != nil {
		n.release()
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	r.Complete(false)
	if terr != nil {
		n.release()
		out.Close()
		return
	}
	ut := tcpip.TCPUserTimeoutOption(userTimeout)
	ep.SetSockOpt(&ut)
	n.relay(gonet.NewTCPConn(&wq, ep), out)
}

// relay copies both ways until both directions ended (half-closes are
// passed on), then closes both connections and frees the slot.
func (n *Network) relay(a, b net.Conn) {
	defer n.release()
	ua, oka := n.track(a)
	ub, okb := n.track(b)
	defer func() {
		a.Close()
		b.Close()
		if oka {
			ua()
		}
		if okb {
			ub()
		}
	}()
	if !oka || !okb {
		return
	}
	done := make(chan struct{}, 2)
	copyHalf := func(dst, src net.Conn) {
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
		done <- struct{}{}
	}
	go copyHalf(a, b)
	go copyHalf(b, a)
	<-done
	<-done
}

func (n *Network) forwardUDP(r *udp.ForwarderRequest) {
	id := r.ID()
	dst := netip.AddrPortFrom(addrOf(id.LocalAddress), id.LocalPort)
	if dst.Addr() == DNS && dst.Port() == 53 {
		var wq waiter.Queue
		ep, err := r.CreateEndpoint(&wq)
		if err != nil {
			return
		}
		c := gonet.NewUDPConn(&wq, ep)
		if !n.acquire() {
			c.Close()
			return
		}
		go func() {
			defer n.release()
			n.serveDNS(c)
		}()
		return
	}
	to, why := n.target(dst)
	if to == "" {
		n.log.Debug("network: datagram dropped", "dst", dst, "why", why)
		return
	}
	if !n.acquire() {
		return
	}
	out, err := n.cfg.Dial(n.ctx, "udp", to)
	if err != nil {
		n.release()
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		n.release()
		out.Close()
		return
	}
	in := gonet.NewUDPConn(&wq, ep)
	go n.relayUDP(in, out)
}

// relayUDP passes datagrams both ways until the flow is idle for udpIdle.
func (n *Network) relayUDP(in, out net.Conn) {
	defer n.release()
	ui, oki := n.track(in)
	uo, oko := n.track(out)
	defer func() {
		in.Close()
		out.Close()
		if oki {
			ui()
		}
		if oko {
			uo()
		}
	}()
	if !oki || !oko {
		return
	}
	done := make(chan struct{}, 2)
	pump := func(dst, src net.Conn) {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 64<<10)
		for {
			src.SetReadDeadline(time.Now().Add(udpIdle))
			k, err := src.Read(buf)
			if err != nil {
				return
			}
			dst.Write(buf[:k])
		}
	}
	go pump(out, in)
	go pump(in, out)
	<-done
	in.Close()
	out.Close()
	<-done
}

// publish forwards connections to the host's HostIP:HostPort to the box.
func (n *Network) publish(p Port) error {
	if p.Protocol != "" && p.Protocol != "tcp" {
		return errdefs.New(errdefs.ValidationError, "port %d: only tcp can be published", p.HostPort)
	}
	ip := p.HostIP
	if ip == "" {
		ip = "127.0.0.1"
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(p.HostPort)))
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "publish port %d", p.HostPort)
	}
	untrack, ok := n.track(ln)
	if !ok {
		ln.Close()
		return errdefs.New(errdefs.RuntimeError, "network closed")
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer untrack()
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(10 * time.Millisecond)
				continue
			}
			if !n.acquire() {
				c.Close()
				continue
			}
			go func() {
				ctx, cancel := context.WithTimeout(n.ctx, dialLimit)
				defer cancel()
				in, err := gonet.DialContextTCP(ctx, n.stack, tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(Guest.As4()), Port: uint16(p.GuestPort)}, ipv4.ProtocolNumber)
				if err != nil {
					n.release()
					c.Close()
					return
				}
				n.relay(c, in)
			}()
		}
	}()
	return nil
}
