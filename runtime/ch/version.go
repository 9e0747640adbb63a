package ch

import (
	"regexp"
	"strconv"
)

// MinMajor is the oldest Cloud Hypervisor release boxrun drives: v39
// (serial over a Unix socket arrived in v36, bzImage payloads in v39,
// "offload_*" network controls in v29). The newest checked is v53, whose
// API document the contract test validates against.
const MinMajor = 39

var versionRE = regexp.MustCompile(`v?(\d+)\.(\d+)`)

// ParseVersion finds the release in a version string, as /vmm.ping's
// "version" ("v53.0", "v40.0-12-gabcdef") or `cloud-hypervisor --version`
// ("cloud-hypervisor v53.0") carry it.
func ParseVersion(s string) (major, minor int, ok bool) {
	m := versionRE.FindStringSubmatch(s)
	if m == nil {
		return 0, 0, false
	}
	major, _ = strconv.Atoi(m[1])
	minor, _ = strconv.Atoi(m[2])
	return major, minor, true
}
