package exec

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// userHZ is the unit of /proc/stat's times (USER_HZ, 100 on Linux).
const userHZ = 100

// readUsage reads the guest's CPU time, memory in use and process count
// from a proc filesystem.
func readUsage(proc string) (*Usage, error) {
	var u Usage
	stat, err := os.ReadFile(filepath.Join(proc, "stat"))
	if err != nil {
		return nil, err
	}
	line, _, _ := bytes.Cut(stat, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 8 || f[0] != "cpu" {
		return nil, fmt.Errorf("usage: unexpected %s/stat", proc)
	}
	var ticks [7]uint64 // user nice system idle iowait irq softirq
	for i := range ticks {
		ticks[i], _ = strconv.ParseUint(f[i+1], 10, 64)
	}
	const usecPerTick = 1e6 / userHZ
	u.UserUsec = (ticks[0] + ticks[1]) * usecPerTick
	u.SystemUsec = (ticks[2] + ticks[5] + ticks[6]) * usecPerTick
	u.CPUUsec = u.UserUsec + u.SystemUsec
	mi, err := os.Open(filepath.Join(proc, "meminfo"))
	if err != nil {
		return nil, err
	}
	defer mi.Close()
	var total, avail uint64
	sc := bufio.NewScanner(mi)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "MemTotal":
			total = n << 10
		case "MemAvailable":
			avail = n << 10
		}
	}
	u.MemTotal = total
	if total > avail {
		u.MemUsed = total - avail
	}
	ents, _ := os.ReadDir(proc)
	for _, en := range ents {
		if _, err := strconv.Atoi(en.Name()); err == nil {
			u.Processes++
		}
	}
	return &u, nil
}
