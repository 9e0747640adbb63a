//go:build boxrun_embed_agent

package exec

import _ "embed"

// embeddedAgentBinary is the static agent that scripts/build.sh builds
// into exec/embedded/agent before it builds the release binaries with the
// boxrun_embed_agent tag, so that they run without a Go toolchain.
//
//go:embed embedded/agent
var embeddedAgentBinary []byte

func init() { embeddedAgent = embeddedAgentBinary }
