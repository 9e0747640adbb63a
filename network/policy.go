// Package network is a box's network, run on the host side: a userspace
// TCP/IP stack (gVisor's netstack) on the far end of the box's NIC that
// turns the guest's connections into the host's own sockets, one by one,
// after a policy allows each destination. Nothing the guest sends reaches
// the host's network unless a connection was allowed: root in the box can
// change its routes and addresses, not this.
//
// The default is the public internet only: no host loopback, no address
// of the host itself, no private, shared, link-local (cloud metadata) or
// multicast range. DNS is answered by the host side. The host's own
// services are reachable only on ports the caller names, at the gateway
// address.
package network

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// Policy is what a box may reach.
type Policy struct {
	// Allow, when not empty, is the only set of destinations (beyond DNS)
	// the box may reach; it may name ranges the default blocks (a private
	// CIDR, say). Entries: a CIDR or address ("10.1.0.0/16", "2001:db8::1"),
	// "host:port" (an address or CIDR with a port), or a domain name
	// ("example.com", "*.example.com", "example.com:443"), resolved by the
	// host side and enforced by address.
	Allow []string `json:"allow,omitempty"`
	// Deny is never reachable, whatever else says; same forms as Allow.
	Deny []string `json:"deny,omitempty"`
	// AllowHostPorts are ports of the host's loopback the box may reach at
	// its gateway address (10.0.2.2). Nothing else of the host is.
	AllowHostPorts []int `json:"allow_host_ports,omitempty"`
}

// rule is one Allow or Deny entry.
type rule struct {
	prefix netip.Prefix // when an address rule
	domain string       // when a domain rule: lower case, no trailing dot; "*." prefix for subdomains
	port   int          // 0: any
}

func (r rule) String() string {
	s := r.domain
	if s == "" {
		s = r.prefix.String()
	}
	if r.port != 0 {
		s += ":" + strconv.Itoa(r.port)
	}
	return s
}

func parseRule(s string) (rule, error) {
	var r rule
	host := strings.TrimSpace(s)
	if h, p, err := net.SplitHostPort(host); err == nil {
		port, err := strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return r, errdefs.New(errdefs.ValidationError, "network rule %q: bad port", s)
		}
		host, r.port = h, port
	} else if strings.Count(host, ":") == 1 && !strings.Contains(host, "/") {
		return r, errdefs.New(errdefs.ValidationError, "network rule %q: bad host:port", s)
	}
	if pfx, err := netip.ParsePrefix(host); err == nil {
		r.prefix = pfx.Masked()
		r.prefix = netip.PrefixFrom(r.prefix.Addr().Unmap(), unmapBits(pfx))
		return r, nil
	}
	if a, err := netip.ParseAddr(host); err == nil {
		a = a.Unmap()
		r.prefix = netip.PrefixFrom(a, a.BitLen())
		return r, nil
	}
	d := strings.TrimSuffix(strings.ToLower(host), ".")
	name := strings.TrimPrefix(d, "*.")
	if !validDomain(name) {
		return r, errdefs.New(errdefs.ValidationError, "network rule %q: not a CIDR, address, host:port or domain name", s)
	}
	r.domain = d
	return r, nil
}

// unmapBits keeps an IPv4-mapped prefix's length meaningful for IPv4.
func unmapBits(p netip.Prefix) int {
	if p.Addr().Is4In6() {
		return max(p.Bits()-96, 0)
	}
	return p.Bits()
}

func validDomain(d string) bool {
	if d == "" || len(d) > 253 {
		return false
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

func (r rule) matchDomain(name string) bool {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	if sub, ok := strings.CutPrefix(r.domain, "*."); ok {
		return strings.HasSuffix(name, "."+sub)
	}
	return name == r.domain
}

// Filter decides, connection by connection, what a box may reach.
type Filter struct {
	allow, deny []rule
	hostPorts   map[int]bool
	hostAddrs   func() []netip.Addr

	mu       sync.Mutex
	resolved map[netip.Addr]map[resolvedRule]time.Time // addresses of domain rules, learnt from DNS: until when
}

// resolvedRule is what a learnt address is bound to: allow or deny, on a
// port (0: any).
type resolvedRule struct {
	allow bool
	port  int
}

// maxResolved caps the learnt addresses per box: a box asking DNS for
// ever new names must not grow the engine's memory. Past it, no new
// allow-address is learnt (those stay unreachable: the safe side), and
// deny-addresses replace the oldest.
const maxResolved = 4096

// NewFilter compiles a policy. Loopback addresses are refused in Allow:
// the host is reached through AllowHostPorts only.
func NewFilter(p Policy) (*Filter, error) {
	f := &Filter{hostPorts: map[int]bool{}, hostAddrs: hostAddrs, resolved: map[netip.Addr]map[resolvedRule]time.Time{}}
	for _, s := range p.Allow {
		r, err := parseRule(s)
		if err != nil {
			return nil, err
		}
		if a := r.prefix.Addr(); r.domain == "" && (a.IsLoopback() || a.IsUnspecified() && r.prefix.IsSingleIP()) {
			return nil, errdefs.New(errdefs.ValidationError, "network rule %q: the host is reached through AllowHostPorts, not Allow", s)
		}
		f.allow = append(f.allow, r)
	}
	for _, s := range p.Deny {
		r, err := parseRule(s)
		if err != nil {
			return nil, err
		}
		f.deny = append(f.deny, r)
	}
	for _, port := range p.AllowHostPorts {
		if port < 1 || port > 65535 {
			return nil, errdefs.New(errdefs.ValidationError, "AllowHostPorts: bad port %d", port)
		}
		f.hostPorts[port] = true
	}
	return f, nil
}

// HostPort reports whether the box may reach port of the host's loopback.
func (f *Filter) HostPort(port int) bool { return f.hostPorts[port] }

// Allowed decides whether the box may open a connection to dst, and if
// not, says why.
func (f *Filter) Allowed(dst netip.AddrPort) (bool, string) {
	addrs := []netip.Addr{dst.Addr().Unmap()}
	if v4, ok := embeddedV4(addrs[0]); ok {
		addrs = append(addrs, v4) // NAT64 names an IPv4 host: judge both
	}
	port := int(dst.Port())
	for _, a := range addrs {
		if r, ok := matchAddr(f.deny, a, port); ok {
			return false, "denied by rule " + r.String()
		}
		if f.resolvedMatch(a, port, false) {
			return false, "denied by a domain rule"
		}
		if a.IsLoopback() || a.IsUnspecified() || isHostAddr(a, f.hostAddrs()) {
			return false, "an address of the host (use AllowHostPorts)"
		}
	}
	a := addrs[len(addrs)-1]
	if _, ok := matchAddr(f.allow, a, port); ok {
		return true, ""
	}
	// A name opens what it resolves to, except link-local addresses (cloud
	// metadata): those only through an explicit CIDR, never through DNS
	// that someone else may control.
	if f.resolvedMatch(a, port, true) && !a.IsLinkLocalUnicast() {
		return true, ""
	}
	if len(f.allow) > 0 {
		return false, "not in the allow list"
	}
	if why := special(addrs[0]); why != "" {
		return false, why
	}
	if why := special(a); why != "" {
		return false, why
	}
	return true, ""
}

// AllowedName reports whether DNS answers for name may be given: a name
// that a Deny rule names is not resolved at all.
func (f *Filter) AllowedName(name string) bool {
	for _, r := range f.deny {
		if r.domain != "" && r.matchDomain(name) {
			return false
		}
	}
	return true
}

// Learn records the addresses the host resolved name to, so that domain
// rules apply to them for ttl. One entry per address and rule, however
// often the name is asked for; expired entries are dropped.
func (f *Filter) Learn(name string, addrs []netip.Addr, ttl time.Duration) {
	now := time.Now()
	until := now.Add(ttl)
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.resolved) >= maxResolved {
		f.pruneLocked(now)
	}
	for _, set := range []struct {
		rules []rule
		allow bool
	}{{f.allow, true}, {f.deny, false}} {
		for _, r := range set.rules {
			if r.domain == "" || !r.matchDomain(name) {
				continue
			}
			for _, a := range addrs {
				a = a.Unmap()
				m := f.resolved[a]
				if m == nil {
					if len(f.resolved) >= maxResolved && set.allow {
						continue
					}
					m = map[resolvedRule]time.Time{}
					f.resolved[a] = m
				}
				k := resolvedRule{allow: set.allow, port: r.port}
				if until.After(m[k]) {
					m[k] = until
				}
			}
		}
	}
}

// pruneLocked drops expired entries (f.mu held).
func (f *Filter) pruneLocked(now time.Time) {
	for a, m := range f.resolved {
		for k, until := range m {
			if !now.Before(until) {
				delete(m, k)
			}
		}
		if len(m) == 0 {
			delete(f.resolved, a)
		}
	}
}

// Resolvable reports whether the box's DNS may resolve name at all: not a
// name a Deny rule names, and, with an allow list, only names it allows
// (so a box limited to a few destinations cannot tunnel data through the
// host's resolver, nor map internal names).
func (f *Filter) Resolvable(name string) bool {
	if !f.AllowedName(name) {
		return false
	}
	if len(f.allow) == 0 {
		return true
	}
	for _, r := range f.allow {
		if r.domain != "" && r.matchDomain(name) {
			return true
		}
	}
	return false
}

// DenyDomains lists the exact names of Deny domain rules, to resolve up
// front: a box that uses their addresses without asking DNS is refused too.
func (f *Filter) DenyDomains() []string {
	var out []string
	for _, r := range f.deny {
		if r.domain != "" && !strings.HasPrefix(r.domain, "*.") {
			out = append(out, r.domain)
		}
	}
	return out
}

func (f *Filter) resolvedMatch(a netip.Addr, port int, allow bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	for k, until := range f.resolved[a] {
		if k.allow == allow && now.Before(until) && (k.port == 0 || k.port == port) {
			return true
		}
	}
	return false
}

func matchAddr(rules []rule, a netip.Addr, port int) (rule, bool) {
	for _, r := range rules {
		if r.domain == "" && r.prefix.Contains(a) && (r.port == 0 || r.port == port) {
			return r, true
		}
	}
	return rule{}, false
}

// embeddedV4 extracts the IPv4 address that a NAT64 (64:ff9b::/96)
// address stands for.
func embeddedV4(a netip.Addr) (netip.Addr, bool) {
	if !a.Is6() || !nat64.Contains(a) {
		return netip.Addr{}, false
	}
	b := a.As16()
	return netip.AddrFrom4([4]byte(b[12:16])), true
}

var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// blocked are the ranges the default policy keeps a box away from, and
// why. Documentation ranges (192.0.2.0/24, 198.51.100.0/24,
// 203.0.113.0/24, 2001:db8::/32) are not in it: nothing on the internet
// uses them, and tests stand in for "the internet" with them.
var blocked = func() []struct {
	p   netip.Prefix
	why string
} {
	var out []struct {
		p   netip.Prefix
		why string
	}
	for _, e := range [][2]string{
		{"0.0.0.0/8", "this-network range (reaches the host)"},
		{"10.0.0.0/8", "a private range"},
		{"100.64.0.0/10", "the shared (carrier-grade NAT) range"},
		{"127.0.0.0/8", "loopback"},
		{"169.254.0.0/16", "link-local (cloud metadata)"},
		{"172.16.0.0/12", "a private range"},
		{"192.0.0.0/24", "IETF protocol assignments"},
		{"192.168.0.0/16", "a private range"},
		{"198.18.0.0/15", "the benchmarking range"},
		{"224.0.0.0/4", "multicast"},
		{"240.0.0.0/4", "reserved (and broadcast)"},
		{"::/128", "unspecified"},
		{"::1/128", "loopback"},
		{"::ffff:0:0/96", "IPv4-mapped"},
		{"64:ff9b:1::/48", "local-use NAT64"},
		{"100::/64", "discard-only"},
		{"2001::/32", "Teredo (tunnels to IPv4)"},
		{"2002::/16", "6to4 (tunnels to IPv4)"},
		{"fc00::/7", "unique local (private)"},
		{"fe80::/10", "link-local"},
		{"fec0::/10", "site-local"},
		{"ff00::/8", "multicast"},
	} {
		out = append(out, struct {
			p   netip.Prefix
			why string
		}{netip.MustParsePrefix(e[0]), e[1]})
	}
	return out
}()

// special says why a is not a public internet address ("" if it is).
func special(a netip.Addr) string {
	for _, b := range blocked {
		if b.p.Contains(a) {
			return "not the public internet: " + b.why
		}
	}
	return ""
}

// hostAddrs lists the host's own addresses, refreshed every few seconds
// (interfaces come and go).
var hostAddrs = func() func() []netip.Addr {
	var mu sync.Mutex
	var cached []netip.Addr
	var at time.Time
	return func() []netip.Addr {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(at) < 2*time.Second {
			return cached
		}
		cached, at = nil, time.Now()
		ifas, _ := net.InterfaceAddrs()
		for _, ifa := range ifas {
			if n, ok := ifa.(*net.IPNet); ok {
				if a, ok := netip.AddrFromSlice(n.IP); ok {
					cached = append(cached, a.Unmap())
				}
			}
		}
		return cached
	}
}()

func isHostAddr(a netip.Addr, host []netip.Addr) bool {
	for _, h := range host {
		if h == a {
			return true
		}
	}
	return false
}

// Reachable reports whether the box could connect to a on some port: DNS
// leaves out answers it could not use (a name resolving to 127.0.0.1, a
// private address).
func (f *Filter) Reachable(a netip.Addr) bool {
	for _, port := range f.ports(a) {
		if ok, _ := f.Allowed(netip.AddrPortFrom(a, uint16(port))); ok {
			return true
		}
	}
	return false
}

// ports lists the ports worth asking Allowed about for a: any port (0
// stands for it: rules without a port match it) and each port of a rule.
func (f *Filter) ports(a netip.Addr) []int {
	ports := []int{0}
	for _, r := range f.allow {
		if r.port != 0 {
			ports = append(ports, r.port)
		}
	}
	f.mu.Lock()
	for k := range f.resolved[a] {
		if k.allow && k.port != 0 {
			ports = append(ports, k.port)
		}
	}
	f.mu.Unlock()
	return ports
}
