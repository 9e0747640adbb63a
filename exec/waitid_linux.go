package exec

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The runtime's own calls for a system call known to block: entersyscallblock
// gives this thread's P to another thread at once, where entersyscall (what
// syscall.Syscall does) keeps it until sysmon takes it away, a tick later.
// They are exported to packages that block in system calls (gVisor's), and
// the runtime keeps them so (see their comments in runtime/proc.go).
//
//go:linkname entersyscallblock runtime.entersyscallblock
func entersyscallblock()

//go:linkname exitsyscall runtime.exitsyscall
func exitsyscall()

// waitAnyChild is waitid(P_ALL, 0, info, WEXITED|WNOWAIT|flags). Without
// WNOHANG it blocks as an ordinary system call: keeping the thread's P
// until sysmon takes it, a tick (5 ms in the agent: sysmonMinDelayUS)
// later. With WNOHANG it does not block, and is made raw (no hand-over of
// the P to arrange at all).
func waitAnyChild(info *unix.Siginfo, flags int) syscall.Errno {
	if flags&unix.WNOHANG != 0 {
		_, _, e := syscall.RawSyscall6(unix.SYS_WAITID, unix.P_ALL, 0, uintptr(unsafe.Pointer(info)), uintptr(unix.WEXITED|unix.WNOWAIT|flags), 0, 0)
		return e
	}
	_, _, e := syscall.Syscall6(unix.SYS_WAITID, unix.P_ALL, 0, uintptr(unsafe.Pointer(info)), uintptr(unix.WEXITED|unix.WNOWAIT|flags), 0, 0)
	return e
}

// waitChildBlocking is waitid(P_ALL, 0, info, WEXITED|WNOWAIT): it blocks
// until a child exits, and gives up the thread's P first. Kept in the
// call, with the agent's sysmon at 5 ms ticks, the P would leave every
// other goroutine (the exec whose child was just reaped, its output, the
// host's next request) waiting up to two ticks, each time the call is
// entered while a child lives on, such as a box's background process:
// an `exec true` took 1.6 times as long in such a box. info may be on
// the goroutine's stack: a stack is not moved while its goroutine is in a
// system call (never shrunk then, and nothing here can grow it).
//
//go:nosplit
func waitChildBlocking(info *unix.Siginfo) syscall.Errno {
	entersyscallblock()
	_, _, e := syscall.RawSyscall6(unix.SYS_WAITID, unix.P_ALL, 0, uintptr(unsafe.Pointer(info)), unix.WEXITED|unix.WNOWAIT, 0, 0)
	exitsyscall()
	return e
}
