package exec

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
)

// maxTagLen is QEMU's limit on a virtio-9p mount tag.
const maxTagLen = 31

// validateConfig checks the box configuration of a Hello. Both ends check
// it: the host to fail early with a clear message, the agent because it
// must not act on a malformed request (it writes addresses into
// resolv.conf and tags into mount calls).
// validateSetup checks the setup part of a Hello.
func validateSetup(hostname string, entropy []byte, disks map[string]int64) error {
	if len(entropy) > maxEntropy {
		return errdefs.New(errdefs.ValidationError, "hello: %d bytes of entropy, at most %d", len(entropy), maxEntropy)
	}
	if len(disks) > maxDisks {
		return errdefs.New(errdefs.ValidationError, "hello: %d disks, at most %d", len(disks), maxDisks)
	}
	for dev, size := range disks {
		if !diskDevice(dev) || size <= 0 || size%512 != 0 {
			return errdefs.New(errdefs.ValidationError, "hello: disk %q of %d bytes: want /dev/vd<letters> of a positive number of 512-byte sectors", dev, size)
		}
	}
	if hostname == "" {
		return nil
	}
	if len(hostname) > 64 {
		return errdefs.New(errdefs.ValidationError, "hello: hostname longer than 64 bytes")
	}
	for i := 0; i < len(hostname); i++ {
		c := hostname[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return errdefs.New(errdefs.ValidationError, "hello: bad hostname %q", hostname)
		}
	}
	return nil
}

const maxEntropy = 512

// maxDisks bounds HelloRequest.Disks (a box has two; volumes are shares).
const maxDisks = 16

// diskDevice reports whether dev names a virtio disk: /dev/vd and letters.
func diskDevice(dev string) bool {
	name, ok := strings.CutPrefix(dev, "/dev/vd")
	if !ok || name == "" || len(name) > 3 {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] < 'a' || name[i] > 'z' {
			return false
		}
	}
	return true
}

func validateConfig(mounts []Mount, n *Network) error {
	bad := func(format string, args ...any) error {
		return errdefs.New(errdefs.ValidationError, format, args...)
	}
	paths := map[string]string{}
	tags := map[string]bool{}
	for _, m := range mounts {
		if err := validateTag(m.Tag); err != nil {
			return bad("volume %q: %v", m.Tag, err)
		}
		if tags[m.Tag] {
			return bad("volume %q: tag used twice (a 9p share can be mounted once)", m.Tag)
		}
		tags[m.Tag] = true
		if !path.IsAbs(m.Path) || strings.ContainsRune(m.Path, 0) {
			return bad("volume %q: mount point %q is not an absolute path", m.Tag, m.Path)
		}
		p := path.Clean(m.Path)
		if p == "/" {
			return bad("volume %q: cannot mount on the box root", m.Tag)
		}
		if other, ok := paths[p]; ok {
			return bad("volumes %q and %q: both mounted on %s", other, m.Tag, p)
		}
		paths[p] = m.Tag
	}
	if n == nil {
		return nil
	}
	if n.Interface != "" {
		if len(n.Interface) > 15 || strings.ContainsAny(n.Interface, "/: \t\n\x00") || n.Interface == "." || n.Interface == ".." {
			return bad("network: bad interface name %q", n.Interface)
		}
	}
	if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
		return bad("network: MTU %d out of range (68-65535)", n.MTU)
	}
	if n.MAC != "" {
		hw, err := net.ParseMAC(n.MAC)
		if err != nil || len(hw) != 6 || hw[0]&1 != 0 {
			return bad("network: bad MAC address %q (want a unicast 6-byte address)", n.MAC)
		}
	}
	var family netip.Addr
	if n.Address != "" {
		pfx, err := netip.ParsePrefix(n.Address)
		if err != nil {
			return bad("network: address %q: want CIDR notation such as 10.0.2.15/24", n.Address)
		}
		family = pfx.Addr()
	}
	if n.Gateway != "" {
		gw, err := netip.ParseAddr(n.Gateway)
		if err != nil || gw.Zone() != "" {
			return bad("network: gateway %q is not an IP address", n.Gateway)
		}
		if family.IsValid() && gw.Is4() != family.Unmap().Is4() {
			return bad("network: gateway %s and address %s are of different IP versions", n.Gateway, n.Address)
		}
	}
	for _, d := range n.DNS {
		if _, err := netip.ParseAddr(d); err != nil {
			return bad("network: DNS server %q is not an IP address", d)
		}
	}
	return nil
}

func validateTag(tag string) error {
	if tag == "" || len(tag) > maxTagLen {
		return fmt.Errorf("mount tag must be 1 to %d bytes", maxTagLen)
	}
	for i, c := range tag {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case i > 0 && (c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'):
		default:
			return errors.New("mount tag must be letters, digits, '.', '_' or '-', starting with a letter")
		}
	}
	return nil
}
