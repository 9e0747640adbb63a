package exec

import (
	"context"
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

func TestAgentPath(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the agent")
	}
	if _, err := findGo(); err != nil {
		t.Skip(err)
	}
	cache := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Concurrent builders, in one process and (via the file lock) as if in
	// several: bypass the singleflight by calling buildAgent directly.
	var wg sync.WaitGroup
	paths := make([]string, 4)
	errs := make([]error, 4)
	start := time.Now()
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i < 2 {
				paths[i], errs[i] = AgentPath(ctx, cache)
			} else {
				paths[i], errs[i] = buildAgent(ctx, cache)
			}
		}()
	}
	wg.Wait()
	t.Logf("built in %v", time.Since(start))
	for i := range paths {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if paths[i] != paths[0] {
			t.Errorf("different binaries: %q vs %q", paths[i], paths[0])
		}
	}
	p := paths[0]
	if !strings.HasPrefix(filepath.Base(p), "agent-") || filepath.Dir(p) != cache {
		t.Errorf("unexpected path %q", p)
	}
	ents, _ := os.ReadDir(cache)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".agent-build-") {
			t.Errorf("leftover build dir %s", e.Name())
		}
	}
	f, err := elf.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP || prog.Type == elf.PT_DYNAMIC {
			t.Errorf("agent is not static: has %v", prog.Type)
		}
	}
	if f.Section(".symtab") != nil {
		t.Error("agent is not stripped")
	}
	fi, _ := os.Stat(p)
	t.Logf("agent: %s, %d KiB", p, fi.Size()>>10)

	// Cached: the second call does not build.
	start = time.Now()
	if p2, err := buildAgent(ctx, cache); err != nil || p2 != p {
		t.Errorf("rebuild: %q %v", p2, err)
	}
	t.Logf("cached lookup in %v", time.Since(start))

	t.Setenv("BOXRUN_AGENT", p)
	if got, err := AgentPath(ctx, ""); err != nil || got != p {
		t.Errorf("BOXRUN_AGENT: %q %v", got, err)
	}
	t.Setenv("BOXRUN_AGENT", "/no/such/agent")
	if _, err := AgentPath(ctx, cache); !errdefs.Is(err, errdefs.RuntimeError) {
		t.Errorf("missing BOXRUN_AGENT: %v", err)
	}
}

func TestLookupGo(t *testing.T) {
	noPath := func(string) (string, error) { return "", os.ErrNotExist }
	_, err := lookupGo(noPath, "", "/nonexistent")
	if !errdefs.Is(err, errdefs.RuntimeError) || !strings.Contains(err.Error(), "Go toolchain") || !strings.Contains(err.Error(), "BOXRUN_AGENT") {
		t.Errorf("no toolchain: %v", err)
	}
	// A GOROOT with bin/go is found without PATH.
	root := t.TempDir()
	os.MkdirAll(root+"/bin", 0o755)
	os.WriteFile(root+"/bin/go", []byte("#!/bin/sh\n"), 0o755)
	if p, err := lookupGo(noPath, "/nonexistent", root); err != nil || p != root+"/bin/go" {
		t.Errorf("from GOROOT: %q %v", p, err)
	}
}
