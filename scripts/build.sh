#!/usr/bin/env bash
# Builds the release binaries: every main package under ./boxrund/... and
# ./cmd/..., static (CGO_ENABLED=0), into OUTDIR (default bin/ at the repo
# root) as OUTDIR/<last path element>, and prints their paths. Each embeds
# the guest agent (build tag boxrun_embed_agent), built first into
# exec/embedded/agent, so the binaries run without a Go toolchain. Needs
# no network once the modules are in the module cache.
#
#   scripts/build.sh [outdir]
set -euo pipefail

outdir=${1:-}
if [ -n "$outdir" ]; then
  case $outdir in /*) ;; *) outdir=$PWD/$outdir ;; esac # relative to the caller
fi
cd "$(dirname "$0")/.."
root=$PWD
outdir=${outdir:-$root/bin}
. scripts/env.sh

# A -tags on the command line replaces the one in GOFLAGS (env.sh), so the
# full list is given.
tags=containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper,boxrun_embed_agent

# The agent runs in the Linux guest, which has the host's architecture.
# Without tags: it must not embed itself.
echo "build.sh: building the agent" >&2
mkdir -p exec/embedded
# As the engine builds it (exec.BuildAgent: CGO_ENABLED=0 go build -trimpath
# -ldflags='-s -w', with the runtime overlay of exec/sysmon.go).
# buildagent runs here (GOOS/GOARCH cleared for it) and builds for the
# target's architecture.
GOOS= GOARCH= go run -tags= ./exec/internal/buildagent -goarch "$(go env GOARCH)" -o exec/embedded/agent

pkgs=()
for pattern in ./boxrund/... ./cmd/...; do
  [ -d "${pattern%/...}" ] || continue # no such directory: nothing to build
  list=$(go list -tags="$tags" -f '{{if eq .Name "main"}}{{.ImportPath}}{{end}}' "$pattern")
  for pkg in $list; do
    pkgs+=("$pkg")
  done
done
if ((${#pkgs[@]} == 0)); then
  echo "build.sh: no main package under ./boxrund or ./cmd" >&2
  exit 1
fi
if dup=$(printf '%s\n' "${pkgs[@]##*/}" | sort | uniq -d | grep .); then
  echo "build.sh: several main packages would be bin/$dup" >&2
  exit 1
fi

mkdir -p "$outdir"
for pkg in "${pkgs[@]}"; do
  out=$outdir/${pkg##*/}
  echo "build.sh: building $pkg" >&2
  CGO_ENABLED=0 go build -tags="$tags" -trimpath -o "$out" "$pkg"
  echo "$out"
done
