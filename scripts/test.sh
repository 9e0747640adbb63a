#!/usr/bin/env bash
# Sets the host up, builds both ways (scripts/buildcheck.sh) and runs every
# test, integration tests on real VMs included (a second time on the other
# hypervisor driver, where the host has one). Extra arguments go to `go test` (e.g. -run, -v).
# Then fuzzes the host's parser of the (untrusted) agent's frames for a
# bounded time: BOXRUN_FUZZTIME per target (default 12s; 0 skips).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The tree and a consumer module, built plain (no GOFLAGS) and with the
# tags (CGO_ENABLED=0); go vet, plain.
scripts/buildcheck.sh
. scripts/env.sh
go test -count=1 -timeout 40m "$@" ./...
# What an ordinary user does, again as one (no root): scripts/rootless-test.sh.
if [ "$(id -u)" -eq 0 ]; then
  scripts/rootless-test.sh
fi
# The integration suite again on the other hypervisor driver (the one auto
# did not pick), where the host can run it; else one line says what is missing.
BOXRUN_TEST_OTHER_DRIVER=1 go test -count=1 -timeout 40m "$@" ./integration/
fuzztime=${BOXRUN_FUZZTIME:-12s}
if [ "$fuzztime" != 0 ]; then
	# go test -fuzz takes one target per run. Go's fuzz coordinator now
	# and then ends a clean run with "context deadline exceeded" when the
	# fuzz time runs out while a worker is busy (no failing input: nothing
	# written to testdata/fuzz): that run is repeated once. A failing input
	# fails at once.
	for target in FuzzFrames FuzzClientExec FuzzDecodeResult; do
		log=$(mktemp)
		if ! go test -run XXX -fuzz "^$target\$" -fuzztime "$fuzztime" ./exec/ 2>&1 | tee "$log"; then
			if grep -q "context deadline exceeded" "$log" && ! grep -q "Failing input written" "$log"; then
				echo "test.sh: $target: the fuzz coordinator timed out with no failing input; once more" >&2
				go test -run XXX -fuzz "^$target\$" -fuzztime "$fuzztime" ./exec/
			else
				rm -f "$log"
				exit 1
			fi
		fi
		rm -f "$log"
	done
fi
