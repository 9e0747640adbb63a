package boxrund

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Who may use the TCP port without a token: the loopback port can be
// reached by every user of the host (and every process in its network
// namespace), while the socket is 0600. Without a token, a connection is
// served only if the socket at its other end belongs to the server's own
// user or to root: the kernel's table of TCP sockets (/proc/net/tcp,
// tcp6) names the owner of the client's end. (SO_PEERCRED is for Unix
// sockets only.)

type peerKey struct{}

// peerUID is the uid owning the client end of c, looked up once when the
// connection is accepted; -1 if it cannot be told.
func peerUID(c net.Conn) int {
	remote, err1 := netip.ParseAddrPort(c.RemoteAddr().String())
	local, err2 := netip.ParseAddrPort(c.LocalAddr().String())
	if err1 != nil || err2 != nil {
		return -1
	}
	// The client's socket: its local address is our remote one. An IPv4
	// peer's socket is IPv4, or IPv6 with mapped addresses.
	tables := []string{"/proc/net/tcp6"}
	if remote.Addr().Unmap().Is4() {
		tables = []string{"/proc/net/tcp", "/proc/net/tcp6"}
	}
	for _, table := range tables {
		if uid := findSocketUID(table, remote, local); uid >= 0 {
			return uid
		}
	}
	return -1
}

// findSocketUID returns the uid of the socket in a /proc/net/tcp{,6}
// table whose local and remote addresses are those given, or -1.
func findSocketUID(table string, local, remote netip.AddrPort) int {
	f, err := os.Open(table)
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		l, err1 := parseProcAddr(fields[1])
		r, err2 := parseProcAddr(fields[2])
		if err1 != nil || err2 != nil || !sameAddrPort(l, local) || !sameAddrPort(r, remote) {
			continue
		}
		// A socket no process holds any more (closed by its owner,
		// in FIN_WAIT or TIME_WAIT) shows uid 0 and inode 0: its
		// owner is unknown, not root.
		uid, err := strconv.Atoi(fields[7])
		if err != nil || fields[9] == "0" {
			return -1
		}
		return uid
	}
	return -1
}

// sameAddrPort compares two endpoints, an IPv4-mapped IPv6 address
// being its IPv4 one.
func sameAddrPort(a, b netip.AddrPort) bool {
	return a.Port() == b.Port() && a.Addr().Unmap() == b.Addr().Unmap()
}

// parseProcAddr parses "0100007F:1F90" (IPv4) or 32 hex digits and a port
// (IPv6): the address as 32-bit words in the host's byte order, the port
// in hex.
func parseProcAddr(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	ip := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(ip[i:], binary.NativeEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// peer is a connection whose client's uid is looked up once, by its
// first request: not in the server's accept loop, which would wait on
// every lookup (the table can be long).
type peer struct {
	conn net.Conn
	once sync.Once
	uid  int
}

// withPeer is an http.Server's ConnContext: it notes the connection, for
// peerAllowed.
func withPeer(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, peerKey{}, &peer{conn: c})
}

// peerAllowed reports whether the request's connection comes from the
// server's own user or root, and the uid it comes from (-1: unknown).
func peerAllowed(ctx context.Context) (uid int, ok bool) {
	p, found := ctx.Value(peerKey{}).(*peer)
	if !found {
		return -1, false
	}
	p.once.Do(func() { p.uid = peerUID(p.conn) })
	return p.uid, p.uid >= 0 && (p.uid == 0 || p.uid == os.Geteuid())
}
