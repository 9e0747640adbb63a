package exec

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
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

func TestInstallEmbedded(t *testing.T) {
	cache := t.TempDir() + "/new/cache" // created
	agent := []byte("\x7fELF pretend agent")
	sum := sha256.Sum256(agent)
	want := filepath.Join(cache, "agent-embedded-"+hex.EncodeToString(sum[:])[:16])

	// Concurrent installers (several processes, or calls that bypass the
	// singleflight) agree.
	var wg sync.WaitGroup
	paths := make([]string, 4)
	errs := make([]error, 4)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = installEmbedded(cache, agent)
		}()
	}
	wg.Wait()
	for i := range paths {
		if errs[i] != nil || paths[i] != want {
			t.Fatalf("install: %q %v, want %q", paths[i], errs[i], want)
		}
	}
	check := func() os.FileInfo {
		t.Helper()
		fi, err := os.Stat(want)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != 0o755 {
			t.Errorf("mode %v", fi.Mode())
		}
		if b, _ := os.ReadFile(want); !bytes.Equal(b, agent) {
			t.Errorf("content %q", b)
		}
		return fi
	}
	fi := check()

	// Reused when in place: the file is not written again.
	if p, err := installEmbedded(cache, agent); err != nil || p != want {
		t.Fatalf("reuse: %q %v", p, err)
	}
	if fi2 := check(); !os.SameFile(fi, fi2) {
		t.Error("rewritten although in place")
	}

	// A truncated or non-executable file is replaced.
	for _, damage := range []func(){
		func() { os.Truncate(want, 3) },
		func() { os.Chmod(want, 0o644) },
	} {
		damage()
		if p, err := installEmbedded(cache, agent); err != nil || p != want {
			t.Fatalf("repair: %q %v", p, err)
		}
		check()
	}

	// Another agent gets another file.
	if p, err := installEmbedded(cache, []byte("another agent")); err != nil || p == want || filepath.Dir(p) != cache {
		t.Errorf("another agent: %q %v", p, err)
	}
	ents, _ := os.ReadDir(cache)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("leftover temporary file %s", e.Name())
		}
	}
	if len(ents) != 2 {
		t.Errorf("cache holds %d files", len(ents))
	}

	// Unwritable cache.
	if _, err := installEmbedded("/proc/boxrun-no-such-dir", agent); !errdefs.Is(err, errdefs.RuntimeError) {
		t.Errorf("unwritable cache: %v", err)
	}
}

// AgentPath uses the embedded agent, without a Go toolchain, and
// remembers it.
func TestAgentPathEmbedded(t *testing.T) {
	saved := embeddedAgent
	defer func() { embeddedAgent = saved }()
	embeddedAgent = []byte("embedded agent for the test")
	if !EmbeddedAgent() {
		t.Fatal("EmbeddedAgent() = false")
	}
	t.Setenv("BOXRUN_AGENT", "")
	t.Setenv("PATH", "/nonexistent") // no go to build with
	t.Setenv("GOROOT", "/nonexistent")
	cache := t.TempDir()
	ctx := context.Background()
	p, err := AgentPath(ctx, cache)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(filepath.Base(p), "agent-embedded-") || filepath.Dir(p) != cache {
		t.Errorf("path %q", p)
	}
	if b, _ := os.ReadFile(p); string(b) != "embedded agent for the test" {
		t.Errorf("content %q", b)
	}
	// Remembered: not looked at again.
	os.Remove(p)
	if p2, err := AgentPath(ctx, cache); err != nil || p2 != p {
		t.Errorf("second call: %q %v", p2, err)
	}
	if _, err := AgentPath(ctx, ""); !errdefs.Is(err, errdefs.ValidationError) {
		t.Errorf("no cache dir: %v", err)
	}
	embeddedAgent = nil
	if EmbeddedAgent() {
		t.Error("EmbeddedAgent() = true without one")
	}
}

// With the boxrun_embed_agent tag (scripts/build.sh), the embedded agent is
// a static, stripped binary.
func TestEmbeddedAgentBinary(t *testing.T) {
	if !EmbeddedAgent() {
		t.Skip("built without the boxrun_embed_agent tag")
	}
	f, err := elf.NewFile(bytes.NewReader(embeddedAgent))
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
	p, err := AgentPath(context.Background(), t.TempDir())
	if err != nil || !strings.HasPrefix(filepath.Base(p), "agent-embedded-") {
		t.Errorf("AgentPath: %q %v", p, err)
	}
}
