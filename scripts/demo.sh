#!/usr/bin/env bash
# Sets the host up, then boots a box from a locally built image and runs a
# command in it, printing the output and each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
go run ./examples/demo "$@"
