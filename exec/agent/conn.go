//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/boxrun/boxrun/exec"
	"golang.org/x/sys/unix"
)

// findPort waits for the virtio-serial port named name and returns its
// device (/dev/vportNpM).
func findPort(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		files, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(f))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio-serial port %q did not appear within %v (ports: %d)", name, timeout, len(files))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// port keeps the virtio-serial port open across sessions: a session ends
// when the host disconnects (reads return EOF), not when we close.
type port struct{ *os.File }

func (port) Close() error { return nil }

func (a *agent) servePort(opts exec.ServerOptions) {
	dev, err := findPort(a.cfg.port, deviceTimeout)
	if err != nil {
		a.fatal(err)
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		a.fatal(fmt.Errorf("opening %s: %w", dev, err))
	}
	a.log.Info("serving", "port", a.cfg.port, "device", dev)
	for {
		err := exec.Serve(context.Background(), port{f}, opts)
		a.log.Debug("session ended", "err", err)
		// While the host is not connected the port reads EOF at once.
		time.Sleep(100 * time.Millisecond)
	}
}

func (a *agent) serveVsock(opts exec.ServerOptions) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		a.fatal(fmt.Errorf("vsock socket: %w", err))
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: a.cfg.vsock}); err != nil {
		a.fatal(fmt.Errorf("vsock bind port %d: %w", a.cfg.vsock, err))
	}
	if err := unix.Listen(fd, 4); err != nil {
		a.fatal(fmt.Errorf("vsock listen: %w", err))
	}
	a.log.Info("serving", "vsock", a.cfg.vsock)
	for {
		nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
		if err != nil {
			if err != unix.EINTR && err != unix.ECONNABORTED {
				a.log.Warn("vsock accept", "err", err)
				time.Sleep(100 * time.Millisecond)
			}
			continue
		}
		if err := unix.SetNonblock(nfd, true); err != nil {
			unix.Close(nfd)
			continue
		}
		// One connection at a time: the next is accepted after this one ends.
		err = exec.Serve(context.Background(), os.NewFile(uintptr(nfd), "vsock"), opts)
		a.log.Debug("session ended", "err", err)
	}
}
