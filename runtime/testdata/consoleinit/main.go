// Command consoleinit is the PID 1 of the runtime's console tests: it
// writes a start line, then flood=N bytes, then a numbered tick line every
// 50ms to the serial console, for ever.
package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	os.MkdirAll("/dev", 0o755)
	os.MkdirAll("/proc", 0o755)
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	unix.Mount("proc", "/proc", "proc", 0, "")
	flood := 0
	cmdline, _ := os.ReadFile("/proc/cmdline")
	for _, f := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(f, "flood="); ok {
			flood, _ = strconv.Atoi(v)
		}
	}
	con, err := os.OpenFile("/dev/ttyS0", os.O_WRONLY|unix.O_NOCTTY, 0)
	for err != nil {
		time.Sleep(10 * time.Millisecond)
		con, err = os.OpenFile("/dev/ttyS0", os.O_WRONLY|unix.O_NOCTTY, 0)
	}
	fmt.Fprintf(con, "consoleinit: start\n")
	start := time.Now()
	line := append(bytes.Repeat([]byte("x"), 1023), '\n')
	for n := 0; n < flood; n += len(line) {
		con.Write(line)
	}
	fmt.Fprintf(con, "consoleinit: flooded %d bytes in %v\n", flood, time.Since(start).Round(time.Millisecond))
	for i := 1; ; i++ {
		fmt.Fprintf(con, "tick %d\n", i)
		time.Sleep(50 * time.Millisecond)
	}
}
