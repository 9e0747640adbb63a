package vhostvsock

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fakeGuest plays QEMU (vhost-user front-end) and a guest driver with an
// echo server on port 1024, over guest memory in a memfd: it checks the
// rings, split descriptor chains and credit both ways without a VM.
type fakeGuest struct {
	t     *testing.T
	mem   []byte
	uc    *net.UnixConn
	rings [2]*fakeRing

	hostBufAlloc, hostFwdCnt, txCnt uint32 // guest to host credit
	fwdCnt, lastFwdSent             uint32 // what the guest consumed
	echo                            []byte
	hostPort                        uint32
	connected                       bool
}

const (
	fakeUVA    = 0x7f0000000000
	fakeMem    = 4 << 20
	fakeNum    = 64
	fakeSlots  = 32
	fakeBufLen = 4096
	guestBuf   = 128 << 10
)

type fakeRing struct {
	idx                    int
	desc, avail, used, buf uint64 // gpa
	availIdx, lastUsed     uint16
	free                   []int
	kick, call             int
}

func (g *fakeGuest) msg(req uint32, payload []byte, fds []int, reply bool) []byte {
	g.t.Helper()
	out := binary.LittleEndian.AppendUint32(nil, req)
	out = binary.LittleEndian.AppendUint32(out, hdrVersion)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(payload)))
	out = append(out, payload...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := g.uc.WriteMsgUnix(out, oob, nil); err != nil {
		g.t.Fatal(err)
	}
	if !reply {
		return nil
	}
	hdr := make([]byte, 12)
	if _, err := io.ReadFull(g.uc, hdr); err != nil {
		g.t.Fatal(err)
	}
	if r := binary.LittleEndian.Uint32(hdr); r != req || binary.LittleEndian.Uint32(hdr[4:]) != hdrVersion|hdrReply {
		g.t.Fatalf("reply header %x to %d", hdr, req)
	}
	p := make([]byte, binary.LittleEndian.Uint32(hdr[8:]))
	if _, err := io.ReadFull(g.uc, p); err != nil {
		g.t.Fatal(err)
	}
	return p
}

func le64(vs ...uint64) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

func le32(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}

func (g *fakeGuest) setup(vhostPath string) {
	t := g.t
	fd, err := unix.MemfdCreate("fakeguest", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, fakeMem); err != nil {
		t.Fatal(err)
	}
	if g.mem, err = unix.Mmap(fd, 0, fakeMem, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(g.mem) })
	c, err := net.Dial("unix", vhostPath)
	if err != nil {
		t.Fatal(err)
	}
	g.uc = c.(*net.UnixConn)
	t.Cleanup(func() { g.uc.Close() })

	if f := binary.LittleEndian.Uint64(g.msg(reqGetFeatures, nil, nil, true)); f != offeredFeatures {
		t.Fatalf("features %#x", f)
	}
	g.msg(reqGetProtocolFeatures, nil, nil, true)
	g.msg(reqSetProtocolFeatures, le64(protoFeatConfig), nil, false)
	g.msg(reqSetOwner, nil, nil, false)
	cfg := g.msg(reqGetConfig, append(le32(0, 8, 0), make([]byte, 8)...), nil, true)
	if len(cfg) != 20 || binary.LittleEndian.Uint64(cfg[12:]) != 3 {
		t.Fatalf("GET_CONFIG reply %x", cfg)
	}
	g.msg(reqSetFeatures, le64(offeredFeatures), nil, false)
	g.msg(reqSetMemTable, append(le32(1, 0), le64(0, fakeMem, fakeUVA, 0)...), []int{fd}, false)
	for i := range g.rings {
		base := uint64(i) * 0x10000
		r := &fakeRing{idx: i, desc: base, avail: base + 0x1000, used: base + 0x2000, buf: 0x100000 + uint64(i)*fakeSlots*2*fakeBufLen}
		for s := 0; s < fakeSlots; s++ {
			r.free = append(r.free, s)
		}
		if r.kick, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		if r.call, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(r.kick); unix.Close(r.call) })
		g.rings[i] = r
		g.msg(reqSetVringNum, le32(uint32(i), fakeNum), nil, false)
		g.msg(reqSetVringBase, le32(uint32(i), 0), nil, false)
		g.msg(reqSetVringAddr, append(le32(uint32(i), 0), le64(fakeUVA+r.desc, fakeUVA+r.used, fakeUVA+r.avail, 0)...), nil, false)
		g.msg(reqSetVringCall, le64(uint64(i)), []int{r.call}, false)
		g.msg(reqSetVringKick, le64(uint64(i)), []int{r.kick}, false)
		g.msg(reqSetVringEnable, le32(uint32(i), 1), nil, false)
	}
	// rx: every slot a chain of a header descriptor and a data one.
	for len(g.rings[0].free) > 0 {
		s := g.rings[0].free[0]
		g.rings[0].free = g.rings[0].free[1:]
		g.post(g.rings[0], s, pktHdrLen, fakeBufLen, 2)
	}
	g.kick(g.rings[0])
}

// post makes slot s a chain of two descriptors (n1 and n2 bytes; n2 0:
// one) with flags and puts it in the avail ring.
func (g *fakeGuest) post(r *fakeRing, s int, n1, n2 int, flags uint16) {
	le := binary.LittleEndian
	d := g.mem[r.desc+uint64(32*s):]
	addr := r.buf + uint64(s)*2*fakeBufLen
	next := uint16(0)
	if n2 > 0 {
		next = 1
	}
	le.PutUint64(d, addr)
	le.PutUint32(d[8:], uint32(n1))
	le.PutUint16(d[12:], flags|next)
	le.PutUint16(d[14:], uint16(2*s+1))
	le.PutUint64(d[16:], addr+fakeBufLen)
	le.PutUint32(d[24:], uint32(n2))
	le.PutUint16(d[28:], flags)
	a := g.mem[r.avail:]
	le.PutUint16(a[4+2*(int(r.availIdx)%fakeNum):], uint16(2*s))
	r.availIdx++
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&a[0])), uint32(r.availIdx)<<16)
}

func (g *fakeGuest) kick(r *fakeRing) { unix.Write(r.kick, le64(1)) }

// usedElems returns the used elements since the last call.
func (g *fakeGuest) usedElems(r *fakeRing) (out [][2]uint32) {
	u := g.mem[r.used:]
	idx := uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&u[0]))) >> 16)
	for ; r.lastUsed != idx; r.lastUsed++ {
		e := u[4+8*(int(r.lastUsed)%fakeNum):]
		out = append(out, [2]uint32{binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])})
	}
	return out
}

func (g *fakeGuest) send(h pktHdr, payload []byte) bool {
	r := g.rings[1]
	if len(r.free) == 0 {
		return false
	}
	s := r.free[0]
	r.free = r.free[1:]
	if h.dstPort == 0 {
		h.dstPort, h.srcPort = g.hostPort, 1024
	}
	h.srcCID, h.dstCID, h.typ = 3, HostCID, typeStream
	h.len, h.bufAlloc, h.fwdCnt = uint32(len(payload)), guestBuf, g.fwdCnt
	g.lastFwdSent = g.fwdCnt
	addr := r.buf + uint64(s)*2*fakeBufLen
	h.encode(g.mem[addr:])
	copy(g.mem[addr+fakeBufLen:], payload)
	g.post(r, s, pktHdrLen, len(payload), 0)
	g.kick(r)
	return true
}

// step runs the guest once: takes what the device used, answers, echoes.
func (g *fakeGuest) step() {
	t := g.t
	for _, e := range g.usedElems(g.rings[1]) {
		g.rings[1].free = append(g.rings[1].free, int(e[0]/2))
	}
	rx := g.rings[0]
	posted := false
	for _, e := range g.usedElems(rx) {
		s := int(e[0] / 2)
		addr := rx.buf + uint64(s)*2*fakeBufLen
		var h pktHdr
		h.decode(g.mem[addr:])
		if e[1] != pktHdrLen+h.len || h.len > fakeBufLen {
			t.Errorf("rx used len %d for a packet of %d", e[1], h.len)
			continue
		}
		payload := g.mem[addr+fakeBufLen : addr+fakeBufLen+uint64(h.len)]
		switch h.op {
		case opRequest:
			if h.dstPort != 1024 { // nothing listens there
				g.send(pktHdr{op: opRST, srcPort: h.dstPort, dstPort: h.srcPort}, nil)
				break
			}
			if h.dstCID != 3 || h.srcCID != HostCID {
				t.Errorf("REQUEST %+v", h)
			}
			g.hostPort, g.connected = h.srcPort, true
			g.hostBufAlloc, g.hostFwdCnt = h.bufAlloc, h.fwdCnt
			g.send(pktHdr{op: opResponse}, nil)
		case opRW:
			if uint32(len(g.echo))+h.len > guestBuf {
				t.Errorf("host sent beyond the guest's buf_alloc: %d+%d", len(g.echo), h.len)
			}
			g.echo = append(g.echo, payload...)
			g.hostBufAlloc, g.hostFwdCnt = h.bufAlloc, h.fwdCnt
		case opShutdown:
			g.send(pktHdr{op: opRST}, nil)
			g.connected = false
		default:
			g.hostBufAlloc, g.hostFwdCnt = h.bufAlloc, h.fwdCnt
		}
		g.post(rx, s, pktHdrLen, fakeBufLen, 2)
		posted = true
	}
	if posted {
		g.kick(rx)
	}
	// Echo within the host's credit.
	for g.connected && len(g.echo) > 0 {
		credit := int(g.hostBufAlloc - (g.txCnt - g.hostFwdCnt))
		n := min(len(g.echo), credit, fakeBufLen, 1000+rand.Intn(fakeBufLen))
		if n <= 0 {
			break
		}
		g.fwdCnt += uint32(n) // consumed: the echo is the app's read
		if !g.send(pktHdr{op: opRW}, g.echo[:n]) {
			g.fwdCnt -= uint32(n)
			break
		}
		g.txCnt += uint32(n)
		g.echo = g.echo[n:]
	}
	if g.connected && g.fwdCnt-g.lastFwdSent >= guestBuf/2 {
		g.send(pktHdr{op: opCreditUpdate}, nil)
	}
}

func TestEchoThroughFakeGuest(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := Serve(ctx, filepath.Join(dir, "vhost.sock"), filepath.Join(dir, "vsock.sock"), 3, func(f string, a ...any) { t.Logf("%v "+f, append([]any{time.Now().Format("05.000000")}, a...)...) })
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	g := &fakeGuest{t: t}
	g.setup(filepath.Join(dir, "vhost.sock"))
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			g.step()
			time.Sleep(50 * time.Microsecond)
		}
	}()
	defer func() { close(stop); <-stopped }()

	// Refused: the guest answers RST, the back-end closes.
	r, err := net.Dial("unix", filepath.Join(dir, "vsock.sock"))
	if err != nil {
		t.Fatal(err)
	}
	r.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(r, "CONNECT 1025\n")
	if got, err := io.ReadAll(r); err != nil || len(got) != 0 {
		t.Fatalf("CONNECT to a closed port: %q, %v", got, err)
	}
	r.Close()

	c, err := net.Dial("unix", filepath.Join(dir, "vsock.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "CONNECT 1024\n")
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("CONNECT: %q, %v", line, err)
	}
	data := make([]byte, 3<<20)
	rand.Read(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		werr <- err
	}()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(br, got); err != nil {
		t.Fatalf("echo: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("echo differs")
	}
	t.Logf("%+v", b.Stats())
}
