package runtime

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun/errdefs"
)

// A Cloud Hypervisor box's NIC is a virtio-net device on a TAP: CH has no
// stream backend like QEMU's, and the engine's userspace network (package
// network) speaks a stream of length-prefixed frames. The driver bridges
// the two without the host's IP stack ever seeing a guest frame:
//
//   - It creates a persistent TAP "bxt<hash of box id>" (IFF_TAP|IFF_NO_PI|
//     IFF_VNET_HDR, one queue pair: what CH opens it with), MTU chNetMTU,
//     and hands its name to CH, which attaches to it (CH leaves the IP
//     configuration of a TAP that already exists alone).
//   - The TAP's host end is made a port of a bridge "bxb<hash>" that is
//     never brought up. A bridge port's frames go to the bridge (which,
//     down, drops them) instead of the host's IP stack: no address, ARP,
//     IPv6 or forwarding of the host applies to them. Frames to the
//     link-local group addresses, which a bridge passes to the port's
//     own stack, are made to go to the bridge too (group_fwd_mask).
//   - DialNetwork opens an AF_PACKET socket bound to the TAP. Packet
//     sockets see a device's frames before its rx handler (the bridge)
//     takes them; what the socket sends is transmitted on the TAP, which
//     delivers it to CH and so to the guest.
//
// That takes CAP_NET_ADMIN (TAP, bridge) and CAP_NET_RAW (packet socket):
// an engine without them gets an error naming them at Create. The TAP and
// the bridge outlive an engine crash with the VM (DialNetwork works again
// after Attach) and are deleted with the VM.
//
// The guest's offloads (TSO, UFO, checksum) are turned off: a packet
// socket would hand over unsegmented super-frames with partial checksums.

// chNetMTU is the NIC's MTU: the userspace network's (network.MTU).
const chNetMTU = 65520

// tapNames are the TAP and bridge of box id (at most 15 bytes each).
func tapNames(id string) (tap, bridge string) {
	h := sha256.Sum256([]byte(id))
	s := hex.EncodeToString(h[:5])
	return "bxt" + s, "bxb" + s
}

// linkExists reports whether a network interface named name exists.
func linkExists(name string) bool {
	_, err := os.Stat("/sys/class/net/" + name)
	return err == nil
}

// setupTap makes box id's TAP and its bridge (replacing leftovers of an
// earlier VM) and returns the TAP's name.
func setupTap(id string) (string, error) {
	tap, br := tapNames(id)
	deleteTap(id)
	fail := func(what string, err error) (string, error) {
		deleteTap(id)
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			return "", errdefs.New(errdefs.RuntimeError,
				"cloud-hypervisor network: %s: %v: the engine needs CAP_NET_ADMIN and CAP_NET_RAW (run it as root, or grant "+
					"them: setcap cap_net_admin,cap_net_raw+ep <binary>) to give a box a NIC; or use hypervisor qemu, whose "+
					"NIC needs neither", what, err)
		}
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "cloud-hypervisor network: %s", what)
	}
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fail("open /dev/net/tun", fmt.Errorf("%w (the host kernel needs the tun module)", err))
		}
		return fail("open /dev/net/tun", err)
	}
	ifr, err := unix.NewIfreq(tap)
	if err != nil {
		f.Close()
		return fail("tap name", err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr); err != nil {
		f.Close()
		return fail("create tap "+tap, err)
	}
	if err := unix.IoctlSetInt(int(f.Fd()), unix.TUNSETPERSIST, 1); err != nil {
		f.Close()
		return fail("make tap "+tap+" persistent", err)
	}
	f.Close()
	nl, err := openRtnl()
	if err != nil {
		return fail("netlink", err)
	}
	defer nl.close()
	if err := nl.newBridge(br, bridgeFwdMask); err != nil {
		return fail("create bridge "+br, err)
	}
	tapIf, err := net.InterfaceByName(tap)
	if err != nil {
		return fail("tap "+tap, err)
	}
	brIf, err := net.InterfaceByName(br)
	if err != nil {
		return fail("bridge "+br, err)
	}
	// No IPv6 on either: no link-local address, no router solicitations.
	for _, n := range []string{tap, br} {
		os.WriteFile("/proc/sys/net/ipv6/conf/"+n+"/disable_ipv6", []byte("1"), 0o644)
	}
	if err := nl.setLink(tapIf.Index, brIf.Index, chNetMTU, true); err != nil {
		return fail("attach tap "+tap+" to bridge "+br, err)
	}
	if err := nl.setPortFwdMask(tapIf.Index, portFwdMask); err != nil {
		return fail("keep link-local frames of "+tap+" from the host", err)
	}
	return tap, nil
}

// A bridge does not forward frames to the IEEE link-local group addresses
// (01:80:c2:00:00:0X): it hands them to the port's own stack, so the
// host's IP stack would take a guest's UDP or ARP sent to one. The group
// forward masks make the bridge forward them instead, which, down, drops
// them. The bridge's mask may not hold bits 0-2 but is the only one read
// for LLDP (0x0E); the port's may hold all but pause (1), which a bridge
// always drops. Set over netlink: CAP_NET_ADMIN is enough (sysfs would
// also need write access to root's files).
const (
	bridgeFwdMask = 0xfff8
	portFwdMask   = 0xfffd
)

// deleteTap deletes box id's TAP and bridge, if they exist.
func deleteTap(id string) {
	tap, br := tapNames(id)
	if !linkExists(tap) && !linkExists(br) {
		return
	}
	nl, err := openRtnl()
	if err != nil {
		return
	}
	defer nl.close()
	for _, n := range []string{tap, br} {
		if ifc, err := net.InterfaceByName(n); err == nil {
			nl.delLink(ifc.Index)
		}
	}
}

// tapConn is DialNetwork's stream over a packet socket bound to the TAP:
// frames read are handed out with their 4-byte big-endian length, and
// what is written is cut into frames the same way.
type tapConn struct {
	f    *os.File
	rbuf []byte // the current frame, length prefix included
	roff int
	wbuf []byte // bytes of an incomplete frame
	fbuf []byte // read buffer
}

// maxFrame bounds a frame in either direction (an MTU of 65520 plus the
// Ethernet header and a VLAN tag).
const maxFrame = 65535 + 18

func dialTap(name string) (io.ReadWriteCloser, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "the VM's tap %s", name)
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, proto)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "packet socket for tap %s (needs CAP_NET_RAW)", name)
	}
	fail := func(what string, err error) (io.ReadWriteCloser, error) {
		unix.Close(fd)
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "packet socket for tap %s: %s", name, what)
	}
	// Our own transmissions would come back as PACKET_OUTGOING copies.
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		return fail("PACKET_IGNORE_OUTGOING (Linux 4.20+)", err)
	}
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
		return fail("bind", err)
	}
	return &tapConn{f: os.NewFile(uintptr(fd), "tap:"+name), fbuf: make([]byte, maxFrame)}, nil
}

func (c *tapConn) Read(p []byte) (int, error) {
	for c.roff >= len(c.rbuf) {
		n, err := c.f.Read(c.fbuf)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			continue
		}
		c.rbuf = binary.BigEndian.AppendUint32(c.rbuf[:0], uint32(n))
		c.rbuf = append(c.rbuf, c.fbuf[:n]...)
		c.roff = 0
	}
	n := copy(p, c.rbuf[c.roff:])
	c.roff += n
	return n, nil
}

func (c *tapConn) Write(p []byte) (int, error) {
	c.wbuf = append(c.wbuf, p...)
	for len(c.wbuf) >= 4 {
		n := int(binary.BigEndian.Uint32(c.wbuf))
		if n == 0 || n > maxFrame {
			return 0, fmt.Errorf("tap: bad frame length %d", n)
		}
		if len(c.wbuf) < 4+n {
			break
		}
		if _, err := c.f.Write(c.wbuf[4 : 4+n]); err != nil && !errors.Is(err, unix.ENOBUFS) && !errors.Is(err, unix.ENETDOWN) {
			// A full queue or a TAP not (yet) attached drops the frame,
			// as a NIC would; anything else ends the stream.
			return 0, err
		}
		c.wbuf = c.wbuf[4+n:]
	}
	if len(c.wbuf) == 0 {
		c.wbuf = c.wbuf[:0:0] // do not keep a large buffer alive
	}
	return len(p), nil
}

func (c *tapConn) Close() error { return c.f.Close() }

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// rtnl is a minimal rtnetlink client: create a bridge, set a link's
// master, MTU and up flag, delete a link.
type rtnl struct {
	fd  int
	seq uint32
}

func openRtnl() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &rtnl{fd: fd}, nil
}

func (n *rtnl) close() { unix.Close(n.fd) }

// nlAttr encodes one rtattr (padded to 4 bytes).
func nlAttr(typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b := make([]byte, (l+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[unix.SizeofRtAttr:], data)
	return b
}

func nlU32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// request sends one link message and waits for its acknowledgement.
func (n *rtnl) request(typ uint16, flags uint16, ifi unix.IfInfomsg, attrs ...[]byte) error {
	n.seq++
	body := make([]byte, unix.SizeofIfInfomsg)
	body[0] = ifi.Family
	binary.NativeEndian.PutUint16(body[2:], ifi.Type)
	binary.NativeEndian.PutUint32(body[4:], uint32(ifi.Index))
	binary.NativeEndian.PutUint32(body[8:], ifi.Flags)
	binary.NativeEndian.PutUint32(body[12:], ifi.Change)
	for _, a := range attrs {
		body = append(body, a...)
	}
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], n.seq)
	msg = append(msg, body...)
	if err := unix.Sendto(n.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		m, _, err := unix.Recvfrom(n.fd, buf, 0)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:m])
		if err != nil {
			return err
		}
		for _, r := range msgs {
			if r.Header.Seq != n.seq || r.Header.Type != unix.NLMSG_ERROR || len(r.Data) < 4 {
				continue
			}
			if e := int32(binary.NativeEndian.Uint32(r.Data)); e != 0 {
				return syscall.Errno(-e)
			}
			return nil
		}
	}
}

// newBridge creates a bridge whose group forward mask is fwdMask.
func (n *rtnl) newBridge(name string, fwdMask uint16) error {
	kind := nlAttr(unix.IFLA_INFO_KIND, []byte("bridge"))
	data := nlAttr(unix.IFLA_INFO_DATA|unix.NLA_F_NESTED, nlAttr(unix.IFLA_BR_GROUP_FWD_MASK, nlU16(fwdMask)))
	return n.request(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL, unix.IfInfomsg{Family: unix.AF_UNSPEC},
		nlAttr(unix.IFLA_IFNAME, append([]byte(name), 0)),
		nlAttr(unix.IFLA_LINKINFO, append(kind, data...)))
}

// setPortFwdMask sets the group forward mask of bridge port index.
func (n *rtnl) setPortFwdMask(index int, mask uint16) error {
	return n.request(unix.RTM_SETLINK, 0, unix.IfInfomsg{Family: unix.AF_BRIDGE, Index: int32(index)},
		nlAttr(unix.IFLA_PROTINFO|unix.NLA_F_NESTED, nlAttr(unix.IFLA_BRPORT_GROUP_FWD_MASK, nlU16(mask))))
}

func nlU16(v uint16) []byte { return binary.NativeEndian.AppendUint16(nil, v) }

// setLink sets a link's master, MTU and (with up) the up flag.
func (n *rtnl) setLink(index, master, mtu int, up bool) error {
	ifi := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(index)}
	if up {
		ifi.Flags, ifi.Change = unix.IFF_UP, unix.IFF_UP
	}
	return n.request(unix.RTM_NEWLINK, 0, ifi, nlAttr(unix.IFLA_MASTER, nlU32(uint32(master))), nlAttr(unix.IFLA_MTU, nlU32(uint32(mtu))))
}

func (n *rtnl) delLink(index int) error {
	return n.request(unix.RTM_DELLINK, 0, unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(index)})
}
