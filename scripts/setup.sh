#!/usr/bin/env bash
# Installs what boxrun needs on a Debian host (idempotent: a second run only
# checks). Needs root (or sudo) for apt-get.
#   qemu-system-x86    the QEMU driver (KVM when usable, TCG otherwise)
#   linux-image-amd64  the guest kernel and its modules; INITRD=No skips the
#                      host initramfs build, which boxes never use
#   e2fsprogs          mkfs.ext4 -d builds image and box disks
#   xz-utils, zstd     unpack the kernel's compressed payload into a vmlinux
#   busybox-static     the tests' and the demo's tiny image
#   docker-registry    a real registry on 127.0.0.1 for the tests' pulls
#   python3-httpx      the tests' BoxRun Python SDK compatibility check of
#                      boxrund (/usr/bin/python3, the SDK's HTTP client); the
#                      same python3 makes boxrund's requests as another user
#                      (GNU tar, which writes the sparse archives the copy tests
#                      refuse, is Essential in Debian: always there)
#   chromium           the tests' headless browser for boxrund's /ui dashboard
#   iproute2           `ip netns`: the network tests put an "internet" server in a
#                      namespace of their own
#   containerd         the shim's end-to-end tests (Debian's containerd 1.6 and
#                      ctr; scripts/containerd.sh also builds containerd 2.4
#                      and crictl, cached)
#   libgpgme-dev, libbtrfs-dev, pkg-config, gcc, libc6-dev
#                      a plain `go build` (no tags, cgo on) of anything that
#                      imports boxrun: containers/image's GPG signature code
#                      links gpgme (found through pkg-config), containers/
#                      storage's btrfs driver needs the btrfs headers. With
#                      scripts/env.sh's tags and CGO_ENABLED=0, none is
#                      needed. (libdevmapper-dev is not: containers/storage
#                      1.59 has no devicemapper driver any more.)
set -euo pipefail

pkgs=(qemu-system-x86 linux-image-amd64 e2fsprogs xz-utils zstd busybox-static docker-registry python3-httpx chromium iproute2 ca-certificates git containerd
  libgpgme-dev libbtrfs-dev pkg-config gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The registry package starts a system service we do not use; tests run
# their own registry on a free port.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi
# An ordinary user for the rootless test pass (scripts/rootless-test.sh):
# in group kvm, as the README asks of a user who wants KVM.
if [ "$(id -u)" -eq 0 ] && ! id boxrun-test >/dev/null 2>&1; then
  getent group kvm >/dev/null || groupadd --system kvm
  useradd --create-home --shell /bin/bash --groups kvm boxrun-test
  echo "setup: made user boxrun-test (group kvm) for the rootless tests" >&2
fi
command -v go >/dev/null 2>&1 || export PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null 2>&1 || { echo "setup: a Go toolchain (1.24+) is needed: https://go.dev/dl" >&2; exit 1; }
# containerd 2.4 and crictl for the shim tests, built once and cached.
if [ "$(id -u)" -eq 0 ]; then
  "$(dirname "$0")/containerd.sh"
fi
ls /boot/vmlinuz-* >/dev/null 2>&1 || { echo "setup: no kernel in /boot after install" >&2; exit 1; }
echo "setup: ok ($(qemu-system-x86_64 --version | head -1); kernel $(ls /boot/vmlinuz-* | tail -1))" >&2
