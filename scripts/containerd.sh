#!/usr/bin/env bash
# Provides the containerd toolchain that the containerd shim tests use
# (internal/testenv/containerd.go). Idempotent: a second run only checks.
# Needs root for apt-get and for the default cache dir.
#
#   Debian's containerd 1.6 (package `containerd`: /usr/bin/containerd, ctr,
#   containerd-shim-runc-v2, and runc through its Depends). The package
#   ships a systemd unit; nothing here starts it: tests run a private
#   containerd of their own.
#
#   containerd 2.4.2 (containerd, ctr, containerd-shim-runc-v2) and crictl
#   1.37.0, built from the Go module proxy with CGO_ENABLED=0 and cached in
#     ${BOXRUN_TOOLS_DIR:-/var/cache/boxrun/tools}/containerd-2.4.2/bin
#     ${BOXRUN_TOOLS_DIR:-/var/cache/boxrun/tools}/crictl-1.37.0/bin
#   The builds ignore the project's GOFLAGS tags (scripts/env.sh) and go.mod:
#   they run in a temp dir with GOFLAGS unset. On the 2-core dev VM, with the
#   modules already downloaded, a cold build took 183 s for containerd (three
#   binaries) and 53 s for crictl; with a warm Go build cache 8 s and 4 s.
#
# Prints one line saying what it did; details of a failed build go to stderr.
set -euo pipefail

CONTAINERD_VERSION=2.4.2
CRICTL_VERSION=1.37.0
TOOLS_DIR=${BOXRUN_TOOLS_DIR:-/var/cache/boxrun/tools}

command -v go >/dev/null 2>&1 || export PATH=$PATH:/usr/local/go/bin
did=()

# --- Debian's containerd 1.6 ------------------------------------------------
if dpkg-query -W -f='${Status}' containerd 2>/dev/null | grep -q "install ok installed"; then
  did+=("debian containerd $(dpkg-query -W -f='${Version}' containerd) present")
else
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  start=$SECONDS
  $SUDO apt-get update -q >&2
  # No systemd here, so the package's service is not started; where systemd
  # runs, policy-rc.d-less installs start it: stop it again (tests never use
  # the system instance).
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends containerd >&2
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd 2>/dev/null; then
    $SUDO systemctl stop containerd || true
  fi
  did+=("debian containerd installed in $((SECONDS - start))s")
fi

# --- Go builds --------------------------------------------------------------
command -v go >/dev/null 2>&1 || { echo "containerd.sh: a Go toolchain is needed" >&2; exit 1; }

# gobuild OUTDIR TAGS LDFLAGS MODULE VERSION PKG... installs PKGs (import
# paths) of MODULE@VERSION into OUTDIR: `go install pkg@version`, or, where
# that is refused (replace/exclude directives in the module's go.mod), a
# throwaway module that requires MODULE@VERSION.
gobuild() {
  local out=$1 tags=$2 ldflags=$3 mod=$4 ver=$5
  shift 5
  local work
  work=$(mktemp -d)
  local -a specs=()
  for p in "$@"; do specs+=("$p@$ver"); done
  # Run outside any module: no go.work, no project go.mod, no project tags.
  if (cd "$work" && env -u GOFLAGS GOWORK=off GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$out" \
    go install -trimpath -tags "$tags" -ldflags "$ldflags" "${specs[@]}") 2>"$work/install.log"; then
    rm -rf "$work"
    return 0
  fi
  if ! grep -qE 'replace|exclude' "$work/install.log"; then
    cat "$work/install.log" >&2
    rm -rf "$work"
    return 1
  fi
  echo "containerd.sh: go install refused $mod@$ver, building in a temp module" >&2
  (
    cd "$work"
    export GOWORK=off GOTOOLCHAIN=local CGO_ENABLED=0
    unset GOFLAGS
    # (set -e does not apply here: this runs under the caller's `if`.)
    go mod init boxrun.local/toolbuild >/dev/null 2>&1 || exit 1
    go get "$mod@$ver" >&2 || exit 1
    for p in "$@"; do
      go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out/$(basename "$p")" "$p" >&2 || exit 1
    done
  )
  local rc=$?
  rm -rf "$work"
  return $rc
}

# cached NAME DIR BIN... is true when every BIN is an executable in DIR/bin.
cached() {
  local dir=$2
  shift 2
  for b in "$@"; do [ -x "$dir/bin/$b" ] || return 1; done
}

# install_tool NAME DIR BUILDFUNC builds into DIR.tmp.PID and renames it to
# DIR, so an interrupted build never looks cached.
install_tool() {
  local name=$1 dir=$2 fn=$3
  local tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/bin"
  local start=$SECONDS
  if ! "$fn" "$tmp/bin"; then
    rm -rf "$tmp"
    echo "containerd.sh: building $name failed" >&2
    exit 1
  fi
  rm -rf "$dir"
  mv "$tmp" "$dir"
  did+=("$name built in $((SECONDS - start))s")
}

ctrd_mod=github.com/containerd/containerd/v2
build_containerd() {
  local out=$1
  local ld="-s -w -X $ctrd_mod/version.Version=v$CONTAINERD_VERSION -X $ctrd_mod/version.Package=$ctrd_mod"
  # The tags drop the cgo-only or host-specific snapshotters (btrfs needs
  # cgo anyway) and urfave/cli's doc generators, as containerd's Makefile does.
  gobuild "$out" "no_btrfs,no_devmapper,no_zfs,urfave_cli_no_docs" "$ld" "$ctrd_mod" "v$CONTAINERD_VERSION" \
    "$ctrd_mod/cmd/containerd" "$ctrd_mod/cmd/ctr" || return 1
  # The runc shim, for the tests that check the harness with runc; the
  # Makefile builds it with no_grpc (the shim speaks ttrpc only).
  gobuild "$out" "no_grpc,urfave_cli_no_docs" "$ld" "$ctrd_mod" "v$CONTAINERD_VERSION" \
    "$ctrd_mod/cmd/containerd-shim-runc-v2"
}

build_crictl() {
  gobuild "$1" "" "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=v$CRICTL_VERSION" \
    sigs.k8s.io/cri-tools "v$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl
}

mkdir -p "$TOOLS_DIR"
ctrd_dir=$TOOLS_DIR/containerd-$CONTAINERD_VERSION
if cached containerd "$ctrd_dir" containerd ctr containerd-shim-runc-v2; then
  did+=("containerd $CONTAINERD_VERSION cached")
else
  install_tool "containerd $CONTAINERD_VERSION" "$ctrd_dir" build_containerd
fi
crictl_dir=$TOOLS_DIR/crictl-$CRICTL_VERSION
if cached crictl "$crictl_dir" crictl; then
  did+=("crictl $CRICTL_VERSION cached")
else
  install_tool "crictl $CRICTL_VERSION" "$crictl_dir" build_crictl
fi

line="containerd.sh:"
for d in "${did[@]}"; do line+=" $d;"; done
echo "${line%;} (tools in $TOOLS_DIR)"
