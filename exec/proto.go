package exec

import (
	"io"
	"os"
	"time"
	"unicode/utf8"
)

// ProtocolVersion is bumped on every incompatible change of the wire format.
// Hello fails when host and agent disagree.
//
// 2: Hello carries the box configuration (volumes, network), applied with a
// "configure" request.
//
// 3: an exec may run on a terminal (request "tty"; Resize frames).
//
// 4: Hello sets the box up (hostname, entropy, then the agent's [ServerOptions.Setup]
// mounts its disks): an agent waits for it before it touches any device, so
// that a VM snapshotted there can be restored as any box (warm start).
// Network carries the interface's MAC address.
//
// 5: request "usage" ([Client.Usage]): the guest's CPU time and memory in
// use; exec's "root" (a container's root in the box, [Command.Root]) and
// request "releaseroot" ([Client.ReleaseRoot]).
const ProtocolVersion = 5

// Frame types. See the package documentation for the framing.
const (
	frameRequest byte = 1  // host→agent, JSON request; opens the channel
	frameStarted byte = 2  // agent→host, JSON {pid}: the process is running
	frameResult  byte = 3  // agent→host, JSON result; closes the channel
	frameData    byte = 4  // either way: stdin or tar bytes
	frameStdout  byte = 5  // agent→host
	frameStderr  byte = 6  // agent→host
	frameEOF     byte = 7  // either way: the sender has no more Data
	frameWindow  byte = 8  // either way: u32 credit returned for Data
	frameSignal  byte = 9  // host→agent: signal name for the process group
	frameCancel  byte = 10 // host→agent: abandon the operation
	frameSync    byte = 11 // host→agent on channel 0: resynchronise
	frameResize  byte = 12 // host→agent: u16 rows, u16 cols of an exec's terminal
	frameMax          = frameResize
)

const (
	headerSize = 9
	// maxDataFrame bounds Data/Stdout/Stderr payloads so that a whole frame
	// is 32 KiB: the guest's virtio-console driver cuts writes at 32 KiB,
	// and whole-frame writes keep a host that reconnects from receiving
	// half a frame.
	maxDataFrame = 32<<10 - headerSize
	// maxControlFrame bounds JSON payloads (a request carries argv and env).
	maxControlFrame = 1 << 20
	// maxAgentControlFrame bounds the control payloads the host accepts
	// from the (untrusted) agent: Started, Result, EOF and Window frames
	// are small, so a queued control frame can hold no more than this.
	maxAgentControlFrame = 64 << 10
	// maxJSONDepth bounds the nesting of JSON from the agent (a result is
	// two levels deep); deeper input is rejected before it is decoded.
	maxJSONDepth = 16
	// maxResultString bounds each string of a Result the host keeps (an
	// error message is stored with the exec's record); the agent cuts its
	// error messages to it too.
	maxResultString = 8 << 10
	// window is the initial (and maximal outstanding) credit per channel and
	// direction, in bytes.
	window = 256 << 10
)

// A Sync frame's payload is syncMagic and the host's session id (u64). A
// fresh agent scans its input for a Sync frame before it parses anything;
// a Sync with a new session id tells it that a new host connection
// replaced the one it was serving.
var syncMagic = []byte("boxrun-sync\x00\x01\xfe\x5a\xa5")

const syncSize = 16 + 8

func isData(t byte) bool { return t == frameData || t == frameStdout || t == frameStderr }

// jsonDepthOK reports whether the JSON text p nests objects and arrays at
// most max deep. It only counts brackets outside strings, so it is linear
// and allocation-free; whether p is valid JSON is left to the decoder.
func jsonDepthOK(p []byte, max int) bool {
	depth := 0
	inString, escaped := false, false
	for _, c := range p {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
			if depth > max {
				return false
			}
		case c == '}' || c == ']':
			depth--
		}
	}
	return true
}

// truncateString cuts s to at most n (>= 3) bytes, on a UTF-8 boundary,
// ending with "…" when it cut.
func truncateString(s string, n int) string {
	const mark = "…"
	if len(s) <= n {
		return s
	}
	cut := max(n-len(mark), 0)
	for i := 0; cut > 0 && i < utf8.UTFMax && !utf8.RuneStart(s[cut]); i++ {
		cut--
	}
	return s[:cut] + mark
}

// request is the JSON payload of a Request frame. Op selects which of the
// other fields matter.
type request struct {
	Op string `json:"op"` // hello, configure, ping, exec, stat, copyin, copyout, writefile, shutdown

	Time     int64            `json:"time,omitempty"`       // hello: host clock, Unix nanoseconds
	Hostname string           `json:"hostname,omitempty"`   // hello
	Entropy  []byte           `json:"entropy,omitempty"`    // hello: seed for the guest's RNG
	Disks    map[string]int64 `json:"disk_sizes,omitempty"` // hello: disk device -> size in bytes

	Mounts  []Mount  `json:"mounts,omitempty"`  // configure
	Network *Network `json:"network,omitempty"` // configure

	Args      []string `json:"args,omitempty"` // exec
	Env       []string `json:"env,omitempty"`
	Dir       string   `json:"dir,omitempty"` // exec: working dir; copyin: destination
	User      string   `json:"user,omitempty"`
	TimeoutMS int64    `json:"timeout_ms,omitempty"`
	Stdin     bool     `json:"stdin,omitempty"`
	TTY       *TTY     `json:"tty,omitempty"` // exec: run on a terminal of this size
	// LateStart (exec): Started may wait for the first output or the
	// Result, or longExec (Command.LateStart).
	LateStart bool `json:"late_start,omitempty"`
	// Root (exec) runs the command chrooted into this directory of the
	// box root (a pod's container's root filesystem), with /proc, /sys
	// and /dev of its own; releaseroot (Path) takes those away.
	Root string `json:"root,omitempty"`

	Path string      `json:"path,omitempty"` // stat, copyout, writefile
	Mode os.FileMode `json:"mode,omitempty"` // writefile: permission bits; 0 is 0644
}

// result is the JSON payload of a Result frame (and of Started).
type result struct {
	Error string `json:"error,omitempty"`
	Code  string `json:"code,omitempty"` // errdefs code of Error; RUNTIME_ERROR when empty

	Protocol int    `json:"protocol,omitempty"` // hello
	Version  string `json:"version,omitempty"`
	Kernel   string `json:"kernel,omitempty"`

	Pid  int         `json:"pid,omitempty"`  // started
	Exit *ExitStatus `json:"exit,omitempty"` // exec
	Stat *FileInfo   `json:"stat,omitempty"` // stat

	Usage *Usage `json:"usage,omitempty"` // usage
}

// Usage is what a box's processes use of its VM, read from the guest
// kernel: CPU time since boot (the guest's /proc/stat) and memory in use
// (MemTotal - MemAvailable of /proc/meminfo).
type Usage struct {
	CPUUsec    uint64 `json:"cpu_usec"` // user + system (+ irq, softirq, nice)
	UserUsec   uint64 `json:"user_usec"`
	SystemUsec uint64 `json:"system_usec"`
	MemTotal   uint64 `json:"mem_total"` // bytes
	MemUsed    uint64 `json:"mem_used"`  // bytes
	Processes  uint64 `json:"processes"` // the guest's processes, agent included
}

// HelloRequest is what the host tells the agent in [Client.Hello]: the
// guest clock and the box's configuration. The configuration is applied
// idempotently: a host that re-attaches to a running box sends the same
// request again, and what is already in place is left as it is.
type HelloRequest struct {
	// Time is the host clock; the guest clock is set to it (plus the time
	// Hello waited for the agent). The zero Time leaves the clock alone.
	Time time.Time
	// Hostname is the box's hostname; "" leaves it as it is.
	Hostname string
	// Entropy is mixed into the guest kernel's random pool, which is then
	// reseeded at once: a VM restored from a snapshot otherwise shares
	// its pool with every other VM restored from it. At most 512 bytes.
	Entropy []byte
	// Disks are the sizes in bytes of the box's disks, by guest device
	// (/dev/vdb): the agent mounts none before the kernel sees it at its
	// size. A VM restored from a template may learn a disk's capacity
	// after the Hello arrives (the VMM signals the change).
	Disks map[string]int64
	// Mounts are virtio-9p shares to mount inside the box, in order.
	Mounts []Mount
	// Network configures the box's network interface; nil configures none
	// (the box then has only lo, which is always up).
	Network *Network
}

// Mount is a virtio-9p share mounted inside the box.
type Mount struct {
	// Tag is the 9p mount tag given to QEMU (-device
	// virtio-9p-pci,mount_tag=TAG): 1 to 31 letters, digits, '.', '_' or
	// '-', starting with a letter (QEMU also uses it as the fsdev id).
	Tag string `json:"tag"`
	// Path is the absolute mount point inside the box, not "/". It is
	// resolved inside the box root and created, with its parents, if
	// missing.
	Path string `json:"path"`
	// ReadOnly mounts the share read-only in the guest (the host exports it
	// read-only too).
	ReadOnly bool `json:"read_only,omitempty"`
}

// Network is the configuration of the box's network interface, e.g. for
// QEMU user networking: Address "10.0.2.15/24", Gateway "10.0.2.2", DNS
// ["10.0.2.3"].
type Network struct {
	// Interface is the interface to configure; "" means the first
	// non-loopback interface (by index).
	Interface string `json:"interface,omitempty"`
	// Address is the interface's address in CIDR form; "" only brings the
	// interface up.
	Address string `json:"address,omitempty"`
	// Gateway, when set, becomes the default route (replacing any other
	// default route of its address family).
	Gateway string `json:"gateway,omitempty"`
	// DNS servers are written to the box's /etc/resolv.conf, which is
	// replaced by a regular file (an image's symlink is not followed). With
	// no servers, resolv.conf is left alone.
	DNS []string `json:"dns,omitempty"`
	// MTU, when set, is the interface's MTU.
	MTU int `json:"mtu,omitempty"`
	// MAC, when set, is the interface's hardware address
	// ("52:54:00:12:34:56"). A VM restored from a snapshot keeps the
	// snapshotted NIC's address otherwise.
	MAC string `json:"mac,omitempty"`
}

// Setup is what [ServerOptions.Setup] receives from a Hello.
type Setup struct {
	Hostname string
	Entropy  []byte
	Disks    map[string]int64 // HelloRequest.Disks
}

// HelloInfo describes the agent, as returned by [Client.Hello].
type HelloInfo struct {
	Protocol int    // wire protocol version of the agent
	Version  string // agent build version
	Kernel   string // guest kernel release (uname -r)
}

// Command is a process to run in the box.
type Command struct {
	// Args is the argv. Args[0] is looked up in the PATH of Env unless it
	// contains a slash; there is no shell unless the caller runs one.
	Args []string
	// Env is the final environment (KEY=VALUE). Without PATH a default PATH
	// is added; without HOME, the user's home directory.
	Env []string
	// Dir is the absolute working directory in the box; "" means "/".
	Dir string
	// User is "", "name", "uid", "name:group" or "uid:gid", as in an OCI
	// image config, resolved against the box's /etc/passwd and /etc/group.
	// "" is root.
	User string
	// Timeout, when positive, makes the agent SIGKILL the process group
	// (and every process of the exec's cgroup) at expiry and stop reading
	// output soon after, even from processes that left them or from
	// background processes of a command that has exited; the exit status
	// then has TimedOut set. Should the agent still not end the exec
	// (a box whose root took the agent over), the host ends it itself
	// TimeoutBackstop later.
	Timeout time.Duration
	// Stdin is streamed to the process; its EOF closes the process's stdin.
	// nil means /dev/null.
	//
	// With TTY, Stdin (if set) is typed on the terminal instead, and its
	// EOF only ends the copy: the terminal stays open. [Process.Write]
	// types too.
	Stdin io.Reader
	// Root, if set, is a directory of the box (a container's root
	// filesystem, in a box that holds a pod) that the command runs
	// chrooted into; Dir, User and Args[0] are resolved in it. The agent
	// gives it /proc, /sys and /dev on first use ([Client.ReleaseRoot]).
	Root string
	// TTY, when set, runs the command on a pseudo-terminal of that size:
	// the process leads a new session whose controlling terminal is the
	// terminal's slave end, which is its stdin, stdout and stderr. Its
	// output arrives as "stdout" events (a terminal has one output
	// stream, with the line discipline's echo and CRLF translation);
	// [Process.Write] types on it and [Process.Resize] resizes it. Signals
	// go to the process group of the process and to the terminal's
	// foreground process group. TERM is whatever Env says.
	TTY *TTY
	// LateStart lets the agent hold the Started frame, which Start waits
	// for, until the command's first output or its exit (sent with the
	// Result, in one write), or for at most longExec: for callers that
	// wait for the exit anyway. A short command then costs the agent and
	// the host one frame less: 4-10% of an `exec true` under TCG.
	// Ignored with Stdin or TTY, whose input may only flow once Start
	// returned.
	LateStart bool
}

// TTY is the size of a command's terminal, in characters. Zero fields
// take the defaults, 24 rows and 80 columns.
type TTY struct {
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
}

func (t TTY) size() (rows, cols uint16) {
	rows, cols = t.Rows, t.Cols
	if rows == 0 {
		rows = 24
	}
	if cols == 0 {
		cols = 80
	}
	return rows, cols
}

// Event is one item of a process's output stream: a chunk of stdout or
// stderr, or (last) the exit.
type Event struct {
	Stream string // "stdout" or "stderr"; "" for the exit event
	Data   []byte
	Exit   *ExitStatus // set only on the last event
}

// ExitStatus tells how a process ended.
type ExitStatus struct {
	// Code is the exit code; -1 when killed by a signal or when the agent or
	// the connection failed.
	Code     int    `json:"code"`
	Signal   string `json:"signal,omitempty"` // e.g. "SIGKILL"
	TimedOut bool   `json:"timed_out,omitempty"`
	Error    string `json:"error,omitempty"` // runtime failure, e.g. "connection to agent lost"
}

// FileInfo is the result of [Client.Stat]. Symlinks are followed (inside the
// box root).
type FileInfo struct {
	Exists bool        `json:"exists"`
	IsDir  bool        `json:"is_dir,omitempty"`
	Mode   os.FileMode `json:"mode,omitempty"`
	Size   int64       `json:"size,omitempty"`
}
