package exec

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/boxrun/boxrun/errdefs"
)

// maxQueuedControl bounds the control frames queued on one channel. The
// protocol needs at most three (Started, EOF, Result); the bound keeps an
// untrusted peer from growing our memory with them.
//
// Everything the agent sends is bounded this way before it is parsed
// further: a frame's length by its type (maxDataFrame, maxAgentControlFrame;
// checked before the payload is allocated), a channel's queue by the credit
// we handed out (Data; empty Data is dropped) and maxQueuedControl (the
// rest), credit by a window, and the number of channels by the host itself:
// only the host opens channels (a Request from the agent is a protocol
// error) and frames for unknown channels are read and dropped. The JSON in
// control frames is checked for depth before it is decoded (decodeResult).
const maxQueuedControl = 8

// errChannelDone is the receive error of a channel whose Result has been
// seen (host) or sent (agent).
var errChannelDone = errors.New("channel finished")

type frame struct {
	typ     byte
	payload []byte
}

func appendFrame(b []byte, id uint32, typ byte, p []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, typ)
	return append(b, p...)
}

// frameWriter serialises whole frames onto the connection. On the agent it
// is shared by successive sessions on one port, so a frame of a dying
// session is never interleaved with one of the next.
type frameWriter struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

// mux multiplexes channels over one connection. One goroutine (readLoop)
// parses frames and queues them on their channel; it never writes and never
// waits for a consumer, which is what keeps the two ends from deadlocking
// each other. Writers share the connection through w.
type mux struct {
	r      *bufio.Reader
	w      *frameWriter
	closer io.Closer // closed with the mux (host end); nil on the agent
	log    *slog.Logger
	client bool // host end: sends Sync before its first frame, accepts agent frames

	// session identifies the host connection (agent end: the one being
	// served; host end: ours, sent in Sync frames).
	session uint64
	synced  bool // host end: Sync sent (under w.mu)

	// onRequest is called (agent end) from the read loop for a channel the
	// host just opened; it must not block.
	onRequest func(s *stream, payload []byte)

	ctx    context.Context // cancelled when the mux closes
	cancel context.CancelFunc

	mu      sync.Mutex
	streams map[uint32]*stream // nil once closed
	nextID  uint32
	err     error // why the mux closed (errdefs error), set under mu before done closes
	cause   error // the underlying reason (io.EOF for a clean end)

	done      chan struct{}
	closeOnce sync.Once
}

func newMux(r *bufio.Reader, w *frameWriter, log *slog.Logger, client bool) *mux {
	ctx, cancel := context.WithCancel(context.Background())
	return &mux{
		r:       r,
		w:       w,
		log:     log,
		client:  client,
		ctx:     ctx,
		cancel:  cancel,
		streams: make(map[uint32]*stream),
		done:    make(chan struct{}),
	}
}

// errLocalClose is the cause recorded when our own side closes the mux.
var errLocalClose = errors.New("closed")

// errTakenOver ends an agent session whose host was replaced by another.
var errTakenOver = errors.New("a new host connection took over")

// connError turns the cause of a closed mux into the error callers see.
func connError(cause error) error {
	if errors.Is(cause, errLocalClose) {
		return errdefs.Wrap(errdefs.RuntimeError, cause, "connection to agent closed")
	}
	return errdefs.Wrap(errdefs.RuntimeError, cause, "connection to agent lost")
}

// connErrorMessage is what an ExitStatus.Error says when the connection died.
func connErrorMessage(err error) string {
	var e *errdefs.Error
	if errors.As(err, &e) && e.Message != "" {
		return e.Message
	}
	return err.Error()
}

// readLoop reads until the connection fails (host end).
func (m *mux) readLoop() {
	_, err := m.read()
	if err == nil || errors.Is(err, io.EOF) {
		err = io.EOF
	}
	m.close(err)
}

// read dispatches frames until the connection fails or, on the agent, a
// Sync frame announces a different host session (returned as next).
func (m *mux) read() (next uint64, err error) {
	var hdr [headerSize]byte
	for {
		if _, err := io.ReadFull(m.r, hdr[:]); err != nil {
			return 0, err
		}
		n := binary.BigEndian.Uint32(hdr[0:4])
		id := binary.BigEndian.Uint32(hdr[4:8])
		typ := hdr[8]
		if err := m.checkHeader(typ, n); err != nil {
			return 0, err
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(m.r, p); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		if typ == frameSync {
			sid, ok := parseSync(p)
			if !ok {
				return 0, errors.New("protocol error: bad sync frame")
			}
			if sid != m.session {
				return sid, nil
			}
			continue
		}
		if err := m.dispatch(id, typ, p); err != nil {
			return 0, err
		}
	}
}

// syncPrefix is what a Sync frame starts with: header and magic; the
// host's session id follows.
var syncPrefix = appendFrame(nil, 0, frameSync, make([]byte, syncSize))[:headerSize+len(syncMagic)]

func init() { copy(syncPrefix[headerSize:], syncMagic) }

func syncFrame(session uint64) []byte {
	return appendFrame(nil, 0, frameSync, binary.BigEndian.AppendUint64(append([]byte(nil), syncMagic...), session))
}

func parseSync(p []byte) (uint64, bool) {
	if len(p) != syncSize || !bytes.Equal(p[:len(syncMagic)], syncMagic) {
		return 0, false
	}
	return binary.BigEndian.Uint64(p[len(syncMagic):]), true
}

// awaitSync discards input up to and including a Sync frame and returns
// the host session it announces: bytes before it are leftovers of an
// earlier session or the tail of frames the port dropped before the guest
// opened it.
func awaitSync(br *bufio.Reader, log *slog.Logger) (uint64, error) {
	win := make([]byte, 0, len(syncPrefix))
	skipped := 0
	for {
		b, err := br.ReadByte()
		if err != nil {
			return 0, err
		}
		if len(win) == len(syncPrefix) {
			copy(win, win[1:])
			win = win[:len(win)-1]
			skipped++
		}
		win = append(win, b)
		if !bytes.Equal(win, syncPrefix) {
			continue
		}
		var sid [8]byte
		if _, err := io.ReadFull(br, sid[:]); err != nil {
			return 0, err
		}
		if skipped > 0 {
			log.Debug("discarded bytes before sync", "bytes", skipped)
		}
		return binary.BigEndian.Uint64(sid[:]), nil
	}
}

func (m *mux) checkHeader(typ byte, n uint32) error {
	var ok bool
	switch typ {
	case frameData, frameEOF, frameWindow:
		ok = true
	case frameStarted, frameResult, frameStdout, frameStderr:
		ok = m.client
	case frameRequest, frameSignal, frameCancel, frameSync, frameResize:
		ok = !m.client
	}
	if !ok {
		return fmt.Errorf("protocol error: unexpected frame type %d", typ)
	}
	limit := uint32(maxControlFrame)
	switch {
	case isData(typ):
		limit = maxDataFrame
	case m.client:
		limit = maxAgentControlFrame
	}
	if n > limit {
		return fmt.Errorf("protocol error: frame of type %d is %d bytes (limit %d)", typ, n, limit)
	}
	return nil
}

func (m *mux) dispatch(id uint32, typ byte, p []byte) error {
	switch typ {
	case frameRequest:
		m.mu.Lock()
		if _, dup := m.streams[id]; dup || id == 0 {
			m.mu.Unlock()
			return fmt.Errorf("protocol error: request on channel %d which is in use", id)
		}
		s := m.newStreamLocked(id)
		m.mu.Unlock()
		m.onRequest(s, p)
		return nil
	}
	m.mu.Lock()
	s := m.streams[id]
	m.mu.Unlock()
	if s == nil {
		return nil // a late frame for a channel that already finished
	}
	switch typ {
	case frameWindow:
		if len(p) != 4 {
			return fmt.Errorf("protocol error: window frame of %d bytes", len(p))
		}
		// An honest peer never returns more than it was sent, so the
		// credit never exceeds a window; more would overflow it.
		grant := binary.BigEndian.Uint32(p)
		if grant > window {
			return fmt.Errorf("protocol error: window frame of %d bytes of credit on channel %d", grant, id)
		}
		s.addCredit(int(grant))
		return nil
	case frameSignal:
		if f := s.onSignal.Load(); f != nil {
			(*f)(string(p))
		}
		return nil
	case frameCancel:
		s.cancel()
		return nil
	case frameResize:
		if len(p) != 4 {
			return fmt.Errorf("protocol error: resize frame of %d bytes", len(p))
		}
		if f := s.onResize.Load(); f != nil {
			(*f)(binary.BigEndian.Uint16(p[0:2]), binary.BigEndian.Uint16(p[2:4]))
		}
		return nil
	}
	final, err := s.deliver(typ, p)
	if final {
		m.forget(s)
	}
	return err
}

// close tears the connection down; every channel fails with cause.
func (m *mux) close(cause error) {
	m.closeOnce.Do(func() {
		err := connError(cause)
		m.mu.Lock()
		m.err, m.cause = err, cause
		streams := m.streams
		m.streams = nil
		m.mu.Unlock()
		close(m.done)
		m.cancel()
		if m.closer != nil {
			if cerr := m.closer.Close(); cerr != nil {
				m.log.Debug("closing connection", "err", cerr)
			}
		}
		for _, s := range streams {
			s.close(err)
		}
	})
}

// closedErr is the error of a closed mux.
func (m *mux) closedErr() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

func (m *mux) newStreamLocked(id uint32) *stream {
	ctx, cancel := context.WithCancel(m.ctx)
	s := &stream{
		m:        m,
		id:       id,
		ctx:      ctx,
		cancel:   cancel,
		credit:   window,
		readable: make(chan struct{}, 1),
		writable: make(chan struct{}, 1),
		gone:     make(chan struct{}),
	}
	m.streams[id] = s
	return s
}

// open allocates a channel (host end).
func (m *mux) open() (*stream, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.streams == nil {
		return nil, m.err
	}
	for {
		m.nextID++
		if _, used := m.streams[m.nextID]; m.nextID != 0 && !used {
			break
		}
	}
	return m.newStreamLocked(m.nextID), nil
}

// forget removes s from the channel table and closes it.
func (m *mux) forget(s *stream) {
	m.mu.Lock()
	if m.streams != nil && m.streams[s.id] == s {
		delete(m.streams, s.id)
	}
	m.mu.Unlock()
	s.close(errChannelDone)
}

// write sends one frame. Frames are written whole, with one Write, under
// the writer's lock, so frames of different channels never interleave.
func (m *mux) write(id uint32, typ byte, p []byte) error {
	return m.writeFrames(id, typ, p, 0, nil)
}

// writeFrames sends a frame of type typ, and one of type typ2 after it
// unless typ2 is 0, with one Write.
func (m *mux) writeFrames(id uint32, typ byte, p []byte, typ2 byte, p2 []byte) error {
	m.w.mu.Lock()
	select {
	case <-m.done:
		m.w.mu.Unlock()
		return m.closedErr()
	default:
	}
	buf := m.w.buf[:0]
	if m.client && !m.synced {
		buf = append(buf, syncFrame(m.session)...)
		m.synced = true
	}
	buf = appendFrame(buf, id, typ, p)
	if typ2 != 0 {
		buf = appendFrame(buf, id, typ2, p2)
	}
	_, err := m.w.w.Write(buf)
	if cap(buf) <= 2*maxDataFrame {
		m.w.buf = buf
	}
	m.w.mu.Unlock()
	if err != nil {
		m.close(err)
		return m.closedErr()
	}
	return nil
}

// writeSync sends a Sync frame (host end), so that an agent which lost the
// beginning of the stream finds the frame boundaries again.
func (m *mux) writeSync() error {
	return m.write(0, frameSync, syncFrame(m.session)[headerSize:])
}

func (m *mux) writeJSON(id uint32, typ byte, v any) error {
	p, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return m.write(id, typ, p)
}

// stream is one channel. Incoming frames queue in q in arrival order; Data
// in q is bounded by the credit we handed out, control frames by
// maxQueuedControl, so the read loop can always queue without waiting.
type stream struct {
	m  *mux
	id uint32

	// ctx is cancelled by the peer's Cancel frame (agent end) and when the
	// connection ends.
	ctx    context.Context
	cancel context.CancelFunc

	// onSignal handles Signal frames (agent end); called from the read loop,
	// so it must not block.
	onSignal atomic.Pointer[func(string)]
	// onResize handles Resize frames (agent end), like onSignal.
	onResize atomic.Pointer[func(rows, cols uint16)]

	mu       sync.Mutex
	q        []frame
	ctrl     int   // control frames in q
	unacked  int   // Data bytes received and not yet credited back
	consumed int   // Data bytes dequeued and not yet credited back
	credit   int   // Data bytes we may still send
	err      error // set once no more frames arrive and nothing may be sent

	readable chan struct{} // poked when q grows or err is set
	writable chan struct{} // poked when credit grows
	gone     chan struct{} // closed with err
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// deliver queues a frame from the read loop. final reports that the frame
// ends the channel (a Result on the host end).
func (s *stream) deliver(typ byte, p []byte) (final bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return false, nil // closed locally; the peer did not know yet
	}
	if isData(typ) {
		if len(p) == 0 {
			// Empty Data carries nothing and costs no credit: queued,
			// an endless run of them would grow the queue unbounded.
			return false, nil
		}
		if s.unacked+len(p) > window {
			return false, fmt.Errorf("protocol error: channel %d overran its window", s.id)
		}
		s.unacked += len(p)
	} else {
		if s.ctrl >= maxQueuedControl {
			return false, fmt.Errorf("protocol error: too many control frames on channel %d", s.id)
		}
		s.ctrl++
	}
	s.q = append(s.q, frame{typ, p})
	if typ == frameResult {
		// Closed before the Result can be received, so whoever sees it
		// also sees the channel finished.
		s.err = errChannelDone
		close(s.gone)
		final = true
	}
	poke(s.readable)
	return final, nil
}

func (s *stream) addCredit(n int) {
	s.mu.Lock()
	s.credit = min(s.credit+n, window)
	s.mu.Unlock()
	poke(s.writable)
}

// close marks the channel finished: queued frames can still be received,
// then recv returns err; sends fail with err.
func (s *stream) close(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
		close(s.gone)
	}
	s.mu.Unlock()
	poke(s.readable)
}

// recv returns the next incoming frame. Dequeuing Data returns its credit to
// the peer, in batches of at least half a window.
func (s *stream) recv(ctx context.Context) (frame, error) {
	for {
		s.mu.Lock()
		if len(s.q) > 0 {
			f := s.q[0]
			s.q[0] = frame{}
			s.q = s.q[1:]
			grant := 0
			if isData(f.typ) {
				s.consumed += len(f.payload)
				if s.consumed >= window/2 && s.err == nil {
					grant = s.consumed
					s.unacked -= grant
					s.consumed = 0
				}
			} else {
				s.ctrl--
			}
			s.mu.Unlock()
			if grant > 0 {
				var p [4]byte
				binary.BigEndian.PutUint32(p[:], uint32(grant))
				_ = s.m.write(s.id, frameWindow, p[:]) // fails only when the mux is gone
			}
			return f, nil
		}
		err := s.err
		s.mu.Unlock()
		if err != nil {
			return frame{}, err
		}
		select {
		case <-s.readable:
		case <-ctx.Done():
			return frame{}, ctx.Err()
		}
	}
}

// send writes p as Data-type frames of at most maxDataFrame bytes, waiting
// for credit as needed.
func (s *stream) send(ctx context.Context, typ byte, p []byte) error {
	for len(p) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		s.mu.Lock()
		for s.credit == 0 && s.err == nil {
			s.mu.Unlock()
			select {
			case <-s.writable:
			case <-s.gone:
			case <-ctx.Done():
				return ctx.Err()
			}
			s.mu.Lock()
		}
		if err := s.err; err != nil {
			s.mu.Unlock()
			return err
		}
		n := min(len(p), s.credit, maxDataFrame)
		s.credit -= n
		s.mu.Unlock()
		if err := s.m.write(s.id, typ, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// streamReader reads the Data of a channel up to its EOF frame.
type streamReader struct {
	s   *stream
	ctx context.Context
	buf []byte
	err error
}

func (r *streamReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		f, err := r.s.recv(r.ctx)
		switch {
		case err != nil:
			r.err = err
		case f.typ == frameData:
			r.buf = f.payload
		case f.typ == frameEOF:
			r.err = io.EOF
		}
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// streamWriter writes Data frames.
type streamWriter struct {
	s   *stream
	ctx context.Context
	typ byte
}

func (w *streamWriter) Write(p []byte) (int, error) {
	if err := w.s.send(w.ctx, w.typ, p); err != nil {
		return 0, err
	}
	return len(p), nil
}
