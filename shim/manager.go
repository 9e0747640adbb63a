package shim

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	boxrun "github.com/boxrun/boxrun"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/protobuf"
	"github.com/containerd/containerd/runtime/v2/shim"
)

// StartShim is the shim's `start`: it makes the task's socket, starts
// the shim server (this binary again) on it, detached, and returns the
// socket's address. The containers of a CRI pod go to the shim of its
// sandbox (by the sandbox id annotation, as runc's and Kata's shims
// group them): its socket is returned when it serves already.
func (s *Service) StartShim(ctx context.Context, opts shim.StartOpts) (_ string, retErr error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return "", err
	}
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	cwd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	group := groupOf(opts.ID, readBundleSpec(cwd))
	address, err := shim.SocketAddress(ctx, opts.Address, group)
	if err != nil {
		return "", err
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return "", fmt.Errorf("create shim socket: %w", err)
		}
		if shim.CanConnect(address) {
			if group == opts.ID {
				return "", fmt.Errorf("shim socket %s: another shim serves it", address)
			}
			// The pod's shim: this container goes to it.
			if err := shim.WriteAddress("address", address); err != nil {
				return "", err
			}
			return address, nil
		}
		// A socket left by a shim that died: ours to take over.
		if err := shim.RemoveSocket(address); err != nil {
			return "", fmt.Errorf("remove stale shim socket: %w", err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return "", fmt.Errorf("create shim socket: %w", err)
		}
	}
	defer func() {
		if retErr != nil {
			socket.Close()
			shim.RemoveSocket(address)
		}
	}()
	if err := shim.WriteAddress("address", address); err != nil {
		return "", err
	}
	f, err := socket.File()
	if err != nil {
		return "", err
	}
	defer f.Close()
	args := []string{"-namespace", ns, "-id", opts.ID, "-address", opts.Address}
	if opts.Debug {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = cwd
	cmd.Env = os.Environ()
	cmd.ExtraFiles = []*os.File{f} // fd 3: the socket the server listens on
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return "", err
	}
	go cmd.Wait()
	return address, nil
}

// Cleanup is the shim's `delete`, run by containerd when a shim died or
// its start failed: it stops the task's boxes (their VMs) and removes the
// task's data dir and the shim's socket.
func (s *Service) Cleanup(ctx context.Context) (*taskAPI.DeleteResponse, error) {
	bundle := "."
	if o, ok := ctx.Value(shim.OptsKey{}).(shim.Opts); ok && o.BundlePath != "" {
		bundle = o.BundlePath
	}
	done := &taskAPI.DeleteResponse{ExitedAt: protobuf.ToTimestamp(time.Now()), ExitStatus: 128 + uint32(syscall.SIGKILL)}
	// containerd runs delete whenever it closes a task's connection, not
	// only when the shim died: a shim that still serves (a pod's, whose
	// other containers run on) keeps its socket, mounts and VM.
	if addr, err := shim.ReadAddress(filepath.Join(bundle, "address")); err == nil {
		if shim.CanConnect(addr) {
			return done, nil
		}
		if err := shim.RemoveSocket(addr); err != nil {
			fmt.Fprintf(os.Stderr, "remove the shim's socket: %v\n", err)
		}
	} else {
		fmt.Fprintf(os.Stderr, "no shim socket address in %s: %v\n", bundle, err)
	}
	// A pod's container: its root filesystem, mounted in its pod's dir.
	if sb := sandboxOf(readBundleSpec(bundle)); sb != "" {
		if err := unmountPodRootfs(filepath.Join(s.opts.Root, "tasks", s.ns, sb, "pod"), s.id, nil); err != nil {
			fmt.Fprintf(os.Stderr, "unmount the container's root filesystem: %v\n", err)
		}
	}
	dir := s.dataDir()
	unmount(filepath.Join(dir, "scratch", "rootfs")) // a shim killed in Create leaves it mounted
	// A pod's sandbox: what its containers left mounted in the pod dir
	// (never remove through a mount).
	unmountPod(filepath.Join(dir, "pod"))
	if _, err := os.Stat(filepath.Join(dir, "state")); err == nil {
		cfg := s.opts.Engine
		cfg.DataDir, cfg.SharedDir, cfg.Logger = dir, s.opts.Root, s.log
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if eng, err := boxrun.New(cctx, cfg); err != nil {
			s.log.Warn("cleanup: open the task's engine", "dir", dir, "err", err)
		} else {
			boxes, _ := eng.List(cctx)
			for _, b := range boxes {
				if err := eng.Remove(cctx, b.ID, boxrun.Force); err != nil {
					s.log.Warn("cleanup: remove box", "box", b.ID, "err", err)
				}
			}
			eng.Close()
		}
	}
	if err := removeAll(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	return done, nil
}
