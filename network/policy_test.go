package network

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func mustFilter(t *testing.T, p Policy) *Filter {
	t.Helper()
	f, err := NewFilter(p)
	if err != nil {
		t.Fatal(err)
	}
	f.hostAddrs = func() []netip.Addr {
		return []netip.Addr{netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("2001:db8::77")}
	}
	return f
}

func allowed(f *Filter, s string) bool {
	ok, _ := f.Allowed(netip.MustParseAddrPort(s))
	return ok
}

// TestDefaultPolicy: the public internet only, IPv4 and IPv6, with the
// tricks a hostile box would try.
func TestDefaultPolicy(t *testing.T) {
	f := mustFilter(t, Policy{})
	for _, dst := range []string{
		// loopback and "this host", in every spelling that parses
		"127.0.0.1:80", "127.1.2.3:22", "0.0.0.0:80", "0.1.2.3:80", "[::1]:80", "[::]:80",
		"[::ffff:127.0.0.1]:80", "[::ffff:0.0.0.0]:80", "[::ffff:10.0.0.1]:80", "[64:ff9b::7f00:1]:80", "[64:ff9b::a00:1]:80",
		// the host's own addresses
		"203.0.113.77:80", "[2001:db8::77]:80", "[::ffff:203.0.113.77]:80",
		// private, shared, link-local (metadata), reserved, multicast, broadcast
		"10.0.0.1:80", "10.255.255.255:80", "172.16.0.1:80", "172.31.255.254:80", "192.168.1.1:80",
		"100.64.0.1:80", "100.127.255.254:80", "169.254.169.254:80", "169.254.0.1:80", "192.0.0.170:80",
		"198.18.0.1:80", "224.0.0.1:80", "239.255.255.250:1900", "240.0.0.1:80", "255.255.255.255:80",
		"[fc00::1]:80", "[fd12:3456::1]:80", "[fe80::1]:80", "[fec0::1]:80", "[ff02::1]:80",
		"[64:ff9b:1::1]:80", "[2002:7f00:1::]:80", "[2001:0:4136:e378::1]:80", "[100::1]:80",
		"[fd00:ec2::254]:80",
	} {
		if allowed(f, dst) {
			t.Errorf("%s allowed by default", dst)
		}
	}
	for _, dst := range []string{
		"1.1.1.1:53", "8.8.8.8:443", "93.184.216.34:80", "198.51.100.1:8080", "192.0.2.10:80",
		"172.15.255.255:80", "172.32.0.1:80", "100.63.255.255:80", "100.128.0.1:80", "11.0.0.1:80",
		"[2606:4700::1111]:443", "[2001:db8::1]:80", "[64:ff9b::808:808]:53",
	} {
		if !allowed(f, dst) {
			_, why := f.Allowed(netip.MustParseAddrPort(dst))
			t.Errorf("%s refused by default: %s", dst, why)
		}
	}
}

func TestPolicyRules(t *testing.T) {
	f := mustFilter(t, Policy{Deny: []string{"198.51.100.0/24", "1.1.1.1:53", "2606:4700::/32", "evil.example", "*.tracker.example"}})
	for dst, want := range map[string]bool{
		"198.51.100.1:80": false, "198.51.100.200:443": false, "[::ffff:198.51.100.1]:80": false,
		"1.1.1.1:53": false, "1.1.1.1:443": true, "[2606:4700::1111]:443": false, "8.8.8.8:53": true,
	} {
		if got := allowed(f, dst); got != want {
			t.Errorf("deny rules: %s allowed %v, want %v", dst, got, want)
		}
	}
	// Domain rules bind to the addresses the host resolved.
	f.Learn("evil.example.", []netip.Addr{netip.MustParseAddr("5.6.7.8")}, time.Minute)
	f.Learn("a.tracker.example", []netip.Addr{netip.MustParseAddr("5.6.7.9")}, time.Minute)
	if allowed(f, "5.6.7.8:443") || allowed(f, "5.6.7.9:80") || f.AllowedName("EVIL.example.") || f.AllowedName("x.tracker.example") {
		t.Errorf("deny domain rules not applied")
	}
	if !f.AllowedName("tracker.example") || !f.AllowedName("example.org") {
		t.Errorf("deny domain rules too wide")
	}
	if strings.Join(f.DenyDomains(), ",") != "evil.example" {
		t.Errorf("DenyDomains %v", f.DenyDomains())
	}

	// An allow list is the only way out, and can open a private range,
	// never the host.
	a := mustFilter(t, Policy{Allow: []string{"10.1.0.0/16", "8.8.8.8:53", "api.example.com:443", "0.0.0.0/0"}, Deny: []string{"10.1.2.0/24"}})
	a.allow = a.allow[:3] // without the catch-all, checked below
	for dst, want := range map[string]bool{
		"10.1.9.9:5432": true, "10.1.2.3:5432": false, "10.2.0.1:80": false, "8.8.8.8:53": true, "8.8.8.8:443": false,
		"1.1.1.1:443": false, "127.0.0.1:80": false, "203.0.113.77:80": false,
	} {
		if got := allowed(a, dst); got != want {
			t.Errorf("allow list: %s allowed %v, want %v", dst, got, want)
		}
	}
	a.Learn("api.example.com", []netip.Addr{netip.MustParseAddr("5.5.5.5")}, time.Minute)
	if !allowed(a, "5.5.5.5:443") || allowed(a, "5.5.5.5:80") {
		t.Errorf("allow domain with port not applied by address")
	}
	if !a.Reachable(netip.MustParseAddr("5.5.5.5")) || a.Reachable(netip.MustParseAddr("6.6.6.6")) {
		t.Errorf("Reachable")
	}
	a.Learn("api.example.com", []netip.Addr{netip.MustParseAddr("5.5.5.6")}, -time.Second)
	if allowed(a, "5.5.5.6:443") {
		t.Errorf("expired learnt address still allowed")
	}
	all := mustFilter(t, Policy{Allow: []string{"0.0.0.0/0"}})
	if !allowed(all, "10.0.0.1:80") || allowed(all, "127.0.0.1:80") || allowed(all, "0.0.0.0:80") || allowed(all, "203.0.113.77:1") {
		t.Errorf("allow 0.0.0.0/0 must open private ranges but never the host")
	}
}

func TestPolicyValidation(t *testing.T) {
	for _, p := range []Policy{
		{Allow: []string{"127.0.0.1"}}, {Allow: []string{"127.0.0.0/8"}}, {Allow: []string{"::1"}}, {Allow: []string{"0.0.0.0"}},
		{Allow: []string{"::ffff:127.0.0.1"}}, {Allow: []string{"exa mple.com"}}, {Deny: []string{"1.2.3.4:0"}},
		{Deny: []string{"1.2.3.4:http"}}, {Deny: []string{"1.2.3.4:99999"}}, {Deny: []string{""}}, {AllowHostPorts: []int{0}},
		{AllowHostPorts: []int{70000}},
	} {
		if _, err := NewFilter(p); err == nil {
			t.Errorf("%+v accepted", p)
		}
	}
	f, err := NewFilter(Policy{AllowHostPorts: []int{8080}})
	if err != nil || !f.HostPort(8080) || f.HostPort(8081) {
		t.Errorf("AllowHostPorts: %v", err)
	}
}
