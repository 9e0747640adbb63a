// Command boxrund serves boxes over the BoxRun REST API on a Unix socket
// and TCP (see package boxrund).
package main

import (
	"os"

	"github.com/boxrun/boxrun/boxrund"
)

func main() { os.Exit(boxrund.Main(os.Args[1:], os.Stderr)) }
