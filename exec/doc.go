// Package exec is the host↔guest protocol of boxrun: the host-side [Client]
// the engine drives, the guest-side [Serve] the agent (exec/agent, PID 1 in
// the box's initramfs) runs, and the tar helpers both ends share.
//
// # Wire format
//
// Host and agent talk over one byte stream (a virtio-serial port under QEMU,
// a vsock connection under Cloud Hypervisor). The stream carries frames:
//
//	[u32 length][u32 channel][u8 type][length bytes of payload]   (big endian)
//
// Every operation (exec, stat, copy, ...) gets its own channel, opened by the
// host with a Request frame and closed by the agent's Result frame, so many
// execs, output streams and copies share the connection at once. Control
// payloads (Request, Started, Result) are JSON; Data, Stdout and Stderr
// frames carry raw bytes, at most 32 KiB per frame with its header.
//
// Data is flow controlled per channel and direction with credits, as in
// HTTP/2: a sender may have at most 256 KiB in flight that the receiver has
// not yet handed to its consumer; the receiver returns credit with Window
// frames as its consumer drains the data. So a slow reader of one process's
// output stalls only that process, and the single demultiplexing goroutine on
// each side never blocks on a consumer.
//
// An exec may run on a terminal (its request carries the terminal's size):
// the agent opens a pseudo-terminal in the box's devpts and starts the
// command as the leader of a new session with the terminal as controlling
// terminal, stdin, stdout and stderr. Terminal output travels as Stdout,
// typed input as Data (both credited as above), size changes as Resize
// frames, and the exit in the Result as for any exec. See [Terminal].
//
// The host speaks first. A fresh agent discards bytes until it sees a Sync
// frame (fixed magic plus the host's random session id), because
// virtio-serial drops what the host sent before the guest opened the port:
// the host therefore repeats Sync+Hello until the agent answers (see
// [Client.Hello]). The agent only ever writes in answer to a request. A
// Sync with a new session id tells the agent that a new host connection
// replaced the old one (a virtio-serial port does not always show the
// guest a disconnect): the old session's processes are killed.
//
// Once the agent answered, Hello sends the box's configuration (virtio-9p
// volumes to mount, the network interface's address, default route and
// DNS servers) in a single "configure" request on the established
// connection, so a slow mount is never repeated by the handshake's
// retries. Every host connection sends it again; the agent applies it
// idempotently, leaving what is already in place alone.
package exec
