# Sourced by the scripts: the build tags containers/image and
# containers/storage need without cgo libraries for gpgme, btrfs and
# devicemapper.
export GOFLAGS="${GOFLAGS:-} -tags=containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper"
command -v go >/dev/null 2>&1 || export PATH=$PATH:/usr/local/go/bin
