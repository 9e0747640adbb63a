package exec

import (
	"context"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// openPTY opens a new pseudo-terminal of the box for a command that runs
// as uid: the master (non-blocking, for the poller) and the slave (to hand
// to the child), sized rows×cols.
//
// The master is the box's /dev/ptmx, resolved inside the box root: in a VM
// that is the box's own devpts instance (mounted at /dev/pts with
// newinstance, /dev/ptmx bound to its ptmx), so the slave is a /dev/pts/N
// that processes chrooted into the box can find by name (tty, ttyname).
// The slave is opened through the master (TIOCGPTPEER), never by path, so
// nothing in the box can substitute another file for it.
func (sv *server) openPTY(rows, cols uint16, uid int) (master, slave *os.File, err error) {
	mfd, err := sv.root.OpenFile("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	defer func() {
		if err != nil {
			unix.Close(mfd)
		}
	}()
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil { // unlockpt
		return nil, nil, fmt.Errorf("unlock pty: %w", err)
	}
	sfd, err := ptyPeer(mfd)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			unix.Close(sfd)
		}
	}()
	if err := unix.IoctlSetWinsize(mfd, unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		return nil, nil, fmt.Errorf("set terminal size: %w", err)
	}
	// The kernel's defaults (canonical mode, echo, signals, CRLF output)
	// plus IUTF8, so that erasing a multi-byte character erases all of it.
	if t, err := unix.IoctlGetTermios(sfd, unix.TCGETS); err == nil {
		t.Iflag |= unix.IUTF8
		_ = unix.IoctlSetTermios(sfd, unix.TCSETS, t)
	}
	// The user owns its terminal, as login and sshd arrange.
	if uid != 0 {
		if err := unix.Fchown(sfd, uid, -1); err != nil {
			return nil, nil, fmt.Errorf("chown pty: %w", err)
		}
	}
	if err := unix.SetNonblock(mfd, true); err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(mfd), "ptmx"), os.NewFile(uintptr(sfd), "pts"), nil
}

// ptyPeer opens the slave of the master mfd: TIOCGPTPEER (Linux 4.13+),
// else /dev/pts/N by path, which is only correct when the devpts instance
// of the master is mounted at /dev/pts of the agent's own root (not the
// box's); kernels that old are not supported in a VM.
func ptyPeer(mfd int) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(mfd), unix.TIOCGPTPEER, uintptr(unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC))
	if errno == 0 {
		return int(fd), nil
	}
	if errno != unix.EINVAL && errno != unix.ENOTTY {
		return -1, fmt.Errorf("open pty slave: %w", errno)
	}
	n, err := unix.IoctlGetUint32(mfd, unix.TIOCGPTN)
	if err != nil {
		return -1, fmt.Errorf("pty number: %w", err)
	}
	sfd, err := unix.Open(fmt.Sprintf("/dev/pts/%d", n), unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open pty slave: %w", err)
	}
	return sfd, nil
}

// signal sends sig to the process group of the command and, on a
// terminal, to the terminal's foreground process group (a shell with job
// control runs each job in a group of its own).
func (pr *process) signal(sig syscall.Signal) {
	_ = unix.Kill(-pr.pid, sig)
	if pr.tty == nil {
		return
	}
	fg := 0
	if rc, err := pr.tty.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			fg, _ = unix.IoctlGetInt(int(fd), unix.TIOCGPGRP)
		})
	}
	if fg > 0 && fg != pr.pid {
		_ = unix.Kill(-fg, sig)
	}
}

// resize sets the terminal's size; the kernel sends SIGWINCH to its
// foreground process group.
func (pr *process) resize(rows, cols uint16) {
	rc, err := pr.tty.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	})
}

// feedTTY types the host's Data frames on the terminal until the channel
// ends. The host's EOF ends nothing: a terminal has no end of input but
// the EOF character the user types. Once writing fails (the terminal is
// closed), further input is discarded so the host never blocks on credit.
// A write blocks while the terminal's input queue is full (the command
// does not read); that holds the host's credit back, which is the flow
// control the host sees.
func feedTTY(s *stream, tty *os.File) {
	broken := false
	for {
		f, err := s.recv(context.Background())
		if err != nil {
			return
		}
		if f.typ == frameData && !broken {
			if _, err := tty.Write(f.payload); err != nil {
				broken = true
			}
		}
	}
}
