package client

import (
	"bytes"
	"errors"
	"io"
	"strings"
)

// SSEMessage is one server-sent event: its event name ("" when the
// message named none) and its data lines joined by "\n".
type SSEMessage struct {
	Event string
	Data  string
	ID    string
}

// SSEReader reads server-sent events (the text/event-stream format of the
// HTML standard): "event:", "data:" (several are joined by newlines),
// "id:", comments (":"), any line ending (LF, CRLF, CR); "retry:" and
// unknown fields are ignored. Lines may be long (up to 64 MiB).
type SSEReader struct {
	rd         io.Reader
	buf        []byte
	start, end int
	err        error
	skipLF     bool // the last line ended with CR: a LF next belongs to it
	maxLine    int
}

// NewSSEReader reads events from r.
func NewSSEReader(r io.Reader) *SSEReader {
	return &SSEReader{rd: r, buf: make([]byte, 32<<10), maxLine: 64 << 20}
}

// errLineTooLong is a line past maxLine: a broken server cannot exhaust
// memory.
var errLineTooLong = errors.New("event stream: line too long")

// line reads one line without its ending. It returns the reader's error
// only when no byte of a line is left; a last line without an ending is
// returned as it is.
func (s *SSEReader) line() (string, error) {
	var out []byte
	for {
		if s.start == s.end {
			if s.err != nil {
				if len(out) > 0 {
					return string(out), nil
				}
				return "", s.err
			}
			n, err := s.rd.Read(s.buf)
			s.start, s.end, s.err = 0, n, err
			continue
		}
		chunk := s.buf[s.start:s.end]
		if s.skipLF {
			s.skipLF = false
			if chunk[0] == '\n' {
				s.start++
				continue
			}
		}
		i := bytes.IndexAny(chunk, "\r\n")
		if i < 0 {
			out = append(out, chunk...)
			s.start = s.end
			if len(out) > s.maxLine {
				return "", errLineTooLong
			}
			continue
		}
		out = append(out, chunk[:i]...)
		s.start += i + 1
		s.skipLF = chunk[i] == '\r'
		return string(out), nil
	}
}

// Next returns the next event. At the end of the stream it returns
// io.EOF; an event cut off by the end is dropped (io.ErrUnexpectedEOF).
func (s *SSEReader) Next() (SSEMessage, error) {
	var m SSEMessage
	var data []string
	pending := false
	for {
		l, err := s.line()
		if err != nil {
			if err == io.EOF && pending {
				return SSEMessage{}, io.ErrUnexpectedEOF
			}
			return SSEMessage{}, err
		}
		if l == "" {
			if len(data) == 0 {
				// No data: nothing to dispatch (comments, keep-alives).
				m, pending = SSEMessage{}, false
				continue
			}
			m.Data = strings.Join(data, "\n")
			return m, nil
		}
		if strings.HasPrefix(l, ":") {
			continue
		}
		pending = true
		field, value, _ := strings.Cut(l, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "event":
			m.Event = value
		case "data":
			data = append(data, value)
		case "id":
			m.ID = value
		}
	}
}
