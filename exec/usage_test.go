package exec

import (
	"os"
	"path/filepath"
	"testing"
)

func TestReadUsage(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "stat"), []byte("cpu  100 5 50 9000 3 2 1 0 0 0\ncpu0 100 5 50 9000 3 2 1 0 0 0\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "meminfo"), []byte("MemTotal:         262144 kB\nMemFree:          100000 kB\nMemAvailable:     131072 kB\n"), 0o644)
	for _, p := range []string{"1", "42", "self"} {
		os.Mkdir(filepath.Join(dir, p), 0o755)
	}
	u, err := readUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := Usage{UserUsec: 1050000, SystemUsec: 530000, CPUUsec: 1580000, MemTotal: 256 << 20, MemUsed: 128 << 20, Processes: 2}
	if *u != want {
		t.Fatalf("usage = %+v, want %+v", *u, want)
	}
	if _, err := readUsage(t.TempDir()); err == nil {
		t.Fatal("no error for an empty proc dir")
	}
}
