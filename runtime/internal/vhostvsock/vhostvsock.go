// Package vhostvsock is a minimal vhost-user-vsock back-end, for tests: it
// lets QEMU (-device vhost-user-vsock-pci) give a guest a virtio-vsock
// device whose host side is served the way Cloud Hypervisor serves its
// "hybrid vsock" socket: a host client connects to a Unix socket, writes
// "CONNECT <port>\n", reads "OK <hostport>\n", and the connection is then
// a stream to that port in the guest.
//
// It implements the split virtqueue, no EVENT_IDX and no indirect
// descriptors; the only protocol feature is CONFIG (QEMU reads the guest
// CID through GET_CONFIG). Guest-initiated connections are refused (RST).
package vhostvsock

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HostCID is the host's vsock context ID.
const HostCID = 2

// vhost-user requests (QEMU's docs/interop/vhost-user.rst).
const (
	reqGetFeatures         = 1
	reqSetFeatures         = 2
	reqSetOwner            = 3
	reqResetOwner          = 4
	reqSetMemTable         = 5
	reqSetVringNum         = 8
	reqSetVringAddr        = 9
	reqSetVringBase        = 10
	reqGetVringBase        = 11
	reqSetVringKick        = 12
	reqSetVringCall        = 13
	reqSetVringErr         = 14
	reqGetProtocolFeatures = 15
	reqSetProtocolFeatures = 16
	reqGetQueueNum         = 17
	reqSetVringEnable      = 18
	reqGetConfig           = 24
	reqSetConfig           = 25
)

var reqNames = map[uint32]string{
	1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
	5: "SET_MEM_TABLE", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE",
	11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
	15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
	18: "SET_VRING_ENABLE", 24: "GET_CONFIG", 25: "SET_CONFIG",
}

func reqName(r uint32) string {
	if n, ok := reqNames[r]; ok {
		return n
	}
	return "request " + strconv.Itoa(int(r))
}

const (
	hdrVersion   = 0x1
	hdrReply     = 0x4
	hdrNeedReply = 0x8

	featVersion1       = uint64(1) << 32
	featProtocol       = uint64(1) << 30
	protoFeatConfig    = uint64(1) << 9
	vringNoFD          = 0x100
	vringIdxMask       = 0xff
	maxMsgPayload      = 4096
	maxMemRegions      = 8
	offeredFeatures    = featVersion1 | featProtocol
	offeredProtocolFts = protoFeatConfig
)

// virtio-vsock packets.
const (
	pktHdrLen = 44

	typeStream = 1

	opRequest       = 1
	opResponse      = 2
	opRST           = 3
	opShutdown      = 4
	opRW            = 5
	opCreditUpdate  = 6
	opCreditRequest = 7

	shutdownRcv  = 1 // the sender will receive no more
	shutdownSend = 2 // the sender will send no more

	// bufAlloc is the receive buffer the host side advertises per
	// connection; a CREDIT_UPDATE goes out once creditEvery bytes were
	// consumed since the last fwd_cnt the guest saw.
	bufAlloc    = 256 << 10
	creditEvery = bufAlloc / 4
	// maxPayload is the most a read from a host connection takes (the
	// guest's last rx chain, rxSpace, bounds it further); flushRx splits
	// what does not fit one rx chain.
	maxPayload = 4096

	// connectTimeout is shorter than the 2 s a dialHybridVsock attempt
	// waits: a client that gave up leaves no half-made connection behind.
	connectTimeout = 1500 * time.Millisecond
	closeTimeout   = 3 * time.Second
)

type pktHdr struct {
	srcCID, dstCID   uint64
	srcPort, dstPort uint32
	len              uint32
	typ, op          uint16
	flags            uint32
	bufAlloc, fwdCnt uint32
}

func (h *pktHdr) decode(b []byte) {
	le := binary.LittleEndian
	h.srcCID, h.dstCID = le.Uint64(b[0:]), le.Uint64(b[8:])
	h.srcPort, h.dstPort = le.Uint32(b[16:]), le.Uint32(b[20:])
	h.len = le.Uint32(b[24:])
	h.typ, h.op = le.Uint16(b[28:]), le.Uint16(b[30:])
	h.flags, h.bufAlloc, h.fwdCnt = le.Uint32(b[32:]), le.Uint32(b[36:]), le.Uint32(b[40:])
}

func (h *pktHdr) encode(b []byte) {
	le := binary.LittleEndian
	le.PutUint64(b[0:], h.srcCID)
	le.PutUint64(b[8:], h.dstCID)
	le.PutUint32(b[16:], h.srcPort)
	le.PutUint32(b[20:], h.dstPort)
	le.PutUint32(b[24:], h.len)
	le.PutUint16(b[28:], h.typ)
	le.PutUint16(b[30:], h.op)
	le.PutUint32(b[32:], h.flags)
	le.PutUint32(b[36:], h.bufAlloc)
	le.PutUint32(b[40:], h.fwdCnt)
}

var opNames = map[uint16]string{1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW", 6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST"}

// region is one guest RAM region of SET_MEM_TABLE, mapped.
type region struct {
	gpa, uva, size uint64
	mapping        []byte // the whole mmap, for munmap
	mem            []byte // the region: mapping[mmap_offset:][:size]
}

// vring is one split virtqueue: 0 is rx (host to guest), 1 is tx.
type vring struct {
	num                uint32
	desc, used, avail  uint64 // QEMU virtual addresses
	lastAvail, usedIdx uint16
	kick               *os.File
	call, errFD        int
	started, enabled   bool
}

type connKey struct{ local, peer uint32 }

// conn is one host-initiated stream.
type conn struct {
	key  connKey
	uc   *net.UnixConn
	ok   chan struct{} // closed once answered (RESPONSE or refusal)
	est  bool          // the guest answered RESPONSE
	gone bool          // removed from the table (RST, timeout, Close)

	// guest to host
	wbuf        []byte
	fwdCnt      uint32 // bytes written to uc
	lastFwdSent uint32
	peerSendEnd bool // the guest sent SHUTDOWN(SEND)
	halfClosed  bool // uc.CloseWrite done

	// host to guest
	txCnt        uint32
	peerBufAlloc uint32
	peerFwdCnt   uint32
	peerRcvEnd   bool // the guest sent SHUTDOWN(RCV)
	localEnd     bool // we sent SHUTDOWN
}

func (c *conn) credit() uint32 {
	used := c.txCnt - c.peerFwdCnt
	if used >= c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - used
}

// packet is one packet waiting for an rx buffer.
type packet struct {
	hdr     pktHdr
	payload []byte
	c       *conn // for buf_alloc/fwd_cnt at send time; nil for none
}

// Backend is a running back-end; see Serve.
type Backend struct {
	guestCID uint64
	logf     func(format string, args ...any)
	vl, hl   *net.UnixListener
	wg       sync.WaitGroup
	done     chan struct{}
	// closeOnce runs close; every Close waits for it (sync.Once does).
	closeOnce sync.Once

	mu       sync.Mutex
	cond     *sync.Cond
	closed   bool
	vconn    *net.UnixConn
	clients  map[*net.UnixConn]bool
	features uint64
	protocol uint64
	regions  []region
	vq       [2]vring
	conns    map[connKey]*conn
	nextPort uint32
	pending  []*packet
	rxSpace  int // payload room of the last rx chain: the size of a read
	stats    Stats
}

// Stats counts what went through the device.
type Stats struct {
	VhostMessages    int
	TxPackets        int
	RxPackets        int
	RxKicks, TxKicks int
	Calls            int
}

// Serve listens on vhostPath for QEMU's vhost-user connection (QEMU
// connects as the client: -chardev socket,path=vhostPath) and on
// hybridPath for host clients, and serves a vsock device whose guest has
// guestCID until ctx is done or Close. logf, if not nil, gets a line per
// vhost-user message and per notable event.
func Serve(ctx context.Context, vhostPath, hybridPath string, guestCID uint64, logf func(format string, args ...any)) (*Backend, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	b := &Backend{
		guestCID: guestCID, logf: logf, done: make(chan struct{}),
		clients: map[*net.UnixConn]bool{}, conns: map[connKey]*conn{}, nextPort: 1 << 20,
	}
	b.cond = sync.NewCond(&b.mu)
	for i := range b.vq {
		b.vq[i].call, b.vq[i].errFD = -1, -1
	}
	var err error
	if b.vl, err = net.ListenUnix("unix", &net.UnixAddr{Name: vhostPath, Net: "unix"}); err != nil {
		return nil, err
	}
	if b.hl, err = net.ListenUnix("unix", &net.UnixAddr{Name: hybridPath, Net: "unix"}); err != nil {
		b.vl.Close()
		return nil, err
	}
	b.wg.Add(2)
	go b.acceptVhost()
	go b.acceptHybrid()
	go func() {
		select {
		case <-ctx.Done():
			b.Close()
		case <-b.done:
		}
	}()
	return b, nil
}

// Stats returns the counters so far.
func (b *Backend) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stats
}

// Close stops the back-end: closes the listeners, QEMU's connection and
// every host connection, waits for its goroutines and unmaps the guest's
// memory.
// Every call returns only once the back-end has stopped.
func (b *Backend) Close() error {
	b.closeOnce.Do(b.close)
	return nil
}

func (b *Backend) close() {
	b.mu.Lock()
	b.closed = true
	close(b.done)
	if b.vconn != nil {
		b.vconn.Close()
	}
	for uc := range b.clients {
		uc.Close()
	}
	for i := range b.vq {
		b.stopRing(i)
	}
	b.cond.Broadcast()
	b.mu.Unlock()
	b.vl.Close()
	b.hl.Close()
	b.wg.Wait()
	b.mu.Lock()
	b.resetDevice()
	b.mu.Unlock()
}

// ---- vhost-user ----

func (b *Backend) acceptVhost() {
	defer b.wg.Done()
	// One front-end at a time: the next is accepted once it is gone.
	b.acceptEach(b.vl, func(uc *net.UnixConn) {
		b.vconn = uc
		b.mu.Unlock()
		b.logf("vhost-user: front-end connected")
		b.serveVhost(uc)
		b.mu.Lock()
		b.vconn = nil
		for i := range b.vq {
			b.stopRing(i)
		}
		b.resetDevice()
		b.mu.Unlock()
		uc.Close()
		b.logf("vhost-user: front-end gone")
	})
}

// acceptEach accepts connections on l until it is closed, and hands each
// to take with b.mu held (take unlocks it); once the back-end is closed, a
// connection is closed at once and the loop ends.
func (b *Backend) acceptEach(l *net.UnixListener, take func(uc *net.UnixConn)) {
	for {
		uc, err := l.AcceptUnix()
		if err != nil {
			return
		}
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			uc.Close()
			return
		}
		take(uc)
	}
}

// readFull reads len(buf) bytes, collecting any fds that come with them.
func readFull(uc *net.UnixConn, buf []byte, fds *[]int) error {
	oob := make([]byte, unix.CmsgSpace(maxMemRegions*4))
	for n := 0; n < len(buf); {
		m, oobn, _, _, err := uc.ReadMsgUnix(buf[n:], oob)
		if oobn > 0 {
			if msgs, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
				for _, msg := range msgs {
					if got, perr := unix.ParseUnixRights(&msg); perr == nil {
						*fds = append(*fds, got...)
					}
				}
			}
		}
		n += m
		if err != nil {
			return err
		}
		if m == 0 {
			return io.ErrUnexpectedEOF
		}
	}
	return nil
}

func (b *Backend) serveVhost(uc *net.UnixConn) {
	hdr := make([]byte, 12)
	for {
		var fds []int
		if err := readFull(uc, hdr, &fds); err != nil {
			closeFDs(fds)
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				b.logf("vhost-user: read: %v", err)
			}
			return
		}
		req := binary.LittleEndian.Uint32(hdr[0:])
		size := binary.LittleEndian.Uint32(hdr[8:])
		if size > maxMsgPayload {
			closeFDs(fds)
			b.logf("vhost-user: %s: payload of %d bytes", reqName(req), size)
			return
		}
		payload := make([]byte, size)
		if err := readFull(uc, payload, &fds); err != nil {
			closeFDs(fds)
			b.logf("vhost-user: read: %v", err)
			return
		}
		switch req {
		case reqSetMemTable, reqSetVringKick, reqSetVringCall, reqSetVringErr:
			// handle takes (or closes) the descriptors these carry.
		default:
			closeFDs(fds)
			fds = nil
		}
		b.mu.Lock()
		b.stats.VhostMessages++
		reply, ok := b.handle(req, payload, fds)
		b.mu.Unlock()
		if !ok {
			continue // no reply (REPLY_ACK is not offered)
		}
		out := make([]byte, 12+len(reply))
		binary.LittleEndian.PutUint32(out[0:], req)
		binary.LittleEndian.PutUint32(out[4:], hdrVersion|hdrReply)
		binary.LittleEndian.PutUint32(out[8:], uint32(len(reply)))
		copy(out[12:], reply)
		if _, err := uc.Write(out); err != nil {
			b.logf("vhost-user: reply to %s: %v", reqName(req), err)
			return
		}
	}
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// handle acts on one message (b.mu held) and returns its reply, if any.
// It takes ownership of fds.
func (b *Backend) handle(req uint32, p []byte, fds []int) ([]byte, bool) {
	le := binary.LittleEndian
	short := func(n int) bool {
		if len(p) < n {
			b.logf("vhost-user: %s: short payload (%d bytes)", reqName(req), len(p))
			closeFDs(fds)
			return true
		}
		return false
	}
	ring := func(idx uint32) *vring {
		if idx >= uint32(len(b.vq)) {
			b.logf("vhost-user: %s: no ring %d", reqName(req), idx)
			return nil
		}
		return &b.vq[idx]
	}
	switch req {
	case reqGetFeatures:
		b.logf("vhost-user: GET_FEATURES -> %#x", offeredFeatures)
		return u64(offeredFeatures), true
	case reqSetFeatures:
		if short(8) {
			return nil, false
		}
		b.features = le.Uint64(p)
		b.logf("vhost-user: SET_FEATURES %#x", b.features)
		// With PROTOCOL_FEATURES, rings start disabled (SET_VRING_ENABLE).
		for i := range b.vq {
			b.vq[i].enabled = b.features&featProtocol == 0
		}
	case reqSetOwner:
		b.logf("vhost-user: SET_OWNER")
	case reqResetOwner:
		b.logf("vhost-user: RESET_OWNER")
		for i := range b.vq {
			b.stopRing(i)
		}
		b.resetDevice()
	case reqGetProtocolFeatures:
		b.logf("vhost-user: GET_PROTOCOL_FEATURES -> %#x", offeredProtocolFts)
		return u64(offeredProtocolFts), true
	case reqSetProtocolFeatures:
		if short(8) {
			return nil, false
		}
		b.protocol = le.Uint64(p)
		b.logf("vhost-user: SET_PROTOCOL_FEATURES %#x", b.protocol)
	case reqGetQueueNum:
		return u64(uint64(len(b.vq))), true
	case reqSetMemTable:
		if short(8) {
			return nil, false
		}
		n := int(le.Uint32(p))
		if n > maxMemRegions || len(p) < 8+32*n || len(fds) != n {
			b.logf("vhost-user: SET_MEM_TABLE: %d regions, %d bytes, %d fds", n, len(p), len(fds))
			closeFDs(fds)
			return nil, false
		}
		var regs []region
		for i := 0; i < n; i++ {
			r := p[8+32*i:]
			reg := region{gpa: le.Uint64(r[0:]), size: le.Uint64(r[8:]), uva: le.Uint64(r[16:])}
			off := le.Uint64(r[24:])
			if reg.size == 0 || off > 1<<48 || reg.size > 1<<48 {
				b.logf("vhost-user: SET_MEM_TABLE: region %d: size %#x at offset %#x", i, reg.size, off)
				unmapAll(regs)
				closeFDs(fds)
				return nil, false
			}
			m, err := unix.Mmap(fds[i], 0, int(off+reg.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				b.logf("vhost-user: SET_MEM_TABLE: mmap region %d: %v", i, err)
				unmapAll(regs)
				closeFDs(fds)
				return nil, false
			}
			reg.mapping, reg.mem = m, m[off:off+reg.size]
			regs = append(regs, reg)
			b.logf("vhost-user: SET_MEM_TABLE region %d: gpa %#x size %#x uva %#x offset %#x", i, reg.gpa, reg.size, reg.uva, off)
		}
		closeFDs(fds)
		b.unmap()
		b.regions = regs
	case reqSetVringNum, reqSetVringBase, reqSetVringEnable, reqGetVringBase:
		if short(8) {
			return nil, false
		}
		idx, num := le.Uint32(p), le.Uint32(p[4:])
		q := ring(idx)
		if q == nil {
			if req == reqGetVringBase {
				return p[:8], true
			}
			return nil, false
		}
		switch req {
		case reqSetVringNum:
			if num == 0 || num > 32768 || num&(num-1) != 0 {
				b.logf("vhost-user: SET_VRING_NUM %d: bad size %d", idx, num)
				return nil, false
			}
			q.num = num
		case reqSetVringBase:
			q.lastAvail, q.usedIdx = uint16(num), uint16(num)
		case reqSetVringEnable:
			q.enabled = num != 0
			b.kickAll()
		case reqGetVringBase:
			b.stopRing(int(idx))
			out := make([]byte, 8)
			le.PutUint32(out, idx)
			le.PutUint32(out[4:], uint32(q.lastAvail))
			b.logf("vhost-user: GET_VRING_BASE %d -> %d", idx, q.lastAvail)
			return out, true
		}
		b.logf("vhost-user: %s %d %d", reqName(req), idx, num)
	case reqSetVringAddr:
		if short(40) {
			return nil, false
		}
		q := ring(le.Uint32(p))
		if q == nil {
			return nil, false
		}
		q.desc, q.used, q.avail = le.Uint64(p[8:]), le.Uint64(p[16:]), le.Uint64(p[24:])
		if q.used%4 != 0 || q.avail%2 != 0 || q.desc%16 != 0 {
			b.logf("vhost-user: SET_VRING_ADDR: misaligned ring")
			return nil, false
		}
		b.logf("vhost-user: SET_VRING_ADDR %d: desc %#x used %#x avail %#x", le.Uint32(p), q.desc, q.used, q.avail)
	case reqSetVringKick, reqSetVringCall, reqSetVringErr:
		if short(8) {
			return nil, false
		}
		v := le.Uint64(p)
		idx := int(v & vringIdxMask)
		fd := -1
		if v&vringNoFD == 0 {
			if len(fds) != 1 {
				b.logf("vhost-user: %s: %d fds", reqName(req), len(fds))
				closeFDs(fds)
				return nil, false
			}
			fd = fds[0]
		} else {
			closeFDs(fds)
		}
		q := ring(uint32(idx))
		if q == nil {
			if fd >= 0 {
				unix.Close(fd)
			}
			return nil, false
		}
		b.logf("vhost-user: %s %d (fd %v)", reqName(req), idx, fd >= 0)
		switch req {
		case reqSetVringKick:
			b.stopRing(idx)
			if fd < 0 {
				b.logf("vhost-user: SET_VRING_KICK %d without fd: polling is not supported", idx)
				return nil, false
			}
			if err := unix.SetNonblock(fd, true); err != nil {
				b.logf("vhost-user: kick fd: %v", err)
			}
			q.kick = os.NewFile(uintptr(fd), fmt.Sprintf("kick%d", idx))
			q.started = true
			if s := b.uva(q.used, 4); s != nil {
				q.usedIdx = binary.LittleEndian.Uint16(s[2:])
			}
			b.wg.Add(1)
			go b.kickLoop(idx, q.kick)
			b.process(idx)
		case reqSetVringCall:
			if q.call >= 0 {
				unix.Close(q.call)
			}
			q.call = fd
		case reqSetVringErr:
			if q.errFD >= 0 {
				unix.Close(q.errFD)
			}
			q.errFD = fd
		}
	case reqGetConfig:
		if short(12) {
			return nil, false
		}
		off, size := le.Uint32(p), le.Uint32(p[4:])
		if size > 256 {
			b.logf("vhost-user: GET_CONFIG of %d bytes", size)
			return nil, false
		}
		cfg := u64(b.guestCID) // struct virtio_vsock_config
		out := make([]byte, 12+size)
		copy(out, p[:12])
		if off < uint32(len(cfg)) {
			copy(out[12:], cfg[off:])
		}
		b.logf("vhost-user: GET_CONFIG offset %d size %d (guest_cid %d)", off, size, b.guestCID)
		return out, true
	case reqSetConfig:
		b.logf("vhost-user: SET_CONFIG ignored")
	default:
		closeFDs(fds)
		b.logf("vhost-user: unhandled %s (%d bytes)", reqName(req), len(p))
	}
	return nil, false
}

// stopRing stops ring idx (b.mu held): no more kicks are taken.
func (b *Backend) stopRing(idx int) {
	q := &b.vq[idx]
	q.started = false
	if q.kick != nil {
		q.kick.Close() // ends its kickLoop
		q.kick = nil
	}
}

// resetDevice forgets the rings and the memory (b.mu held, rings stopped).
func (b *Backend) resetDevice() {
	for i := range b.vq {
		q := &b.vq[i]
		for _, fd := range []int{q.call, q.errFD} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		*q = vring{call: -1, errFD: -1}
	}
	b.unmap()
}

func (b *Backend) unmap() {
	unmapAll(b.regions)
	b.regions = nil
}

func unmapAll(regs []region) {
	for _, r := range regs {
		unix.Munmap(r.mapping)
	}
}

func (b *Backend) kickLoop(idx int, f *os.File) {
	defer b.wg.Done()
	var buf [8]byte
	for {
		if _, err := f.Read(buf[:]); err != nil {
			return
		}
		b.mu.Lock()
		if b.vq[idx].kick == f {
			if idx == 0 {
				b.stats.RxKicks++
			} else {
				b.stats.TxKicks++
			}
			b.process(idx)
		}
		b.mu.Unlock()
	}
}

func (b *Backend) kickAll() {
	for i := range b.vq {
		b.process(i)
	}
}

// process services ring idx (b.mu held).
func (b *Backend) process(idx int) {
	if idx == 0 {
		b.flushRx()
	} else {
		b.processTx()
	}
}

// ---- guest memory and the split ring ----

func (b *Backend) uva(addr, n uint64) []byte {
	for _, r := range b.regions {
		if addr >= r.uva && addr-r.uva < r.size && n <= r.size-(addr-r.uva) {
			o := addr - r.uva
			return r.mem[o : o+n : o+n]
		}
	}
	return nil
}

func (b *Backend) gpa(addr, n uint64) []byte {
	for _, r := range b.regions {
		if addr >= r.gpa && addr-r.gpa < r.size && n <= r.size-(addr-r.gpa) {
			o := addr - r.gpa
			return r.mem[o : o+n : o+n]
		}
	}
	return nil
}

func (q *vring) ready() bool { return q.started && q.enabled && q.num > 0 }

type buffer struct {
	b     []byte
	write bool
}

// pop takes the next available chain of q, if any.
func (b *Backend) pop(q *vring) (head uint16, bufs []buffer, ok bool) {
	avail := b.uva(q.avail, 4+2*uint64(q.num))
	desc := b.uva(q.desc, 16*uint64(q.num))
	if avail == nil || desc == nil {
		return 0, nil, false
	}
	// The ring's idx, read atomically (the driver writes it after the
	// entries): the aligned 32-bit word that holds it, flags and idx or
	// idx and the first entry (the avail ring is only 2-byte aligned).
	var idx uint16
	if uintptr(unsafe.Pointer(&avail[0]))%4 == 0 {
		idx = uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&avail[0]))) >> 16)
	} else {
		idx = uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&avail[2]))))
	}
	if idx == q.lastAvail {
		return 0, nil, false
	}
	head = binary.LittleEndian.Uint16(avail[4+2*(uint32(q.lastAvail)%q.num):])
	q.lastAvail++
	i := head
	for n := uint32(0); ; n++ {
		if uint32(i) >= q.num || n >= q.num {
			b.logf("vring: bad descriptor chain at %d", head)
			return head, nil, true
		}
		d := desc[16*uint32(i):]
		addr, l := binary.LittleEndian.Uint64(d), binary.LittleEndian.Uint32(d[8:])
		flags, next := binary.LittleEndian.Uint16(d[12:]), binary.LittleEndian.Uint16(d[14:])
		if flags&4 != 0 {
			b.logf("vring: indirect descriptor (not negotiated)")
			return head, nil, true
		}
		buf := b.gpa(addr, uint64(l))
		if buf == nil {
			b.logf("vring: descriptor %#x+%d outside guest memory", addr, l)
			return head, nil, true
		}
		bufs = append(bufs, buffer{buf, flags&2 != 0})
		if flags&1 == 0 {
			return head, bufs, true
		}
		i = next
	}
}

// pushUsed returns chain head to the driver, n bytes written.
func (b *Backend) pushUsed(q *vring, head uint16, n uint32) {
	used := b.uva(q.used, 4+8*uint64(q.num))
	if used == nil {
		return
	}
	e := used[4+8*(uint32(q.usedIdx)%q.num):]
	binary.LittleEndian.PutUint32(e, uint32(head))
	binary.LittleEndian.PutUint32(e[4:], n)
	q.usedIdx++
	// flags 0 (notify us), idx: one store, after the element (the used
	// ring is 4-byte aligned: SET_VRING_ADDR checks it).
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&used[0])), uint32(q.usedIdx)<<16)
}

func (b *Backend) signal(q *vring) {
	if q.call < 0 {
		return
	}
	b.stats.Calls++
	if _, err := unix.Write(q.call, u64(1)); err != nil {
		b.logf("vring: call: %v", err)
	}
}

// processTx takes the guest's packets (b.mu held).
func (b *Backend) processTx() {
	q := &b.vq[1]
	if !q.ready() {
		return
	}
	any := false
	for {
		head, bufs, ok := b.pop(q)
		if !ok {
			break
		}
		var pkt []byte
		for _, buf := range bufs {
			if !buf.write {
				pkt = append(pkt, buf.b...)
			}
		}
		b.pushUsed(q, head, 0)
		any = true
		b.fromGuest(pkt)
	}
	if any {
		b.signal(q)
	}
	b.flushRx()
}

// flushRx gives waiting packets to the guest while it has rx buffers
// (b.mu held).
func (b *Backend) flushRx() {
	q := &b.vq[0]
	if !q.ready() {
		return
	}
	any := false
	for len(b.pending) > 0 {
		p := b.pending[0]
		if p.c != nil && p.c.gone && p.hdr.op != opRST { // nothing but its end
			b.pending = b.pending[1:]
			continue
		}
		head, bufs, ok := b.pop(q)
		if !ok {
			break
		}
		any = true
		space := 0
		for _, buf := range bufs {
			if buf.write {
				space += len(buf.b)
			}
		}
		if space < pktHdrLen {
			b.logf("vring: rx chain of %d bytes", space)
			b.pushUsed(q, head, 0)
			continue
		}
		if b.rxSpace != space-pktHdrLen {
			b.rxSpace = space - pktHdrLen
			b.logf("vring: rx buffers hold %d bytes of payload", b.rxSpace)
		}
		n := min(len(p.payload), space-pktHdrLen)
		h := p.hdr
		h.len = uint32(n)
		if p.c != nil {
			h.bufAlloc, h.fwdCnt = bufAlloc, p.c.fwdCnt
			p.c.lastFwdSent = p.c.fwdCnt
		}
		out := make([]byte, pktHdrLen+n)
		h.encode(out)
		copy(out[pktHdrLen:], p.payload[:n])
		rest := out
		for _, buf := range bufs {
			if buf.write && len(rest) > 0 {
				rest = rest[copy(buf.b, rest):]
			}
		}
		b.pushUsed(q, head, uint32(len(out)))
		b.stats.RxPackets++
		if n < len(p.payload) {
			p.payload = p.payload[n:]
		} else {
			b.pending = b.pending[1:]
		}
	}
	if len(b.pending) == 0 {
		b.pending = nil
	}
	if any {
		b.signal(q)
	}
}

// send queues a packet for the guest and flushes (b.mu held).
func (b *Backend) send(c *conn, op uint16, flags uint32, payload []byte) {
	p := &packet{c: c, payload: payload, hdr: pktHdr{
		srcCID: HostCID, dstCID: b.guestCID, srcPort: c.key.local, dstPort: c.key.peer,
		typ: typeStream, op: op, flags: flags, bufAlloc: bufAlloc,
	}}
	b.pending = append(b.pending, p)
	b.flushRx()
}

// rst answers a guest packet h with RST (b.mu held).
func (b *Backend) rst(h *pktHdr) {
	b.pending = append(b.pending, &packet{hdr: pktHdr{
		srcCID: HostCID, dstCID: b.guestCID, srcPort: h.dstPort, dstPort: h.srcPort,
		typ: typeStream, op: opRST,
	}})
}

// fromGuest handles one packet from the guest (b.mu held).
func (b *Backend) fromGuest(pkt []byte) {
	b.stats.TxPackets++
	if len(pkt) < pktHdrLen {
		b.logf("vsock: short packet (%d bytes)", len(pkt))
		return
	}
	var h pktHdr
	h.decode(pkt)
	payload := pkt[pktHdrLen:]
	if uint32(len(payload)) < h.len {
		b.logf("vsock: %s: %d bytes of payload, header says %d", opNames[h.op], len(payload), h.len)
		return
	}
	payload = payload[:h.len]
	if h.dstCID != HostCID || h.srcCID != b.guestCID || h.typ != typeStream {
		b.logf("vsock: %s %d:%d -> %d:%d type %d: not for us", opNames[h.op], h.srcCID, h.srcPort, h.dstCID, h.dstPort, h.typ)
		if h.op != opRST {
			b.rst(&h)
		}
		return
	}
	c := b.conns[connKey{local: h.dstPort, peer: h.srcPort}]
	if c == nil {
		if h.op != opRST {
			b.logf("vsock: %s for no connection (%d -> %d): RST", opNames[h.op], h.srcPort, h.dstPort)
			b.rst(&h)
		}
		return
	}
	c.peerBufAlloc, c.peerFwdCnt = h.bufAlloc, h.fwdCnt
	defer b.cond.Broadcast()
	switch h.op {
	case opResponse:
		if c.est {
			b.logf("vsock: RESPONSE on an established connection: RST")
			b.send(c, opRST, 0, nil)
			b.drop(c)
			return
		}
		c.est = true
		close(c.ok)
	case opRST:
		if c.est {
			b.logf("vsock: guest reset host port %d (%d bytes in, %d out)", c.key.local, c.txCnt, c.fwdCnt+uint32(len(c.wbuf)))
		}
		b.drop(c)
	case opShutdown:
		b.logf("vsock: guest shut host port %d down (flags %d)", c.key.local, h.flags)
		if h.flags&shutdownSend != 0 {
			c.peerSendEnd = true
		}
		if h.flags&shutdownRcv != 0 {
			c.peerRcvEnd = true
		}
		if c.peerSendEnd && c.peerRcvEnd {
			b.send(c, opRST, 0, nil)
			b.drop(c)
		}
	case opRW:
		if !c.est || c.peerSendEnd {
			b.logf("vsock: RW in the wrong state: RST")
			b.send(c, opRST, 0, nil)
			b.drop(c)
			return
		}
		c.wbuf = append(c.wbuf, payload...)
	case opCreditUpdate:
	case opCreditRequest:
		b.send(c, opCreditUpdate, 0, nil)
	default:
		b.logf("vsock: %s on a connection: RST", opNames[h.op])
		b.send(c, opRST, 0, nil)
		b.drop(c)
	}
}

// drop removes c (b.mu held); its writer writes what the guest sent and
// closes the host's connection.
// abandon ends a connection the host side gave up on: its packets not yet
// sent are dropped, and the guest gets an RST only if it saw the REQUEST
// (a guest whose driver comes up late must not get a burst of stale
// connections). Called with b.mu held.
func (b *Backend) abandon(c *conn) {
	seen := true
	kept := b.pending[:0]
	for _, p := range b.pending {
		if p.c == c {
			seen = seen && p.hdr.op != opRequest
			continue
		}
		kept = append(kept, p)
	}
	b.pending = kept
	if seen {
		b.send(c, opRST, 0, nil)
	}
	b.drop(c)
}

func (b *Backend) drop(c *conn) {
	if c.gone {
		return
	}
	c.gone = true
	delete(b.conns, c.key)
	if !c.est {
		close(c.ok)
	}
	b.cond.Broadcast()
}

// ---- host side: the hybrid protocol ----

func (b *Backend) acceptHybrid() {
	defer b.wg.Done()
	b.acceptEach(b.hl, func(uc *net.UnixConn) {
		b.clients[uc] = true
		b.wg.Add(1)
		b.mu.Unlock()
		go func() {
			defer b.wg.Done()
			b.hybrid(uc)
			b.mu.Lock()
			delete(b.clients, uc)
			b.mu.Unlock()
			uc.Close()
		}()
	})
}

func (b *Backend) hybrid(uc *net.UnixConn) {
	// The CONNECT line, byte by byte: what follows is the guest's.
	uc.SetReadDeadline(time.Now().Add(connectTimeout))
	var line []byte
	one := make([]byte, 1)
	for {
		if _, err := io.ReadFull(uc, one); err != nil {
			return
		}
		if one[0] == '\n' {
			break
		}
		if line = append(line, one[0]); len(line) > 64 {
			return
		}
	}
	uc.SetReadDeadline(time.Time{})
	arg, ok := strings.CutPrefix(strings.TrimSpace(string(line)), "CONNECT ")
	port, err := strconv.ParseUint(arg, 10, 32)
	if !ok || err != nil {
		b.logf("hybrid: bad request %q", line)
		return
	}

	b.mu.Lock()
	c := &conn{uc: uc, ok: make(chan struct{})}
	for {
		b.nextPort++
		if b.nextPort < 1<<20 {
			b.nextPort = 1 << 20
		}
		c.key = connKey{local: b.nextPort, peer: uint32(port)}
		if b.conns[c.key] == nil {
			break
		}
	}
	b.conns[c.key] = c
	b.send(c, opRequest, 0, nil)
	b.mu.Unlock()

	t := time.NewTimer(connectTimeout)
	defer t.Stop()
	select {
	case <-c.ok:
	case <-t.C:
	case <-b.done:
	}
	b.mu.Lock()
	if !c.est {
		if !c.gone {
			b.logf("hybrid: CONNECT %d: no answer from the guest", port)
			b.abandon(c)
		} else {
			b.logf("hybrid: CONNECT %d: refused by the guest", port)
		}
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	if _, err := fmt.Fprintf(uc, "OK %d\n", c.key.local); err != nil {
		b.mu.Lock()
		b.send(c, opRST, 0, nil)
		b.drop(c)
		b.mu.Unlock()
		return
	}
	b.logf("hybrid: CONNECT %d: connected from host port %d", port, c.key.local)
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.writer(c)
	}()
	b.reader(c)
	<-done // the writer closes uc once c is gone
}

// reader moves the host's bytes to the guest, within the guest's credit.
func (b *Backend) reader(c *conn) {
	buf := make([]byte, maxPayload)
	for {
		b.mu.Lock()
		for !b.closed && !c.gone && !c.peerRcvEnd && c.credit() == 0 {
			b.cond.Wait()
		}
		if b.closed || c.gone || c.peerRcvEnd {
			b.mu.Unlock()
			return
		}
		n := min(int(c.credit()), len(buf))
		if b.rxSpace > 0 {
			n = min(n, b.rxSpace)
		}
		b.mu.Unlock()
		m, err := c.uc.Read(buf[:n])
		b.mu.Lock()
		if m > 0 && !c.gone {
			c.txCnt += uint32(m)
			b.send(c, opRW, 0, append([]byte(nil), buf[:m]...))
		}
		if err != nil {
			if !c.gone && !c.localEnd {
				// The host is done: as Cloud Hypervisor, end the stream
				// both ways; the guest answers RST.
				c.localEnd = true
				b.send(c, opShutdown, shutdownRcv|shutdownSend, nil)
				time.AfterFunc(closeTimeout, func() {
					b.mu.Lock()
					defer b.mu.Unlock()
					if !c.gone && !b.closed {
						b.send(c, opRST, 0, nil)
						b.drop(c)
					}
				})
			}
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()
	}
}

// writer moves the guest's bytes to the host and returns credit; it
// closes the host's connection once c is gone.
func (b *Backend) writer(c *conn) {
	defer c.uc.Close()
	for {
		b.mu.Lock()
		for len(c.wbuf) == 0 && !c.gone && !b.closed && !(c.peerSendEnd && !c.halfClosed) {
			b.cond.Wait()
		}
		if b.closed || (len(c.wbuf) == 0 && c.gone) {
			b.mu.Unlock()
			return
		}
		if len(c.wbuf) == 0 { // the guest will send no more
			c.halfClosed = true
			b.mu.Unlock()
			c.uc.CloseWrite()
			continue
		}
		data := c.wbuf
		c.wbuf = nil
		b.mu.Unlock()
		_, err := c.uc.Write(data)
		b.mu.Lock()
		c.fwdCnt += uint32(len(data))
		if err != nil {
			if !c.gone {
				b.send(c, opRST, 0, nil)
				b.drop(c)
			}
			b.mu.Unlock()
			return
		}
		if !c.gone && c.fwdCnt-c.lastFwdSent >= creditEvery {
			b.send(c, opCreditUpdate, 0, nil)
		}
		b.mu.Unlock()
	}
}
