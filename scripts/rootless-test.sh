#!/usr/bin/env bash
# Runs the integration tests of what an ordinary user does (create, exec,
# stream, copy, stop/start, volumes, network, the image's ownership in the
# box, warm start) as the unprivileged user boxrun-test made by
# scripts/setup.sh: no sudo, no setuid helper, no subordinate UIDs. The test
# binary and the agent are built here (as the caller) and run as that user,
# with its own home and data dirs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "rootless-test: run as root (it switches to the user boxrun-test); as an ordinary user, run go test ./integration/ directly" >&2
  exit 1
fi
id boxrun-test >/dev/null 2>&1 || { echo "rootless-test: no user boxrun-test: run scripts/setup.sh" >&2; exit 1; }
work=$(mktemp -d /tmp/boxrun-rootless-XXXXXX)
trap 'rm -rf "$work"' EXIT
go test -c -o "$work/integration.test" ./integration/
go run -tags= ./exec/internal/buildagent -o "$work/agent" # as the engine builds it
chown -R boxrun-test "$work"
tests='^(TestImageOwnership|TestImageLayersAsTheImageSays|TestCreateFromRegistry|TestExecOutputAndExitCodes|TestStreamOrder|TestCopyLargeFileBothWays|TestCopyDirectoryTree|TestStopStartKeepsDisk|TestVolumesReadWriteAndReadOnly|TestNetworkOffHasOnlyLoopback|TestPublishedPort|TestWarmStartTwoBoxesFromOneTemplate)$'
echo "rootless-test: running as boxrun-test: $tests" >&2
su boxrun-test -s /bin/bash -c "cd '$work' && exec env -i HOME=/home/boxrun-test PATH=/usr/local/bin:/usr/bin:/bin TMPDIR='$work' \
  BOXRUN_AGENT='$work/agent' ./integration.test -test.run '$tests' -test.count=1 -test.v -test.timeout=30m"
