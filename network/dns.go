package network

import (
	"context"
	"errors"
	"net"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// dnsTTL is how long answers are cached by the box, and how long the
// addresses of a domain rule stay bound to it.
const dnsTTL = 60 * time.Second

// serveDNS answers the box's DNS queries on one flow (a client port),
// resolving names on the host. Answers the policy would refuse to connect
// to are left out, and names a Deny rule names do not resolve.
func (n *Network) serveDNS(c net.Conn) {
	u, ok := n.track(c)
	if !ok {
		c.Close()
		return
	}
	defer func() { c.Close(); u() }()
	buf := make([]byte, 4096)
	for {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		k, err := c.Read(buf)
		if err != nil {
			return
		}
		if resp := n.answer(buf[:k]); resp != nil {
			c.Write(resp)
		}
	}
}

// answer builds the reply to one query (nil: not a query, dropped).
func (n *Network) answer(query []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response {
		return nil
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return nil
	}
	resp := dnsmessage.Message{Header: dnsmessage.Header{
		ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired, RecursionAvailable: true,
	}, Questions: qs}
	switch {
	case h.OpCode != 0:
		resp.RCode = dnsmessage.RCodeNotImplemented
	case len(qs) != 1:
		resp.RCode = dnsmessage.RCodeFormatError
	default:
		q := qs[0]
		resp.RCode, resp.Answers = n.resolve(q)
	}
	b, err := resp.Pack()
	if err != nil {
		return nil
	}
	return b
}

func (n *Network) resolve(q dnsmessage.Question) (dnsmessage.RCode, []dnsmessage.Resource) {
	name := q.Name.String()
	if q.Class != dnsmessage.ClassINET {
		return dnsmessage.RCodeNotImplemented, nil
	}
	if !n.dnsRate.Allow() {
		return dnsmessage.RCodeRefused, nil // a box flooding the host's resolver
	}
	if !n.cfg.Filter.AllowedName(name) {
		// Denied: not answered, but learnt on the host, so the box cannot
		// use the name's addresses by asking another resolver.
		n.learnDenied(name)
		return dnsmessage.RCodeNameError, nil
	}
	if !n.cfg.Filter.Resolvable(name) {
		return dnsmessage.RCodeNameError, nil
	}
	var network string
	switch q.Type {
	case dnsmessage.TypeA:
		network = "ip4"
	case dnsmessage.TypeAAAA:
		// The box has no IPv6 route: an empty answer makes resolvers
		// use the A record.
		return dnsmessage.RCodeSuccess, nil
	default:
		return dnsmessage.RCodeNotImplemented, nil
	}
	ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
	defer cancel()
	addrs, err := n.cfg.Resolver.LookupNetIP(ctx, network, name)
	if err != nil {
		var de *net.DNSError
		if errors.As(err, &de) && de.IsNotFound {
			return dnsmessage.RCodeNameError, nil
		}
		return dnsmessage.RCodeServerFailure, nil
	}
	n.cfg.Filter.Learn(name, addrs, dnsTTL)
	var out []dnsmessage.Resource
	for _, a := range addrs {
		a = a.Unmap()
		if !a.Is4() || !n.cfg.Filter.Reachable(a) {
			continue
		}
		out = append(out, dnsmessage.Resource{
			Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: uint32(dnsTTL.Seconds())},
			Body:   &dnsmessage.AResource{A: a.As4()},
		})
	}
	return dnsmessage.RCodeSuccess, out
}

// denyTTL is how long the addresses of a denied name stay refused after
// the host resolved it; they are resolved again well before that.
const denyTTL = time.Hour

// learnDenied resolves a denied name on the host and refuses its
// addresses.
func (n *Network) learnDenied(name string) {
	ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
	defer cancel()
	for _, network := range []string{"ip4", "ip6"} {
		if addrs, err := n.cfg.Resolver.LookupNetIP(ctx, network, name); err == nil {
			n.cfg.Filter.Learn(name, addrs, denyTTL)
		}
	}
}

// refreshDenied keeps the addresses of the Deny rules' names current,
// from the start (a box that never asks DNS and uses a denied name's
// address directly is refused too).
func (n *Network) refreshDenied() {
	defer n.wg.Done()
	names := n.cfg.Filter.DenyDomains()
	if len(names) == 0 {
		return
	}
	t := time.NewTicker(10 * time.Minute)
	defer t.Stop()
	for {
		for _, name := range names {
			n.learnDenied(name)
		}
		select {
		case <-t.C:
		case <-n.ctx.Done():
			return
		}
	}
}
