package runtime

import (
	"errors"
	"os"
	"strings"

	"github.com/boxrun/boxrun/errdefs"
)

// Description says what runs a driver's VMs.
type Description struct {
	Driver       string // "qemu", "cloud-hypervisor"
	Binary       string // the VMM executable found
	Version      string // its version: "v53.0" (cloud-hypervisor), "7.2.22" (QEMU)
	Acceleration string // "kvm" or "tcg"
}

// Describe runs the VMM binary for its version; errors leave fields empty.
func Describe(h Hypervisor) Description {
	d := Description{Driver: h.Name()}
	switch h := h.(type) {
	case *CloudHypervisor:
		d.Acceleration = "kvm" // CH runs on KVM (or MSHV) only
		d.Binary, _ = h.BinaryPath()
		d.Version, _ = h.Version()
	case *QEMU:
		d.Acceleration = "tcg"
		if (h.KVM == nil && KVMAvailable()) || (h.KVM != nil && *h.KVM) {
			d.Acceleration = "kvm"
		}
		if bin, err := h.binary(); err == nil {
			d.Binary = bin
			if out, err := versionOutput(bin); err == nil {
				// "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
				line := firstLine(out)
				d.Version = line
				if _, rest, ok := strings.Cut(line, "version "); ok {
					d.Version = strings.Fields(rest)[0]
				}
			}
		}
	}
	return d
}

// Driver names for Select.
const (
	DriverAuto            = "auto"
	DriverQEMU            = "qemu"
	DriverCloudHypervisor = "cloud-hypervisor"
)

// Select returns the driver called name: "qemu", "cloud-hypervisor", or
// "auto" (also ""), which is Cloud Hypervisor when /dev/kvm can run guests
// (KVMAvailable) and a cloud-hypervisor binary is found (chBinary, else
// $BOXRUN_CLOUD_HYPERVISOR, else PATH), else QEMU (with KVM when it can,
// else TCG). A named driver is returned whatever the host has: what it
// lacks fails Start with an error naming it.
func Select(name, chBinary string) (Hypervisor, error) {
	chd := &CloudHypervisor{Binary: chBinary}
	switch name {
	case "", DriverAuto:
		if KVMAvailable() && chd.Available() {
			return chd, nil
		}
		return &QEMU{}, nil
	case DriverQEMU:
		return &QEMU{}, nil
	case DriverCloudHypervisor, "ch", "cloudhypervisor":
		return chd, nil
	}
	return nil, errdefs.New(errdefs.ValidationError, "unknown hypervisor %q (want auto, cloud-hypervisor or qemu)", name)
}

// Drivers returns every driver, for finding the VMs of boxes started by
// another driver than the current one (Attach): h first.
func Drivers(h Hypervisor, chBinary string) []Hypervisor {
	all := []Hypervisor{h}
	if _, ok := h.(*QEMU); !ok {
		all = append(all, &QEMU{})
	}
	if _, ok := h.(*CloudHypervisor); !ok {
		all = append(all, &CloudHypervisor{Binary: chBinary})
	}
	return all
}

// Missing says what the host lacks to run driver name ("" when nothing):
// for cloud-hypervisor the binary and a /dev/kvm that runs guests; for
// QEMU the binary.
func Missing(name, chBinary string) string {
	var miss []string
	switch name {
	case DriverCloudHypervisor:
		if !(&CloudHypervisor{Binary: chBinary}).Available() {
			miss = append(miss, "no cloud-hypervisor binary (PATH, $BOXRUN_CLOUD_HYPERVISOR)")
		}
		if !KVMAvailable() {
			switch f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); {
			case os.Getenv("BOXRUN_ACCEL") == "tcg":
				miss = append(miss, "KVM turned off (BOXRUN_ACCEL=tcg)")
			case errors.Is(err, os.ErrNotExist):
				miss = append(miss, "no /dev/kvm")
			case err != nil:
				miss = append(miss, "/dev/kvm not usable: "+err.Error())
			default:
				f.Close()
				miss = append(miss, "/dev/kvm cannot run guests (no VMX/SVM CPU flag, or no KVM API 12)")
			}
		}
	case DriverQEMU:
		if !(&QEMU{}).Available() {
			miss = append(miss, "no qemu-system-x86_64")
		}
	}
	return strings.Join(miss, "; ")
}
