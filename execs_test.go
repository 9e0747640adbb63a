package boxrun

import (
	"testing"
	"time"
)

// The start of a UTF-8 character at the end of a chunk waits for its rest
// (put in front of the next chunk), at most holdBackMax from when that
// character began to wait: the wait is per character and per stream, not
// from the first character ever held.
func TestTailsHoldBackPerCharacter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	var h tails
	if got := h.cut("stdout", []byte("ab"), t0); string(got) != "ab" || !h.next().IsZero() {
		t.Fatalf("complete chunk: %q, next %v", got, h.next())
	}
	// "é" is c3 a9, "€" is e2 82 ac.
	if got := h.cut("stdout", []byte("x\xc3"), t0); string(got) != "x" || !h.next().Equal(at(holdBackMax)) {
		t.Fatalf("held c3: out %q, due %v", got, h.next())
	}
	// Its rest and the start of another: the new one waits from now.
	if got := h.cut("stdout", []byte("\xa9\xc3"), at(400*time.Millisecond)); string(got) != "é" {
		t.Fatalf("completed: %q", got)
	}
	if d := h.due(at(holdBackMax)); len(d) != 0 {
		t.Fatalf("a character held for 100 ms was flushed: %q", d)
	}
	if !h.next().Equal(at(400*time.Millisecond + holdBackMax)) {
		t.Fatalf("due %v", h.next())
	}
	// More of the same character keeps its time.
	h.cut("stderr", []byte("\xe2"), at(450*time.Millisecond))
	if got := h.cut("stderr", []byte("\x82"), at(800*time.Millisecond)); len(got) != 0 {
		t.Fatalf("half a character went out: %q", got)
	}
	if d := h.due(at(899 * time.Millisecond)); len(d) != 0 {
		t.Fatalf("due at 899 ms: %q", d)
	}
	if d := h.due(at(900 * time.Millisecond)); len(d) != 1 || d[0].stream != "stdout" || string(d[0].data) != "\xc3" {
		t.Fatalf("due at 900 ms: %q", d)
	}
	if !h.next().Equal(at(450*time.Millisecond + holdBackMax)) {
		t.Fatalf("stderr due %v", h.next())
	}
	if d := h.due(at(950 * time.Millisecond)); len(d) != 1 || d[0].stream != "stderr" || string(d[0].data) != "\xe2\x82" {
		t.Fatalf("due at 950 ms: %q", d)
	}
	if !h.next().IsZero() || len(h.all()) != 0 {
		t.Fatal("something still held")
	}
	// At the exit, whatever is held goes, streams in the order they held.
	h.cut("stderr", []byte("\xe2"), t0)
	h.cut("stdout", []byte("\xc3"), t0)
	if a := h.all(); len(a) != 2 || a[0].stream != "stdout" || a[1].stream != "stderr" {
		t.Fatalf("all: %q", a)
	}
	// Invalid bytes are not held: they would never become valid.
	if got := h.cut("stdout", []byte("\xa9\xff"), t0); string(got) != "\xa9\xff" {
		t.Fatalf("invalid bytes: %q", got)
	}
}
