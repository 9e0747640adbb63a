package testenv

// A private containerd for the containerd shim tests: its own config,
// root, state and sockets under a short dir in /tmp, driven through the
// ctr and crictl binaries (os/exec, no containerd Go client), and torn
// down, shims and containers included, when the test ends.
//
// Two containerd builds are known:
//
//   - Debian's containerd 1.6 (package containerd: /usr/bin/containerd,
//     /usr/bin/ctr, /usr/bin/containerd-shim-runc-v2), config version 2;
//   - containerd 2.4.2 built by scripts/containerd.sh into
//     $BOXRUN_TOOLS_DIR/containerd-2.4.2/bin (default
//     /var/cache/boxrun/tools), config version 3, which every 2.x reads
//     (2.4 migrates it to its version 4 in memory and logs a warning
//     saying so).
//
// crictl 1.37.0 comes from the same script ($BOXRUN_TOOLS_DIR/crictl-1.37.0/bin).
//
// CRI without CNI: a pod whose network namespace mode is NODE (host
// network) never calls CNI, in 1.6 and 2.4 alike: RunPodSandbox only
// creates a netns and runs the CNI plugins for pods that do not use the host
// network, and a missing CNI config only makes the runtime's NetworkReady
// condition false (crictl info shows it), which nothing on the runp/create/
// start/exec path checks. All the config needs is a CNI conf_dir the private
// instance may create and watch (the CRI plugin mkdirs it and its parent):
// here, dirs under the private tree instead of /etc/cni/net.d, so nothing
// on the host is touched. The sandbox ("pause") image must already be in
// the k8s.io namespace under the configured name, or CRI tries to pull it.
//
// Other settings a private instance needs (all checked on this host):
//
//   - restrict_oom_score_adj = true: CRI gives the pause container
//     oom_score_adj -998, and runc fails ("can't get final child's PID
//     from pipe: EOF"; runc's log: "failed to update
//     /proc/self/oom_score_adj: Permission denied") where root lacks
//     CAP_SYS_RESOURCE, as in the dev sandbox.
//   - runc handlers get options Root = <state>/runc (ctr run: --runc-root):
//     the runc shim's default /run/containerd/runc/<namespace> is shared by
//     every containerd on the host, so equal container ids would collide.
//   - io.containerd.internal.v1.opt path in the private root (default
//     /opt/containerd; containerd also prepends its bin dir to the shims'
//     PATH); NRI disabled (2.x would listen on /var/run/nri/nri.sock).
//   - 2.x: io.containerd.shim.v1.manager socket_dir in the private dir
//     (at most 42 characters). 1.6 has no such setting: its shims listen on
//     /run/containerd/s/<sha256(address/namespace/id)>, unique per
//     instance; stop removes those of killed shims.
//
// Still shared with the host: Debian's runc (/usr/sbin/runc), for both
// versions. (ctr's IO FIFOs default to /run/containerd/fifo: Ctr adds
// --fifo-dir for run, task start and task exec.)

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Paths of Debian's containerd package.
const (
	DebianContainerd = "/usr/bin/containerd"
	DebianCtr        = "/usr/bin/ctr"
)

// Versions that scripts/containerd.sh builds and caches.
const (
	CachedContainerdVersion = "2.4.2"
	CachedCrictlVersion     = "1.37.0"
)

// ToolsDir is where scripts/containerd.sh caches its builds:
// $BOXRUN_TOOLS_DIR, or /var/cache/boxrun/tools.
func ToolsDir() string {
	if d := os.Getenv("BOXRUN_TOOLS_DIR"); d != "" {
		return d
	}
	return "/var/cache/boxrun/tools"
}

// CachedContainerdBinDir is the bin dir of the cached containerd 2.4.2
// (containerd, ctr, containerd-shim-runc-v2).
func CachedContainerdBinDir() string {
	return filepath.Join(ToolsDir(), "containerd-"+CachedContainerdVersion, "bin")
}

// CrictlPath is the cached crictl 1.37.0.
func CrictlPath() string {
	return filepath.Join(ToolsDir(), "crictl-"+CachedCrictlVersion, "bin", "crictl")
}

const setupHint = "run scripts/containerd.sh as root"

// RequireDebianContainerd returns options for Debian's containerd 1.6,
// skipping the test when the package is not installed.
func RequireDebianContainerd(t testing.TB) ContainerdOptions {
	t.Helper()
	for _, p := range []string{DebianContainerd, DebianCtr} {
		if !isExecutable(p) {
			t.Skipf("testenv: %s missing (Debian package containerd; %s)", p, setupHint)
		}
	}
	return ContainerdOptions{Binary: DebianContainerd, Ctr: DebianCtr}
}

// RequireCachedContainerd returns options for the cached containerd 2.4.2,
// with its bin dir first on PATH so that its containerd-shim-runc-v2 is
// found before Debian's 1.6 one. It skips the test when the build is
// missing.
func RequireCachedContainerd(t testing.TB) ContainerdOptions {
	t.Helper()
	dir := CachedContainerdBinDir()
	for _, b := range []string{"containerd", "ctr"} {
		if p := filepath.Join(dir, b); !isExecutable(p) {
			t.Skipf("testenv: %s missing (containerd %s; %s)", p, CachedContainerdVersion, setupHint)
		}
	}
	return ContainerdOptions{
		Binary: filepath.Join(dir, "containerd"),
		Ctr:    filepath.Join(dir, "ctr"),
		PATH:   []string{dir},
	}
}

// RequireCrictl returns the cached crictl, skipping the test when it is
// missing.
func RequireCrictl(t testing.TB) string {
	t.Helper()
	p := CrictlPath()
	if !isExecutable(p) {
		t.Skipf("testenv: %s missing (crictl %s; %s)", p, CachedCrictlVersion, setupHint)
	}
	return p
}

// ErrNoCrictl is returned by Containerd.Crictl when the cached crictl is
// missing.
var ErrNoCrictl = errors.New("crictl " + CachedCrictlVersion + " not found (" + setupHint + ")")

// ContainerdOptions configures StartContainerd.
type ContainerdOptions struct {
	Binary string   // containerd binary; "" = Debian's /usr/bin/containerd
	Ctr    string   // ctr binary matching it; "" = /usr/bin/ctr
	PATH   []string // dirs prepended to containerd's PATH (where shim binaries are)
	CRI    bool     // enable the CRI plugin (disabled otherwise)
	// RuntimeHandlers are CRI runtime handlers, name -> runtime_type, e.g.
	// "boxrun": "io.containerd.boxrun.v2", on top of the built-in "runc".
	// A handler whose type is io.containerd.runc.v2 gets a runc root in the
	// private state dir.
	RuntimeHandlers map[string]string
	// SandboxImage is the CRI pause image ref (1.6 sandbox_image, 2.x
	// pinned_images.sandbox); "" = DefaultSandboxImage. Import it into
	// the k8s.io namespace (Import with PauseImage()) before runp.
	SandboxImage string
	Env          []string // extra KEY=VALUE env for containerd, inherited by shims
	Debug        bool     // log at debug level (shims get -debug too)
}

// DefaultSandboxImage is the CRI pause image name used when
// ContainerdOptions.SandboxImage is empty.
const DefaultSandboxImage = "docker.io/boxrun/pause:test"

// Containerd is a running private containerd.
type Containerd struct {
	Address           string // gRPC socket path (ctr --address, crictl unix://...)
	TTRPCAddress      string // ttrpc socket path
	Root, State       string // containerd's root and state dirs
	Dir               string // the private tree holding all of the above, removed at the end
	ConfigPath        string // the config file it runs with
	Config            string // its contents
	Version           string // e.g. "1.6.20~ds1" or "2.4.2", from containerd --version
	Major             int    // 1 or 2
	Binary, CtrBinary string

	opts ContainerdOptions
	cmd  *exec.Cmd
	done chan struct{}
	log  *lockedBuffer
}

// StartContainerd starts a private containerd and waits until it serves
// (and, with CRI and a cached crictl, until CRI answers). It is stopped
// when the test ends: its containers and tasks are deleted through it, then
// it is killed, and any process left from it (shims and what they started:
// found by the private address or dir in their command line or by a working
// dir inside the private dir, plus their descendants) is killed, leftover
// mounts under the private dir are detached and the dir is removed.
// A missing binary skips the test.
func StartContainerd(t testing.TB, o ContainerdOptions) *Containerd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testenv: a private containerd needs root")
	}
	if o.Binary == "" {
		o.Binary = DebianContainerd
	}
	if o.Ctr == "" {
		o.Ctr = DebianCtr
	}
	for _, p := range []string{o.Binary, o.Ctr} {
		if !isExecutable(p) {
			t.Skipf("testenv: %s missing (%s)", p, setupHint)
		}
	}
	if o.SandboxImage == "" {
		o.SandboxImage = DefaultSandboxImage
	}
	c, err := startContainerd(o)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testenv: containerd %s log (tail):\n%s", c.Version, tail(c.Log(), 64<<10))
		}
		killed, errs := c.stop()
		if len(killed) > 0 {
			t.Logf("testenv: containerd %s: killed processes it left behind: %v", c.Version, killed)
		}
		for _, err := range errs {
			t.Errorf("testenv: stopping containerd: %v", err)
		}
	})
	return c
}

func startContainerd(o ContainerdOptions) (_ *Containerd, err error) {
	version, major, err := containerdVersion(o.Binary)
	if err != nil {
		return nil, err
	}
	// Unix socket paths are limited to 108 bytes (107 usable), and
	// containerd 2.4's shim socket_dir to 42 characters: t.TempDir() paths
	// (/tmp/TestName.../001) are too long, so everything lives in a short
	// dir of its own.
	dir, err := os.MkdirTemp("/tmp", "ctrd-")
	if err != nil {
		return nil, err
	}
	c := &Containerd{
		Address:      filepath.Join(dir, "c.sock"),
		TTRPCAddress: filepath.Join(dir, "c.sock.ttrpc"),
		Root:         filepath.Join(dir, "root"),
		State:        filepath.Join(dir, "state"),
		Dir:          dir,
		ConfigPath:   filepath.Join(dir, "config.toml"),
		Version:      version,
		Major:        major,
		Binary:       o.Binary,
		CtrBinary:    o.Ctr,
		opts:         o,
		log:          &lockedBuffer{},
		done:         make(chan struct{}),
	}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	if major == 1 {
		c.Config = c.configV2()
	} else {
		c.Config = c.configV3()
	}
	if err := os.WriteFile(c.ConfigPath, []byte(c.Config), 0o600); err != nil {
		return nil, err
	}

	cmd := exec.Command(o.Binary, "--config", c.ConfigPath)
	cmd.Env = containerdEnv(o)
	cmd.Stdout, cmd.Stderr = c.log, c.log
	cmd.Dir = dir
	// containerd dies with the test binary should that be killed. (Shims
	// are daemons by design and would survive it; only a normal cleanup
	// stops them.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the OS thread that started the child exits,
		// not the process: keep this thread until containerd is gone.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		cmd.Wait()
		close(c.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("starting %s: %w", o.Binary, err)
	}
	c.cmd = cmd

	if err := c.waitReady(30 * time.Second); err != nil {
		return nil, fmt.Errorf("containerd %s: %w\nconfig:\n%s\nlog:\n%s", version, err, c.Config, tail(c.Log(), 32<<10))
	}
	return c, nil
}

// containerdVersion runs `containerd --version`, which prints e.g.
// "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
// or "containerd github.com/containerd/containerd/v2 v2.4.2 ".
func containerdVersion(bin string) (string, int, error) {
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		return "", 0, fmt.Errorf("%s --version: %v: %s", bin, err, out)
	}
	f := strings.Fields(string(out))
	if len(f) < 3 {
		return "", 0, fmt.Errorf("%s --version: unexpected output %q", bin, out)
	}
	v := strings.TrimPrefix(f[2], "v")
	major, err := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	if err != nil || major < 1 || major > 2 {
		return "", 0, fmt.Errorf("%s --version: unsupported version %q", bin, f[2])
	}
	return v, major, nil
}

func containerdEnv(o ContainerdOptions) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	if len(o.PATH) > 0 {
		path = strings.Join(o.PATH, ":") + ":" + path
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "PATH", k == "NOTIFY_SOCKET", strings.HasPrefix(k, "CONTAINERD_"):
			continue
		}
		env = append(env, kv)
	}
	return append(append(env, "PATH="+path), o.Env...)
}

// Plugins a private instance does without: snapshotters that need host
// setup or cgo, and tracing, which would try to export spans.
var disabledPlugins = []string{
	"io.containerd.snapshotter.v1.aufs",
	"io.containerd.snapshotter.v1.btrfs",
	"io.containerd.snapshotter.v1.devmapper",
	"io.containerd.snapshotter.v1.zfs",
	"io.containerd.snapshotter.v1.blockfile", // 2.x
	"io.containerd.snapshotter.v1.erofs",     // 2.1+
	"io.containerd.differ.v1.erofs",          // 2.1+
	"io.containerd.tracing.processor.v1.otlp",
	"io.containerd.internal.v1.tracing",
	"io.containerd.nri.v1.nri", // 1.7+/2.x: would listen on /var/run/nri/nri.sock
}

// criPlugins are the CRI plugins disabled when CRI is off.
var criPlugins = map[int][]string{
	1: {"io.containerd.grpc.v1.cri"},
	// The pod sandbox controller needs the CRI runtime plugin; the shim
	// sandbox controller does not, and stays.
	2: {"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
		"io.containerd.podsandbox.controller.v1.podsandbox"},
}

func (c *Containerd) disabled() []string {
	d := append([]string(nil), disabledPlugins...)
	if !c.opts.CRI {
		d = append(d, criPlugins[c.Major]...)
	}
	return d
}

func (c *Containerd) required() []string {
	r := []string{"io.containerd.snapshotter.v1.overlayfs"}
	if c.opts.CRI {
		r = append(r, "io.containerd.grpc.v1.cri")
	}
	return r
}

func (c *Containerd) logLevel() string {
	if c.opts.Debug {
		return "debug"
	}
	return "info"
}

// handlers returns the CRI runtime handlers sorted by name, "runc" first
// unless given.
func (c *Containerd) handlers() [][2]string {
	h := map[string]string{"runc": "io.containerd.runc.v2"}
	for k, v := range c.opts.RuntimeHandlers {
		h[k] = v
	}
	var out [][2]string
	for k, v := range h {
		out = append(out, [2]string{k, v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out
}

// runtimesTOML writes the CRI runtime tables under prefix (the runtime
// plugin's "containerd" table). runc handlers get their own runc root: the
// runc shim's default, /run/containerd/runc/<ns>, is shared by every
// containerd on the host.
func (c *Containerd) runtimesTOML(b *strings.Builder, prefix string) {
	for _, h := range c.handlers() {
		fmt.Fprintf(b, "[%s.runtimes.%s]\n  runtime_type = %q\n", prefix, strconv.Quote(h[0]), h[1])
		if h[1] == "io.containerd.runc.v2" {
			fmt.Fprintf(b, "[%s.runtimes.%s.options]\n  Root = %q\n", prefix, strconv.Quote(h[0]), filepath.Join(c.State, "runc"))
		}
	}
}

func tomlList(l []string) string {
	q := make([]string, len(l))
	for i, s := range l {
		q[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

// configHead is the part of the config that versions 2 and 3 share: the
// private root, state and sockets, the plugins off and required.
func (c *Containerd) configHead(b *strings.Builder, version int) {
	fmt.Fprintf(b, `version = %d
root = %q
state = %q
disabled_plugins = %s
required_plugins = %s

[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  level = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, version, c.Root, c.State, tomlList(c.disabled()), tomlList(c.required()),
		c.Address, c.TTRPCAddress, c.logLevel(), filepath.Join(c.Root, "opt"))
}

// configV2 is the config for containerd 1.x (version 2).
func (c *Containerd) configV2() string {
	var b strings.Builder
	c.configHead(&b, 2)
	if c.opts.CRI {
		// CRI in 1.6: one plugin, io.containerd.grpc.v1.cri. Streaming
		// (crictl exec without -s) on 127.0.0.1 and a free port.
		fmt.Fprintf(&b, `
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = %q
  conf_dir = %q
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
`, c.opts.SandboxImage, filepath.Join(c.Dir, "cni", "bin"), filepath.Join(c.Dir, "cni", "net.d"))
		c.runtimesTOML(&b, `plugins."io.containerd.grpc.v1.cri".containerd`)
	}
	return b.String()
}

// configV3 is the config for containerd 2.x (version 3).
func (c *Containerd) configV3() string {
	var b strings.Builder
	c.configHead(&b, 3)
	fmt.Fprintf(&b, `# Shim sockets in the private dir, not /run/containerd/s (2.4: at most 42
# characters).
[plugins."io.containerd.shim.v1.manager"]
  socket_dir = %q
`, filepath.Join(c.Dir, "s"))
	if c.opts.CRI {
		// CRI in 2.x: images (snapshotter, pinned sandbox image), runtime
		// (handlers, CNI) and the gRPC service (streaming server) are
		// separate plugins.
		fmt.Fprintf(&b, `
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = %q

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  cdi_spec_dirs = []
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = [%q]
  conf_dir = %q
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
`, c.opts.SandboxImage, filepath.Join(c.Dir, "cni", "bin"), filepath.Join(c.Dir, "cni", "net.d"))
		c.runtimesTOML(&b, `plugins."io.containerd.cri.v1.runtime".containerd`)
		fmt.Fprintf(&b, `
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`)
	}
	return b.String()
}

func (c *Containerd) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *Containerd) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if c.exited() {
			return fmt.Errorf("exited: %v", c.cmd.ProcessState)
		}
		if _, err := os.Stat(c.Address); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, stderr, code, err := c.Ctr(ctx, nil, "version")
			cancel()
			if err == nil && code == 0 {
				break
			}
			last = fmt.Sprintf("ctr version: exit %d %v %s", code, err, stderr)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %s", timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !c.opts.CRI || !isExecutable(CrictlPath()) {
		return nil
	}
	// The CRI service initialises after containerd serves; until then its
	// calls fail with "server is not initialized yet".
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, stderr, err := c.Crictl(ctx, "info")
		cancel()
		if err == nil {
			return nil
		}
		last = fmt.Sprintf("crictl info: %v %s", err, stderr)
		if c.exited() {
			return fmt.Errorf("exited: %v", c.cmd.ProcessState)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("CRI not ready after %v: %s", timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Log returns containerd's output so far (with 1.6, shims' stderr too).
func (c *Containerd) Log() string { return c.log.String() }

// Ctr runs `ctr --address ADDR [-n default] ARGS...`: the namespace is
// "default" unless ARGS start with -n/--namespace. `run`, `task start` and
// `task exec` get --fifo-dir DIR/fifo (unless ARGS hold --fifo-dir or
// --log-uri), so that their IO FIFOs stay in the private dir instead of
// /run/containerd/fifo. exitCode is ctr's exit status; err is set only
// when ctr could not be run or ctx ended.
func (c *Containerd) Ctr(ctx context.Context, stdin io.Reader, args ...string) (stdout, stderr string, exitCode int, err error) {
	full := []string{"--address", c.Address}
	if len(args) == 0 || !isNamespaceFlag(args[0]) {
		full = append(full, "--namespace", "default")
	}
	cmd := exec.CommandContext(ctx, c.CtrBinary, append(full, c.withFIFODir(args)...)...)
	cmd.Stdin = stdin
	cmd.Env = cleanEnv()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ctx.Err() == nil {
		return o.String(), e.String(), ee.ExitCode(), nil
	}
	if err != nil {
		return o.String(), e.String(), -1, err
	}
	return o.String(), e.String(), 0, nil
}

// withFIFODir inserts --fifo-dir after the subcommand of `run`, `task
// start` and `task exec`.
func (c *Containerd) withFIFODir(args []string) []string {
	for _, a := range args {
		if strings.HasPrefix(a, "--fifo-dir") || strings.HasPrefix(a, "--log-uri") {
			return args
		}
	}
	i := 0
	if len(args) > 0 && isNamespaceFlag(args[0]) {
		i = 1
		if !strings.Contains(args[0], "=") {
			i = 2
		}
	}
	at := -1
	switch {
	case i < len(args) && args[i] == "run":
		at = i + 1
	case i+1 < len(args) && (args[i] == "task" || args[i] == "tasks" || args[i] == "t") &&
		(args[i+1] == "start" || args[i+1] == "exec"):
		at = i + 2
	}
	if at < 0 {
		return args
	}
	out := append([]string(nil), args[:at]...)
	out = append(out, "--fifo-dir", filepath.Join(c.Dir, "fifo"))
	return append(out, args[at:]...)
}

func isNamespaceFlag(a string) bool {
	for _, f := range []string{"-n", "--namespace", "-namespace"} {
		if a == f || strings.HasPrefix(a, f+"=") {
			return true
		}
	}
	return false
}

// MustCtr is Ctr for steps that must succeed: it fails the test, with
// ctr's output and the containerd log, on a non-zero exit.
func (c *Containerd) MustCtr(t testing.TB, ctx context.Context, args ...string) string {
	t.Helper()
	out, errOut, code, err := c.Ctr(ctx, nil, args...)
	if err != nil || code != 0 {
		t.Fatalf("ctr %s: exit %d %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, err, out, errOut)
	}
	return out
}

// Crictl runs the cached crictl against this containerd (runtime and image
// endpoint unix://ADDRESS, an empty crictl config, 30 s RPC timeout).
// err is ErrNoCrictl when crictl is missing, an *exec.ExitError on a
// non-zero exit.
func (c *Containerd) Crictl(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	bin := CrictlPath()
	if !isExecutable(bin) {
		return "", "", ErrNoCrictl
	}
	cfg := filepath.Join(c.Dir, "crictl.yaml")
	if _, err := os.Stat(cfg); err != nil {
		// crictl otherwise reads /etc/crictl.yaml.
		if err := os.WriteFile(cfg, []byte("{}\n"), 0o600); err != nil {
			return "", "", err
		}
	}
	ep := "unix://" + c.Address
	full := append([]string{"--config", cfg, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "30s"}, args...)
	cmd := exec.CommandContext(ctx, bin, full...)
	cmd.Env = cleanEnv()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	return o.String(), e.String(), err
}

// MustCrictl is Crictl for steps that must succeed; it skips the test when
// crictl is missing.
func (c *Containerd) MustCrictl(t testing.TB, ctx context.Context, args ...string) string {
	t.Helper()
	out, errOut, err := c.Crictl(ctx, args...)
	if errors.Is(err, ErrNoCrictl) {
		t.Skipf("testenv: %v", err)
	}
	if err != nil {
		t.Fatalf("crictl %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CONTAINERD_") && !strings.HasPrefix(kv, "CONTAINER_RUNTIME_ENDPOINT=") &&
			!strings.HasPrefix(kv, "IMAGE_SERVICE_ENDPOINT=") && !strings.HasPrefix(kv, "CRI_CONFIG_FILE=") {
			env = append(env, kv)
		}
	}
	return env
}

// PauseImage is a LayoutOption making the busybox image a CRI sandbox
// ("pause") image: its command, a shell as the pod's PID 1, sleeps until
// SIGTERM or SIGINT (trapped, so PID 1 of a PID namespace does act on them)
// or SIGKILL.
func PauseImage() LayoutOption {
	return WithCmd("/bin/sh", "-c", "trap 'exit 0' TERM INT; sleep 2147483647 & wait")
}

// Import builds the busybox test image (BusyboxLayout with layoutOpts),
// turns it into a docker-archive tar named name (a docker reference such
// as "docker.io/library/busybox:latest"; short names are normalised the
// docker way) and imports it with `ctr -n NAMESPACE image import`, which
// also unpacks it into the overlayfs snapshotter, so that `ctr run` and,
// in namespace "k8s.io", CRI can use it. It returns the image name as ctr
// lists it.
func (c *Containerd) Import(t testing.TB, namespace, name string, layoutOpts ...LayoutOption) string {
	t.Helper()
	layout := BusyboxLayout(t, layoutOpts...)
	archive := filepath.Join(t.TempDir(), "image.tar")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := CopyImage(ctx, "oci:"+layout, "docker-archive:"+archive+":"+name); err != nil {
		t.Fatalf("testenv: docker-archive of %s: %v", name, err)
	}
	return c.ImportArchive(t, namespace, archive, name)
}

// ImportArchive imports a docker-archive or OCI-archive tar with `ctr -n
// NAMESPACE image import` and checks that `ctr image ls` then lists name
// (or its docker-normalised form), which it returns.
func (c *Containerd) ImportArchive(t testing.TB, namespace, archive, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer f.Close()
	// The archive goes in on stdin ("-"): with containerd 2.x's transfer
	// service, ctr streams it to containerd either way.
	out, errOut, code, err := c.Ctr(ctx, f, "-n", namespace, "image", "import", "-")
	if err != nil || code != 0 {
		t.Fatalf("testenv: ctr image import %s: exit %d %v\n%s%s\nlog:\n%s", name, code, err, out, errOut, tail(c.Log(), 16<<10))
	}
	list := c.MustCtr(t, ctx, "-n", namespace, "image", "ls", "-q")
	for _, want := range []string{name, normalizeDockerRef(name)} {
		for _, l := range strings.Fields(list) {
			if l == want {
				return want
			}
		}
	}
	t.Fatalf("testenv: after importing %s into namespace %s, ctr image ls lists:\n%s\n(import said: %s%s)", name, namespace, list, out, errOut)
	return ""
}

// normalizeDockerRef is the docker normalisation of a reference:
// "busybox" -> "docker.io/library/busybox:latest".
func normalizeDockerRef(ref string) string {
	name, tag := ref, ""
	if i := strings.LastIndex(ref, "@"); i >= 0 {
		name, tag = ref[:i], ref[i:]
	} else if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		name, tag = ref[:i], ref[i:]
	}
	if tag == "" {
		tag = ":latest"
	}
	first, _, hasSlash := strings.Cut(name, "/")
	if !hasSlash || (!strings.ContainsAny(first, ".:") && first != "localhost") {
		if !hasSlash {
			name = "library/" + name
		}
		name = "docker.io/" + name
	}
	return name + tag
}

// stop deletes what is left through containerd, stops it, kills whatever
// it left behind, detaches leftover mounts and removes the private dir.
func (c *Containerd) stop() (killed []string, errs []error) {
	if c.cmd != nil && !c.exited() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		c.cleanupThroughContainerd(ctx)
		cancel()
		c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
	}
	killed, left := c.killLeftovers()
	if len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes left by containerd survived SIGKILL: %v", left))
	}
	c.removeShimSockets()
	for _, mp := range mountsUnder(c.Dir) {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	if err := os.RemoveAll(c.Dir); err != nil {
		errs = append(errs, err)
	}
	return killed, errs
}

// removeShimSockets removes the sockets of killed shims outside the
// private dir: containerd 1.6 has no socket_dir setting, and its shims
// listen on /run/containerd/s/<sha256 of address, namespace and id>, as
// each bundle's "address" file says. A shim that exits normally removes
// its socket itself.
func (c *Containerd) removeShimSockets() {
	files, _ := filepath.Glob(filepath.Join(c.State, "io.containerd.runtime.v2.task", "*", "*", "address"))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		path := strings.TrimPrefix(strings.TrimSpace(string(data)), "unix://")
		if strings.HasPrefix(path, "/run/containerd/s/") {
			os.Remove(path)
		}
	}
}

// cleanupThroughContainerd deletes CRI pods, then every task and container
// of every namespace, so that shims clean up after themselves (unmounts,
// runc state, VMs). Errors are ignored: what is left is killed afterwards.
func (c *Containerd) cleanupThroughContainerd(ctx context.Context) {
	if c.opts.CRI {
		c.Crictl(ctx, "rmp", "--all", "--force")
	}
	nsOut, _, _, _ := c.Ctr(ctx, nil, "namespace", "ls", "-q")
	for _, ns := range strings.Fields(nsOut) {
		tasks, _, _, _ := c.Ctr(ctx, nil, "-n", ns, "task", "ls", "-q")
		for _, id := range strings.Fields(tasks) {
			c.Ctr(ctx, nil, "-n", ns, "task", "delete", "--force", id)
		}
		ctrs, _, _, _ := c.Ctr(ctx, nil, "-n", ns, "container", "ls", "-q")
		if ids := strings.Fields(ctrs); len(ids) > 0 {
			c.Ctr(ctx, nil, append([]string{"-n", ns, "container", "delete"}, ids...)...)
		}
	}
}

// killLeftovers SIGKILLs every process that belongs to this instance:
// shims (their command line holds the private address, e.g. "-address
// /tmp/ctrd-.../c.sock"; a shim daemon's working dir is its bundle in the
// private state dir), `containerd publish` helpers, and all their
// descendants (containers, VMs). It returns those it killed and those
// still alive after 10 s.
func (c *Containerd) killLeftovers() (killed, left []string) {
	deadline := time.Now().Add(10 * time.Second)
	seen := map[int]bool{}
	for {
		procs := listProcs()
		victims := c.Processes(procs)
		for pid := range victims {
			if !seen[pid] {
				seen[pid] = true
				killed = append(killed, fmt.Sprintf("%d %q", pid, strings.TrimSpace(procs[pid].Cmdline)))
			}
		}
		if len(victims) == 0 {
			return killed, nil
		}
		if time.Now().After(deadline) {
			for pid := range victims {
				left = append(left, fmt.Sprintf("%d %q", pid, procs[pid].Cmdline))
			}
			sort.Strings(left)
			return killed, left
		}
		for pid := range victims {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Processes returns the live processes that belong to this instance (the
// containerd process aside): those whose command line names the private
// dir or whose working dir is inside it (shims: "-address DIR/c.sock",
// cwd = their bundle), and all their descendants (containers, VMs). procs
// is a listing from ListProcesses, or nil for a fresh one.
func (c *Containerd) Processes(procs map[int]ProcessInfo) map[int]bool {
	if procs == nil {
		procs = listProcs()
	}
	self := os.Getpid()
	var daemon int
	if c.cmd != nil && c.cmd.Process != nil && !c.exited() {
		daemon = c.cmd.Process.Pid
	}
	out := map[int]bool{}
	for pid, p := range procs {
		if pid == self || pid == daemon || p.Zombie {
			continue
		}
		if strings.Contains(p.Cmdline, c.Dir+"/") || strings.HasPrefix(p.Cwd+"/", c.Dir+"/") {
			out[pid] = true
		}
	}
	// Add descendants until nothing changes.
	for changed := true; changed; {
		changed = false
		for pid, p := range procs {
			if !out[pid] && out[p.PPid] && !p.Zombie && pid != self {
				out[pid], changed = true, true
			}
		}
	}
	return out
}

// ProcessInfo is one process of ListProcesses.
type ProcessInfo struct {
	PPid    int
	Zombie  bool   // a zombie or dead process, waiting to be reaped
	Cmdline string // arguments separated by spaces
	Cwd     string // working dir, as seen from the process's root
}

// ListProcesses lists the host's processes from /proc.
func ListProcesses() map[int]ProcessInfo { return listProcs() }

func listProcs() map[int]ProcessInfo {
	ents, _ := os.ReadDir("/proc")
	procs := map[int]ProcessInfo{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parens.
		s := string(stat)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		cwd, _ := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
		procs[pid] = ProcessInfo{
			PPid:    ppid,
			Zombie:  f[0] == "Z" || f[0] == "X",
			Cmdline: strings.ReplaceAll(string(cmdline), "\x00", " "),
			Cwd:     cwd,
		}
	}
	return procs
}

// mountsUnder lists the mount points under dir, deepest first.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	return mps
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "...\n" + s[len(s)-n:]
}
