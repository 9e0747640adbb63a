//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/boxrun/boxrun/exec"
)

// Host mode runs the agent as an ordinary process on the host, for tests
// of the host side that have no VM: a fake VMM (runtime/ch/fakech) puts
// it behind its hybrid vsock socket. It is entered only when the agent is
// not PID 1 and hostModeEnv names the Unix socket to serve on;
// hostRootEnv is the box root (commands chroot into it, which needs
// root; "" is the host's root, without chroot).
//
// None of the VM's work is done: no modules, disks, mounts, clock or
// network. A configuration with volumes or a network is refused (the
// server's default). Shutdown stops the commands the agent started (not
// every process, as PID 1 does), and Halt exits: the "VM" powered off.
const (
	hostModeEnv = "BOXRUN_AGENT_HOST_SOCKET"
	hostRootEnv = "BOXRUN_AGENT_HOST_ROOT"
)

func hostMode(socket string) {
	log := slog.New(slog.NewTextHandler(prefixWriter{os.Stderr}, nil))
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "boxrun agent (host mode):", err)
		os.Exit(1)
	}
	root := os.Getenv(hostRootEnv)
	opts := exec.ServerOptions{
		Root:    root,
		Logger:  log,
		Version: agentVersion(),
		Halt: func() {
			time.Sleep(50 * time.Millisecond) // let the acknowledgement out
			l.Close()
			log.Info("halted")
			os.Exit(0)
		},
	}
	log.Info("serving (host mode)", "socket", socket, "root", root)
	for {
		conn, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Warn("accept", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		// One connection at a time, as over vsock.
		err = exec.Serve(context.Background(), conn, opts)
		log.Debug("session ended", "err", err)
	}
}
