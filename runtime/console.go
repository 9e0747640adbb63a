package runtime

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// The guest's serial console is untrusted output: root in a box can write
// to /dev/ttyS0 as fast as the VMM emulates it, for as long as it likes.
// The host keeps only its last consoleMax bytes.
//
// Mechanism: QEMU's serial port is a unix socket chardev (console.sock,
// server=on,wait=on) and a relay goroutine in the engine's process copies
// what arrives into console.log. Once console.log holds consoleFileMax
// bytes it becomes console.log.1 (replacing the previous one) and a new
// console.log starts, so the two files never hold more than consoleMax
// bytes together, and their concatenation is the console's tail.
//
// Why this and not the alternatives:
//   - -serial file: (what we had) grows without bound.
//   - A ringbuf chardev is bounded inside QEMU, but it can only be read over
//     QMP while QEMU runs (and a read consumes it), so the tail is lost
//     exactly when it matters most: QEMU died during boot.
//   - A socket bounds the host's storage whoever is (not) listening. While
//     no client is connected (the engine that ran the relay died; boxes
//     outlive it, QEMU runs in its own session), QEMU's socket chardev
//     fails writes with EIO and the emulated UART drops the byte: nothing
//     accumulates in QEMU or on disk, and the guest never blocks on it.
//     While the relay is connected, the guest's UART is paced by the
//     relay's reads, which only ever write to the capped files.
//   - wait=on makes QEMU wait for the relay's connection before it runs
//     the guest, so no early boot output is lost; Start connects it.
//   - After an engine restart, Attach connects a new relay (a server socket
//     chardev accepts the next client once the previous one went away),
//     which appends to the same capped files. What the guest wrote while no
//     engine ran is dropped, by design.
//
// Within one process there is at most one relay per VM directory: an
// Attach in the process that still relays (an Engine closed and opened
// again without the VM stopping) shares the running relay.
const (
	consoleMax     = 256 << 10
	consoleFileMax = consoleMax / 2
	consoleTailLen = 4096

	consoleSock = "console.sock"
	consoleLog  = "console.log"
	consoleOld  = "console.log.1"
)

type consoleRelay struct {
	dir  string
	conn net.Conn

	mu   sync.Mutex // guards the files: writes, rotation and reads of the tail
	f    *os.File   // console.log, opened on the first write
	size int64

	done chan struct{} // closed once the relay stopped and closed its files
}

var relays = struct {
	sync.Mutex
	m map[string]*consoleRelay
}{m: map[string]*consoleRelay{}}

// startRelay relays conn (connected to dir's console.sock) into dir's
// capped console files until the connection ends (QEMU exited).
func startRelay(dir string, conn net.Conn) *consoleRelay {
	r := &consoleRelay{dir: dir, conn: conn, done: make(chan struct{})}
	relays.Lock()
	relays.m[relayKey(dir)] = r
	relays.Unlock()
	go r.run()
	return r
}

// runningRelay returns the live relay of dir in this process, if any.
func runningRelay(dir string) *consoleRelay {
	relays.Lock()
	r := relays.m[relayKey(dir)]
	relays.Unlock()
	if r == nil {
		return nil
	}
	select {
	case <-r.done:
		return nil
	default:
		return r
	}
}

// awaitRelay waits (up to d) for the relay of dir in this process, if
// any, to stop: a new VM in dir must not share files with the old relay.
func awaitRelay(dir string, d time.Duration) {
	relays.Lock()
	r := relays.m[relayKey(dir)]
	relays.Unlock()
	if r != nil {
		r.wait(d)
	}
}

func relayKey(dir string) string {
	if abs, err := filepath.Abs(dir); err == nil {
		return abs
	}
	return filepath.Clean(dir)
}

func (r *consoleRelay) wait(d time.Duration) bool {
	select {
	case <-r.done:
		return true
	case <-time.After(d):
		return false
	}
}

func (r *consoleRelay) run() {
	defer func() {
		r.conn.Close()
		r.mu.Lock()
		if r.f != nil {
			r.f.Close()
			r.f = nil
		}
		r.mu.Unlock()
		relays.Lock()
		if k := relayKey(r.dir); relays.m[k] == r {
			delete(relays.m, k)
		}
		relays.Unlock()
		close(r.done)
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.conn.Read(buf)
		if n > 0 {
			r.write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// write appends p to console.log, rotating it whenever it is full. Errors
// (a full host disk) drop the output: the console is best effort.
func (r *consoleRelay) write(p []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(p) > 0 {
		if r.f == nil {
			f, err := os.OpenFile(filepath.Join(r.dir, consoleLog), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
			if err != nil {
				return
			}
			st, err := f.Stat()
			if err != nil {
				f.Close()
				return
			}
			r.f, r.size = f, st.Size()
		}
		if r.size >= consoleFileMax {
			r.f.Close()
			r.f = nil
			if err := os.Rename(filepath.Join(r.dir, consoleLog), filepath.Join(r.dir, consoleOld)); err != nil {
				return
			}
			continue
		}
		n := int(min(int64(len(p)), consoleFileMax-r.size))
		w, err := r.f.Write(p[:n])
		r.size += int64(w)
		if err != nil {
			return
		}
		p = p[n:]
	}
}

// tail returns up to the last n bytes of the console.
func (r *consoleRelay) tail(n int) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return consoleTail(r.dir, n)
}

// consoleTail returns up to the last n bytes of dir's console files.
func consoleTail(dir string, n int) string {
	cur := tail(filepath.Join(dir, consoleLog), int64(n))
	if len(cur) >= n {
		return cur
	}
	return tail(filepath.Join(dir, consoleOld), int64(n-len(cur))) + cur
}

// connectConsole connects to dir's console socket, waiting for QEMU to
// create it until ctx ends or exited reports that QEMU is gone.
func connectConsole(ctx context.Context, dir string, exited func() bool) (net.Conn, error) {
	path, release := dirRelative(dir, consoleSock)
	defer release()
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return conn, nil
		}
		if exited() {
			return nil, errors.New("qemu exited")
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
			return nil, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}
