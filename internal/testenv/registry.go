package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containers/image/v5/copy"
	"github.com/containers/image/v5/docker"
	dockerarchive "github.com/containers/image/v5/docker/archive"
	ociarchive "github.com/containers/image/v5/oci/archive"
	"github.com/containers/image/v5/oci/layout"
	"github.com/containers/image/v5/signature"
	"github.com/containers/image/v5/types"
)

// RegistryBinary is the Debian docker-registry (distribution v2) binary.
const RegistryBinary = "/usr/bin/docker-registry"

// Registry is a real docker-registry process serving plain HTTP on
// 127.0.0.1, with its storage in a temp dir.
type Registry struct {
	Addr string // "127.0.0.1:PORT"

	dir  string // config and storage, removed by Close
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been waited for
	log  *lockedBuffer
	stop sync.Once
}

// StartRegistry starts a docker-registry on a free port, waits until it
// answers GET /v2/, and stops it and removes its storage when the test
// ends, pass or fail.
func StartRegistry(t testing.TB) *Registry {
	t.Helper()
	r, err := NewRegistry()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("testenv: %v", err)
		}
	})
	return r
}

// NewRegistry is StartRegistry for TestMain, which has no testing.TB: the
// caller must Close the registry.
func NewRegistry() (*Registry, error) {
	if _, err := os.Stat(RegistryBinary); err != nil {
		return nil, fmt.Errorf("%s not found (%w): run scripts/setup.sh to install docker-registry", RegistryBinary, err)
	}
	dir, err := os.MkdirTemp("", "boxrun-registry-")
	if err != nil {
		return nil, err
	}
	// A free port can be taken between our probe and the registry's bind,
	// so a registry that dies on startup is retried on another port.
	for range 3 {
		var r *Registry
		if r, err = startRegistry(dir); err == nil {
			return r, nil
		}
	}
	os.RemoveAll(dir)
	return nil, fmt.Errorf("starting docker-registry: %w", err)
}

func startRegistry(dir string) (*Registry, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	storage := filepath.Join(dir, "storage")
	config := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: boxrun-testenv
`, storage, addr)), 0o644); err != nil {
		return nil, err
	}

	r := &Registry{Addr: addr, dir: dir, done: make(chan struct{}), log: &lockedBuffer{}}
	r.cmd = exec.Command(RegistryBinary, "serve", config)
	r.cmd.Stdout, r.cmd.Stderr = r.log, r.log
	// Take the registry down with the test binary even if it crashes
	// before its cleanups run.
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		_ = r.cmd.Wait()
		close(r.done)
	}()

	if err := r.waitReady(15 * time.Second); err != nil {
		r.Stop()
		return nil, fmt.Errorf("%w; registry output:\n%s", err, r.log.String())
	}
	return r, nil
}

// waitReady polls GET /v2/ until the registry answers 200.
func (r *Registry) waitReady(timeout time.Duration) error {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(timeout)
	for {
		resp, err := client.Get("http://" + r.Addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		select {
		case <-r.done:
			return fmt.Errorf("docker-registry exited: %v", r.cmd.ProcessState)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("docker-registry not ready after %v: %w", timeout, err)
		}
	}
}

// Stop kills the registry and waits for it to exit. Pulls from it fail
// afterwards, which lets a test show that a pull did not need it. Stop is
// idempotent; Close (and so the cleanup of StartRegistry) calls it.
func (r *Registry) Stop() {
	r.stop.Do(func() {
		_ = r.cmd.Process.Kill()
		<-r.done
	})
}

// Close stops the registry and removes its storage.
func (r *Registry) Close() error {
	r.Stop()
	if err := os.RemoveAll(r.dir); err != nil {
		return fmt.Errorf("remove registry storage: %w", err)
	}
	return nil
}

// Push copies the OCI layout in layoutDir (its only image) to
// docker://<Addr>/<repoTag> over plain HTTP and returns "<Addr>/<repoTag>".
func (r *Registry) Push(t testing.TB, layoutDir, repoTag string) string {
	t.Helper()
	ref, err := r.PushLayout(context.Background(), layoutDir, repoTag)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return ref
}

// PushLayout is Push for TestMain, which has no testing.TB.
func (r *Registry) PushLayout(ctx context.Context, layoutDir, repoTag string) (string, error) {
	ref := r.Addr + "/" + repoTag
	if err := CopyImage(ctx, "oci:"+layoutDir, "docker://"+ref); err != nil {
		return "", fmt.Errorf("push %s to %s: %w", layoutDir, ref, err)
	}
	return ref, nil
}

// CopyImage copies an image between two transport references (only the
// docker://, oci: and archive transports linked here), accepting unsigned
// images and talking plain HTTP to registries. Tests use it to make
// archives and push images.
func CopyImage(ctx context.Context, src, dst string) error {
	srcRef, err := parseRef(src)
	if err != nil {
		return err
	}
	dstRef, err := parseRef(dst)
	if err != nil {
		return err
	}
	policy, err := signature.NewPolicyContext(&signature.Policy{
		Default: signature.PolicyRequirements{signature.NewPRInsecureAcceptAnything()},
	})
	if err != nil {
		return err
	}
	defer policy.Destroy()
	sys := &types.SystemContext{
		DockerInsecureSkipTLSVerify: types.OptionalBoolTrue,
		// Stay independent of the host's registries.conf.
		SystemRegistriesConfPath:    os.DevNull,
		SystemRegistriesConfDirPath: os.DevNull,
	}
	_, err = copy.Image(ctx, policy, dstRef, srcRef, &copy.Options{SourceCtx: sys, DestinationCtx: sys})
	return err
}

func parseRef(s string) (types.ImageReference, error) {
	for _, tr := range []types.ImageTransport{docker.Transport, layout.Transport, ociarchive.Transport, dockerarchive.Transport} {
		if rest, ok := strings.CutPrefix(s, tr.Name()+":"); ok {
			return tr.ParseReference(rest)
		}
	}
	return nil, fmt.Errorf("%q: unsupported transport", s)
}

// freeAddr returns a 127.0.0.1 address with a port that was free just now.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// lockedBuffer collects the registry's output for error messages.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
