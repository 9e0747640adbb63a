package exec

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	osexec "os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"

	"github.com/boxrun/boxrun/errdefs"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
)

const (
	modulePath = "github.com/boxrun/boxrun"
	agentPkg   = modulePath + "/exec/agent"
)

// agentBuildFlags strip the symbol table and DWARF (the agent travels in
// every initramfs) and drop any build tags of GOFLAGS: the agent needs
// none, and must never get boxrun_embed_agent (it would embed itself).
var agentBuildFlags = []string{"-tags=", "-trimpath", "-ldflags=-s -w"}

// embeddedAgent is the agent binary built into this program (see
// agent_embed.go, build tag boxrun_embed_agent); nil without one.
var embeddedAgent []byte

// EmbeddedAgent reports whether this program carries an agent binary, so
// that [AgentPath] needs no Go toolchain.
func EmbeddedAgent() bool { return len(embeddedAgent) > 0 }

var (
	agentBuilds singleflight.Group
	agentMu     sync.Mutex
	agentPaths  = map[string]string{} // cacheDir → binary, once built in this process
)

// AgentPath returns the agent binary to put in a box's initramfs as /init.
//
// $BOXRUN_AGENT, when set, names a prebuilt agent. Otherwise, when this
// program embeds an agent (release binaries built by scripts/build.sh with
// the boxrun_embed_agent tag; see [EmbeddedAgent]), it is written once to
// cacheDir/agent-embedded-<hash>, where the hash is the first 16 hex
// digits of its SHA-256, atomically and with mode 0755, and reused from
// there when a file of the right size is already in place: no Go
// toolchain is needed. Otherwise the agent is built from source
// (CGO_ENABLED=0 go build -trimpath -ldflags="-s -w", with the Go runtime's
// sysmon patched through -overlay: see sysmonMinDelayUS) into
// cacheDir/agent-<hash>, where the hash covers the agent's source files
// (every package of this module it imports), go.mod, go.sum, the Go
// version, the patch and the target, so a changed agent is rebuilt. Without the source
// (boxrun used as a dependency, built with -trimpath) it falls back to
// `go install github.com/boxrun/boxrun/exec/agent@<version>` of the module
// version recorded in the build info.
//
// Builds are done once: concurrent calls in one process share one build,
// processes sharing cacheDir serialise on a file lock, and the binary
// appears atomically (rename). The result (built or embedded) is
// remembered for the life of the process.
func AgentPath(ctx context.Context, cacheDir string) (string, error) {
	if p := os.Getenv("BOXRUN_AGENT"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", errdefs.Wrap(errdefs.RuntimeError, err, "BOXRUN_AGENT")
		}
		return p, nil
	}
	if cacheDir == "" {
		return "", errdefs.New(errdefs.ValidationError, "agent: no cache directory")
	}
	agentMu.Lock()
	p, ok := agentPaths[cacheDir]
	agentMu.Unlock()
	if ok {
		return p, nil
	}
	// The build outlives a cancelled caller: others may share it.
	ch := agentBuilds.DoChan(cacheDir, func() (any, error) {
		var p string
		var err error
		if EmbeddedAgent() {
			p, err = installEmbedded(cacheDir, embeddedAgent)
		} else {
			p, err = buildAgent(context.WithoutCancel(ctx), cacheDir)
		}
		if err == nil {
			agentMu.Lock()
			agentPaths[cacheDir] = p
			agentMu.Unlock()
		}
		return p, err
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return "", r.Err
		}
		return r.Val.(string), nil
	case <-ctx.Done():
		return "", ctxError(ctx.Err(), "building the agent")
	}
}

// installEmbedded writes the agent binary agent to
// cacheDir/agent-embedded-<first 16 hex digits of its SHA-256> unless a
// regular, executable file of its size is there already, and returns that
// path. The file appears atomically (a temporary file renamed into place),
// so processes sharing cacheDir need no lock: they write the same bytes.
func installEmbedded(cacheDir string, agent []byte) (string, error) {
	sum := sha256.Sum256(agent)
	target := filepath.Join(cacheDir, "agent-embedded-"+hex.EncodeToString(sum[:])[:16])
	if fi, err := os.Stat(target); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 && fi.Size() == int64(len(agent)) {
		return target, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "agent cache")
	}
	f, err := os.CreateTemp(cacheDir, ".agent-embedded-")
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "installing the embedded agent")
	}
	tmp := f.Name()
	_, err = f.Write(agent)
	if err == nil {
		err = f.Chmod(0o755)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, target)
	}
	if err != nil {
		os.Remove(tmp)
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "installing the embedded agent")
	}
	return target, nil
}

// findGo locates the go command.
func findGo() (string, error) {
	return lookupGo(osexec.LookPath, os.Getenv("GOROOT"), runtime.GOROOT())
}

func lookupGo(lookPath func(string) (string, error), goroots ...string) (string, error) {
	if p, err := lookPath("go"); err == nil {
		return p, nil
	}
	for _, root := range goroots {
		if root == "" {
			continue
		}
		p := filepath.Join(root, "bin", "go")
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errdefs.New(errdefs.RuntimeError,
		"building the boxrun agent needs a Go toolchain, and none was found in $PATH or $GOROOT: "+
			"install Go, or set BOXRUN_AGENT to a prebuilt agent (CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' %s)", agentPkg)
}

// moduleDir returns the root of this module's source tree, if this binary
// was built from one that is still there.
func moduleDir() (string, bool) {
	_, file, _, ok := runtime.Caller(0)
	if !ok || !filepath.IsAbs(file) {
		return "", false // built with -trimpath
	}
	dir := filepath.Dir(filepath.Dir(file)) // .../exec/build.go → module root
	gomod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil || !bytes.Contains(gomod, []byte("module "+modulePath+"\n")) {
		return "", false
	}
	if _, err := os.Stat(filepath.Join(dir, "exec", "agent")); err != nil {
		return "", false
	}
	return dir, true
}

// agentToolchain is the go command an agent is built with, and the
// patched runtime it is built with (see sysmonMinDelayUS).
type agentToolchain struct {
	goBin, goVersion, goroot string
	env                      []string
	patched                  []byte // runtime/proc.go; nil: the stock runtime
	patchKey                 string
}

// newAgentToolchain asks the go command run in dir (the module's, where
// its go.mod picks the toolchain that builds) for its version and GOROOT.
// goarch "" is the host's.
func newAgentToolchain(ctx context.Context, dir, goarch string) (*agentToolchain, error) {
	goBin, err := findGo()
	if err != nil {
		return nil, err
	}
	if goarch == "" {
		goarch = runtime.GOARCH
	}
	t := &agentToolchain{goBin: goBin, env: append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+goarch)}
	out, err := goOutput(ctx, goBin, dir, t.env, "env", "GOVERSION", "GOROOT", "GOMODCACHE")
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 {
		return nil, errdefs.New(errdefs.RuntimeError, "building the agent: go env GOVERSION GOROOT GOMODCACHE printed %q", out)
	}
	t.goVersion, t.goroot = strings.TrimSpace(lines[0]), strings.TrimSpace(lines[1])
	if !overlayAllowed(t.goroot, strings.TrimSpace(lines[2])) {
		t.patchKey = "sysmon: stock (toolchain in the module cache)"
		return t, nil
	}
	if t.patched, t.patchKey, err = sysmonOverlay(t.goroot); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "building the agent: reading the Go runtime")
	}
	return t, nil
}

// overlayAllowed reports whether go build -overlay may replace files of
// goroot: not when it is a toolchain the go command downloaded into the
// module cache (GOTOOLCHAIN), whose files it refuses to replace.
func overlayAllowed(goroot, modcache string) bool {
	if modcache == "" {
		return true
	}
	rel, err := filepath.Rel(modcache, goroot)
	return err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

// stock drops the runtime patch: for builds whose toolchain is not the one
// the patch was made from (go install of a module version picks its own).
func (t *agentToolchain) stock() {
	t.patched, t.patchKey = nil, "sysmon: stock"
}

// flags are the build flags, with the runtime's overlay written into dir.
func (t *agentToolchain) flags(dir string) ([]string, error) {
	flags := append([]string(nil), agentBuildFlags...)
	if t.patched == nil {
		return flags, nil
	}
	ov, err := writeOverlay(t.goroot, dir, t.patched)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "building the agent: runtime overlay")
	}
	return append(flags, ov), nil
}

// BuildAgent builds the agent from this module's source into out, as
// [AgentPath] does but without its cache, for goarch ("": the host's):
// for release builds (scripts/build.sh embeds it) and agent benchmarks.
func BuildAgent(ctx context.Context, out, goarch string) error {
	dir, ok := moduleDir()
	if !ok {
		return errdefs.New(errdefs.RuntimeError, "building the agent: the source of %s is not available", modulePath)
	}
	t, err := newAgentToolchain(ctx, dir, goarch)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "boxrun-agent-build-")
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "agent build dir")
	}
	defer os.RemoveAll(tmp)
	flags, err := t.flags(tmp)
	if err != nil {
		return err
	}
	out, err = filepath.Abs(out)
	if err != nil {
		return errdefs.Wrap(errdefs.RuntimeError, err, "building the agent")
	}
	return t.buildSource(ctx, dir, out, flags)
}

// buildSource builds the agent from the module's source in dir into out.
func (t *agentToolchain) buildSource(ctx context.Context, dir, out string, flags []string) error {
	args := append(append([]string{"build"}, flags...), "-o", out, "./exec/agent")
	_, err := goOutput(ctx, t.goBin, dir, t.env, args...)
	return err
}

func buildAgent(ctx context.Context, cacheDir string) (string, error) {
	dir, fromSource := moduleDir()
	t, err := newAgentToolchain(ctx, dir, "")
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "agent cache")
	}
	var version string
	if !fromSource {
		t.stock()
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s/%s\n%q\n%s\n", t.goVersion, "linux", runtime.GOARCH, agentBuildFlags, t.patchKey)
	h.Write(t.patched) // a GOROOT changed under the same version is another runtime
	if fromSource {
		if err := hashAgentSource(ctx, h, t.goBin, dir, t.env); err != nil {
			return "", err
		}
	} else {
		version = moduleVersion()
		if version == "" {
			return "", errdefs.New(errdefs.RuntimeError,
				"cannot build the boxrun agent: its source is not available and the build info has no version of %s; set BOXRUN_AGENT", modulePath)
		}
		fmt.Fprintf(h, "%s@%s\n", agentPkg, version)
	}
	target := filepath.Join(cacheDir, "agent-"+hex.EncodeToString(h.Sum(nil))[:20])
	if _, err := os.Stat(target); err == nil {
		return target, nil
	}

	// Other processes may build into the same cache.
	unlock, err := lockFile(filepath.Join(cacheDir, ".agent.lock"))
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "agent cache lock")
	}
	defer unlock()
	if _, err := os.Stat(target); err == nil {
		return target, nil
	}
	tmp, err := os.MkdirTemp(cacheDir, ".agent-build-")
	if err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "agent build dir")
	}
	defer os.RemoveAll(tmp)
	flags, err := t.flags(tmp)
	if err != nil {
		return "", err
	}
	out := filepath.Join(tmp, "agent")
	if fromSource {
		err = t.buildSource(ctx, dir, out, flags)
	} else {
		args := append(append([]string{"install"}, flags...), agentPkg+"@"+version)
		_, err = goOutput(ctx, t.goBin, tmp, append(t.env, "GOBIN="+tmp, "GOFLAGS="), args...)
	}
	if err != nil {
		return "", err
	}
	if err := os.Rename(out, target); err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "installing the agent")
	}
	return target, nil
}

// hashAgentSource hashes the files of every package of this module the
// agent imports (as listed by go list, so a new import is covered), with
// go.mod and go.sum for the dependencies.
func hashAgentSource(ctx context.Context, h io.Writer, goBin, dir string, env []string) error {
	list, err := goOutput(ctx, goBin, dir, env, "list", "-tags=", "-deps", // the build's tags: none
		"-f", `{{if not .Standard}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{range .EmbedFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{end}}`,
		"./exec/agent")
	if err != nil {
		return err
	}
	files := []string{filepath.Join(dir, "go.mod"), filepath.Join(dir, "go.sum")}
	for _, f := range strings.Split(list, "\n") {
		if f != "" && strings.HasPrefix(f, dir+string(filepath.Separator)) {
			files = append(files, f)
		}
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil && !(errors.Is(err, os.ErrNotExist) && strings.HasSuffix(f, "go.sum")) {
			return errdefs.Wrap(errdefs.RuntimeError, err, "hashing the agent source")
		}
		rel, _ := filepath.Rel(dir, f)
		fmt.Fprintf(h, "%s %d\n", rel, len(b))
		h.Write(b)
	}
	return nil
}

// moduleVersion is the version of this module in the running binary's
// build info ("" when unknown or a development build).
func moduleVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	mods := append([]*debug.Module{&info.Main}, info.Deps...)
	for _, m := range mods {
		if m.Path == modulePath && m.Version != "" && m.Version != "(devel)" {
			if m.Replace != nil {
				return "" // a replaced module cannot be fetched by version
			}
			return m.Version
		}
	}
	return ""
}

func goOutput(ctx context.Context, goBin, dir string, env []string, args ...string) (string, error) {
	cmd := osexec.CommandContext(ctx, goBin, args...)
	cmd.Dir = dir
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", errdefs.Wrap(errdefs.RuntimeError, err, "building the agent: go %s: %s",
			strings.Join(args, " "), strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func lockFile(p string) (func(), error) {
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	}, nil
}
