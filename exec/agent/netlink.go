//go:build linux

package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

// A minimal rtnetlink client: list links, set one up, replace an address
// and the default route. Enough to configure a box's interface without a
// netlink library in the agent.

type netlink struct {
	fd  int
	seq uint32
}

var ne = binary.NativeEndian

func dialNetlink() (*netlink, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	return &netlink{fd: fd}, nil
}

func (nl *netlink) close() { unix.Close(nl.fd) }

func nlAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// attr appends an rtattr.
func attr(b []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b = ne.AppendUint16(b, uint16(l))
	b = ne.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%unix.RTA_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

// request sends one message and collects the payloads of the answers up to
// the acknowledgement (or the end of a dump). A negative acknowledgement is
// returned as its errno.
func (nl *netlink) request(typ, flags uint16, body []byte) ([][]byte, error) {
	nl.seq++
	seq := nl.seq
	msg := make([]byte, 0, unix.SizeofNlMsghdr+len(body))
	msg = ne.AppendUint32(msg, uint32(unix.SizeofNlMsghdr+len(body)))
	msg = ne.AppendUint16(msg, typ)
	msg = ne.AppendUint16(msg, flags|unix.NLM_F_REQUEST)
	msg = ne.AppendUint32(msg, seq)
	msg = ne.AppendUint32(msg, 0) // port id: the kernel fills it in
	msg = append(msg, body...)
	if err := unix.Sendto(nl.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out [][]byte
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(nl.fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		b := buf[:n]
		for len(b) >= unix.SizeofNlMsghdr {
			l := int(ne.Uint32(b[0:4]))
			t := ne.Uint16(b[4:6])
			s := ne.Uint32(b[8:12])
			if l < unix.SizeofNlMsghdr || l > len(b) {
				return nil, errors.New("netlink: malformed message")
			}
			data := b[unix.SizeofNlMsghdr:l]
			b = b[min(nlAlign(l), len(b)):]
			if s != seq {
				continue // an answer to an earlier request
			}
			switch t {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(data) < 4 {
					return nil, errors.New("netlink: short error message")
				}
				if e := int32(ne.Uint32(data[0:4])); e != 0 {
					return nil, unix.Errno(-e)
				}
				return out, nil
			default:
				out = append(out, append([]byte(nil), data...))
			}
		}
	}
}

type link struct {
	index int
	name  string
	typ   uint16 // ARPHRD_*
}

// links lists the network interfaces, by index.
func (nl *netlink) links() ([]link, error) {
	body := make([]byte, unix.SizeofIfInfomsg) // family AF_UNSPEC
	msgs, err := nl.request(unix.RTM_GETLINK, unix.NLM_F_DUMP, body)
	if err != nil {
		return nil, err
	}
	var out []link
	for _, m := range msgs {
		if len(m) < unix.SizeofIfInfomsg {
			continue
		}
		l := link{typ: ne.Uint16(m[2:4]), index: int(int32(ne.Uint32(m[4:8])))}
		for a := m[unix.SizeofIfInfomsg:]; len(a) >= unix.SizeofRtAttr; {
			al := int(ne.Uint16(a[0:2]))
			if al < unix.SizeofRtAttr || al > len(a) {
				break
			}
			if ne.Uint16(a[2:4]) == unix.IFLA_IFNAME {
				l.name = unix.ByteSliceToString(a[unix.SizeofRtAttr:al])
			}
			a = a[min(nlAlign(al), len(a)):]
		}
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].index < out[j].index })
	return out, nil
}

// waitLink finds the interface name, or with name "" the first
// non-loopback interface, waiting up to timeout for its driver to create it.
func (nl *netlink) waitLink(ctx context.Context, name string, timeout time.Duration) (link, error) {
	deadline := time.Now().Add(timeout)
	for {
		links, err := nl.links()
		if err != nil {
			return link{}, fmt.Errorf("listing interfaces: %w", err)
		}
		var names []string
		for _, l := range links {
			if name == "" && l.typ != unix.ARPHRD_LOOPBACK || name != "" && l.name == name {
				return l, nil
			}
			names = append(names, l.name)
		}
		if time.Now().After(deadline) {
			if name == "" {
				return link{}, fmt.Errorf("no network interface besides lo (interfaces: %q); does the VM have a network device?", names)
			}
			return link{}, fmt.Errorf("no interface %q (interfaces: %q)", name, names)
		}
		select {
		case <-ctx.Done():
			return link{}, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// setUp sets IFF_UP on the interface, and its MTU when mtu > 0.
func (nl *netlink) setUp(index, mtu int) error {
	b := make([]byte, 0, unix.SizeofIfInfomsg)
	b = append(b, unix.AF_UNSPEC, 0)
	b = ne.AppendUint16(b, 0)             // type
	b = ne.AppendUint32(b, uint32(index)) // index
	b = ne.AppendUint32(b, unix.IFF_UP)   // flags
	b = ne.AppendUint32(b, unix.IFF_UP)   // change
	if mtu > 0 {
		b = attr(b, unix.IFLA_MTU, ne.AppendUint32(nil, uint32(mtu)))
	}
	_, err := nl.request(unix.RTM_NEWLINK, unix.NLM_F_ACK, b)
	return err
}

// setMAC sets the interface's hardware address (before it is up: not every
// driver changes it on a running link).
func (nl *netlink) setMAC(index int, mac net.HardwareAddr) error {
	b := make([]byte, 0, unix.SizeofIfInfomsg)
	b = append(b, unix.AF_UNSPEC, 0)
	b = ne.AppendUint16(b, 0)             // type
	b = ne.AppendUint32(b, uint32(index)) // index
	b = ne.AppendUint32(b, 0)             // flags
	b = ne.AppendUint32(b, 0)             // change
	b = attr(b, unix.IFLA_ADDRESS, mac)
	_, err := nl.request(unix.RTM_NEWLINK, unix.NLM_F_ACK, b)
	return err
}

func family(a netip.Addr) byte {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// replaceAddress sets pfx on the interface; an address that is already
// there is updated, not an error.
func (nl *netlink) replaceAddress(index int, pfx netip.Prefix) error {
	addr := pfx.Addr()
	var flags byte
	if addr.Is6() {
		flags = unix.IFA_F_NODAD // usable at once: the box is alone on its link
	}
	b := []byte{family(addr), byte(pfx.Bits()), flags, unix.RT_SCOPE_UNIVERSE}
	b = ne.AppendUint32(b, uint32(index))
	b = attr(b, unix.IFA_LOCAL, addr.AsSlice())
	b = attr(b, unix.IFA_ADDRESS, addr.AsSlice())
	_, err := nl.request(unix.RTM_NEWADDR, unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
	return err
}

// replaceDefaultRoute makes gw on the interface the default route of its
// address family, replacing any other.
func (nl *netlink) replaceDefaultRoute(index int, gw netip.Addr) error {
	b := []byte{
		family(gw), 0, 0, 0, // family, dst_len, src_len, tos
		unix.RT_TABLE_MAIN, unix.RTPROT_BOOT, unix.RT_SCOPE_UNIVERSE, unix.RTN_UNICAST,
	}
	b = ne.AppendUint32(b, 0) // flags
	b = attr(b, unix.RTA_GATEWAY, gw.AsSlice())
	b = attr(b, unix.RTA_OIF, ne.AppendUint32(nil, uint32(index)))
	_, err := nl.request(unix.RTM_NEWROUTE, unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
	return err
}
