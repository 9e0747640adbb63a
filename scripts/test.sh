#!/usr/bin/env bash
# Sets the host up and runs every test, integration tests on real VMs
# included. Extra arguments go to `go test` (e.g. -run, -v).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
go vet ./...
go test -count=1 -timeout 40m "$@" ./...
