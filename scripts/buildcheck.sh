#!/usr/bin/env bash
# Builds the tree, and a tiny module that uses it, both ways boxrun can be
# built (scripts/test.sh runs this before the tests; it also runs alone):
#   plain   no GOFLAGS, cgo on: what `go build` / `go test` in a consumer's
#           module does; needs the C headers scripts/setup.sh installs
#           (libgpgme-dev, libbtrfs-dev, pkg-config, gcc)
#   tagged  scripts/env.sh's build tags with CGO_ENABLED=0: no C library
#           and no C compiler at all
# The consumer module is made in a temp dir: it requires boxrun through a
# replace of this tree, and its test calls boxrun.New on a temp data dir
# and Info. It is resolved offline (GOPROXY=off): go.sum is seeded from this
# tree's, so `go mod tidy` checks every module against it (no checksum
# database) and takes them from the module cache that building this tree
# filled.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
command -v go >/dev/null 2>&1 || export PATH=$PATH:/usr/local/go/bin
unset GOFLAGS
tagged=$(bash -c '. scripts/env.sh && printf %s "$GOFLAGS"')

step() {
	local t0=$SECONDS
	"$@"
	echo "buildcheck: $* ($((SECONDS - t0))s)" >&2
}

step go build ./...
step go vet ./...
step env CGO_ENABLED=0 GOFLAGS="$tagged" go build ./...
# go.mod and go.sum must be tidy. Checking it also fetches every module
# of the whole graph, the tests of dependencies' packages included, which
# building only fetches in part: the consumer below, resolved offline,
# takes them from the module cache.
step go mod tidy -diff

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/go.mod" <<EOF
module example.com/boxrun-consumer

$(grep -m1 '^go ' go.mod)

require github.com/boxrun/boxrun v0.0.0

replace github.com/boxrun/boxrun => $root
EOF
cp go.sum "$tmp/go.sum"
cat >"$tmp/consumer_test.go" <<'EOF'
package consumer

import (
	"context"
	"testing"

	"github.com/boxrun/boxrun"
)

func TestEngine(t *testing.T) {
	eng, err := boxrun.New(context.Background(), boxrun.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	if info := eng.Info(); info.MaxCPU <= 0 || info.Hypervisor == "" {
		t.Fatalf("Info() = %+v", info)
	}
}
EOF
cd "$tmp"
export GOPROXY=off
step env GOFLAGS=-mod=mod go mod tidy
step env GOFLAGS=-mod=mod go test -count=1 ./...
step env CGO_ENABLED=0 GOFLAGS="-mod=mod $tagged" go test -count=1 ./...
