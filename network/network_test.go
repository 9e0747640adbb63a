package network

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// fakeResolver answers from a table, as the host's resolver would.
type fakeResolver map[string][]netip.Addr

func (f fakeResolver) LookupNetIP(_ context.Context, network, host string) ([]netip.Addr, error) {
	a, ok := f[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return a, nil
}

func query(t *testing.T, name string, typ dnsmessage.Type) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 42, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET})
	q, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func ask(t *testing.T, n *Network, name string, typ dnsmessage.Type) (dnsmessage.RCode, []netip.Addr) {
	t.Helper()
	resp := n.answer(query(t, name, typ))
	var m dnsmessage.Message
	if err := m.Unpack(resp); err != nil {
		t.Fatalf("answer to %s: %v", name, err)
	}
	if m.ID != 42 || !m.Response {
		t.Fatalf("answer header %+v", m.Header)
	}
	var out []netip.Addr
	for _, a := range m.Answers {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			out = append(out, netip.AddrFrom4(r.A))
		}
	}
	return m.RCode, out
}

func newTestNetwork(t *testing.T, p Policy, r Resolver) *Network {
	t.Helper()
	f, err := NewFilter(p)
	if err != nil {
		t.Fatal(err)
	}
	n, err := New(Config{Filter: f, Resolver: r})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// TestDNS: names are resolved on the host; answers the box could not
// connect to are left out (a name that resolves to 127.0.0.1, a private
// address); denied names do not resolve; allowed domains open their
// addresses.
func TestDNS(t *testing.T) {
	a := netip.MustParseAddr
	r := fakeResolver{
		"ok.example.":     {a("198.51.100.7"), a("2001:db8::7")},
		"rebind.example.": {a("127.0.0.1"), a("10.0.0.5"), a("198.51.100.8")},
		"meta.example.":   {a("169.254.169.254")},
		"evil.example.":   {a("198.51.100.66")},
		"api.example.":    {a("10.9.9.9")},
	}
	n := newTestNetwork(t, Policy{Deny: []string{"evil.example"}}, r)
	if code, got := ask(t, n, "ok.example.", dnsmessage.TypeA); code != dnsmessage.RCodeSuccess || len(got) != 1 || got[0] != a("198.51.100.7") {
		t.Errorf("ok.example: %v %v", code, got)
	}
	if code, got := ask(t, n, "rebind.example.", dnsmessage.TypeA); code != dnsmessage.RCodeSuccess || len(got) != 1 || got[0] != a("198.51.100.8") {
		t.Errorf("rebind.example: %v %v (loopback and private answers must be dropped)", code, got)
	}
	if _, got := ask(t, n, "meta.example.", dnsmessage.TypeA); len(got) != 0 {
		t.Errorf("metadata address answered: %v", got)
	}
	if code, _ := ask(t, n, "evil.example.", dnsmessage.TypeA); code != dnsmessage.RCodeNameError {
		t.Errorf("denied name: %v", code)
	}
	if code, _ := ask(t, n, "missing.example.", dnsmessage.TypeA); code != dnsmessage.RCodeNameError {
		t.Errorf("missing name: %v", code)
	}
	if code, got := ask(t, n, "ok.example.", dnsmessage.TypeAAAA); code != dnsmessage.RCodeSuccess || len(got) != 0 {
		t.Errorf("AAAA: %v %v", code, got)
	}
	if code, _ := ask(t, n, "ok.example.", dnsmessage.TypeMX); code != dnsmessage.RCodeNotImplemented {
		t.Errorf("MX: %v", code)
	}
	if n.answer([]byte("garbage")) != nil {
		t.Errorf("garbage answered")
	}
	// An allow-list domain opens the addresses the host resolved it to,
	// even a private one, and only those.
	al := newTestNetwork(t, Policy{Allow: []string{"api.example:443"}}, r)
	if ok, _ := al.cfg.Filter.Allowed(netip.MustParseAddrPort("10.9.9.9:443")); ok {
		t.Errorf("allowed before it was resolved")
	}
	if _, got := ask(t, al, "api.example.", dnsmessage.TypeA); len(got) != 1 {
		t.Errorf("allowed domain's private address not answered: %v", got)
	}
	if ok, _ := al.cfg.Filter.Allowed(netip.MustParseAddrPort("10.9.9.9:443")); !ok {
		t.Errorf("resolved allowed domain not reachable")
	}
	if ok, _ := al.cfg.Filter.Allowed(netip.MustParseAddrPort("10.9.9.9:22")); ok {
		t.Errorf("allowed domain reachable on another port")
	}
	if _, got := ask(t, al, "ok.example.", dnsmessage.TypeA); len(got) != 0 {
		t.Errorf("a name outside the allow list answered with %v", got)
	}
}

// TestDNSRealResolver: address forms the host's resolver may turn into
// loopback (decimal, octal, hex, localhost) are never answered as such.
func TestDNSRealResolver(t *testing.T) {
	n := newTestNetwork(t, Policy{}, nil)
	for _, name := range []string{"localhost.", "2130706433.", "0177.0.0.1.", "0x7f.0.0.1.", "127.1.", "0.", "0x0."} {
		_, got := ask(t, n, name, dnsmessage.TypeA)
		for _, a := range got {
			if !n.cfg.Filter.Reachable(a) || a.IsLoopback() || a.IsUnspecified() {
				t.Errorf("%s answered with %s", name, a)
			}
		}
	}
}

// TestHostileFrames: a frame length no Ethernet frame has ends the VMM's
// stream instead of being buffered.
func TestHostileFrames(t *testing.T) {
	n := newTestNetwork(t, Policy{}, nil)
	host, vmm := net.Pipe()
	n.Attach(host)
	go io.Copy(io.Discard, vmm)
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], 1<<30)
	vmm.Write(hdr[:])
	vmm.SetReadDeadline(time.Now().Add(5 * time.Second))
	done := make(chan error, 1)
	go func() { _, err := vmm.Write(make([]byte, 100)); done <- err }()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("stream still open after a 1 GiB frame length")
		}
	case <-time.After(5 * time.Second):
		t.Errorf("stream still open after a 1 GiB frame length")
	}
}

// TestPublishBusyPort: a published port already in use fails New, and
// leaves nothing bound.
func TestPublishBusyPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	free, _ := net.Listen("tcp", "127.0.0.1:0")
	freePort := free.Addr().(*net.TCPAddr).Port
	free.Close()
	_, err = New(Config{Ports: []Port{{HostPort: freePort, GuestPort: 80}, {HostPort: ln.Addr().(*net.TCPAddr).Port, GuestPort: 81}}})
	if err == nil {
		t.Fatal("busy port accepted")
	}
	l2, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort)))
	if err != nil {
		t.Fatalf("the first port stayed bound after the failure: %v", err)
	}
	l2.Close()
}
