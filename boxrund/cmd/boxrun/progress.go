package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/boxrun/boxrun/boxrund/client"
)

// progressBar draws an image pull's progress on one terminal line: bytes
// of all blobs seen so far against their total. A nil bar draws nothing
// (stderr is not a terminal).
type progressBar struct {
	w        io.Writer
	image    string
	blobs    map[string]*blob
	order    []string
	last     time.Time
	drawn    bool
	fetched  bool // some blob was downloaded (not all already there)
	interval time.Duration
}

type blob struct {
	offset, total int64
	done          bool
}

func newProgressBar(w io.Writer, image string) *progressBar {
	return &progressBar{w: w, image: image, blobs: map[string]*blob{}, interval: 100 * time.Millisecond}
}

func (p *progressBar) update(ev client.PullProgress) {
	if p == nil {
		return
	}
	b := p.blobs[ev.Layer]
	if b == nil {
		b = &blob{total: -1}
		p.blobs[ev.Layer] = b
		p.order = append(p.order, ev.Layer)
	}
	if ev.Total > 0 {
		b.total = ev.Total
	}
	switch ev.Event {
	case "start":
		p.fetched = true // skipped blobs are not started
	case "progress":
		b.offset = ev.Offset
		p.fetched = true
	case "done", "skipped":
		b.done = true
		if b.total > 0 {
			b.offset = b.total
		}
	}
	if ev.Event == "progress" && time.Since(p.last) < p.interval {
		return
	}
	p.last = time.Now()
	p.draw()
}

// line is the bar's text.
func (p *progressBar) line() string {
	var have, total int64
	done, known := 0, true
	for _, id := range p.order {
		b := p.blobs[id]
		have += b.offset
		if b.total > 0 {
			total += b.total
		} else {
			known = false
		}
		if b.done {
			done++
		}
	}
	const width = 30
	var bar string
	if known && total > 0 {
		n := int(int64(width) * have / total)
		n = min(max(n, 0), width)
		bar = "[" + strings.Repeat("=", n) + strings.Repeat(" ", width-n) + "] "
		return fmt.Sprintf("Pulling %s %s%s / %s  (%d/%d blobs)", p.image, bar, human(have), human(total), done, len(p.order))
	}
	return fmt.Sprintf("Pulling %s %s  (%d/%d blobs)", p.image, human(have), done, len(p.order))
}

func (p *progressBar) draw() {
	fmt.Fprintf(p.w, "\r\x1b[K%s", p.line())
	p.drawn = true
}

// finish clears the bar and says what happened when something was
// fetched.
func (p *progressBar) finish(err error) {
	if p == nil || !p.drawn {
		return
	}
	fmt.Fprint(p.w, "\r\x1b[K")
	if err == nil && p.fetched {
		var total int64
		for _, b := range p.blobs {
			total += max(b.offset, b.total)
		}
		fmt.Fprintf(p.w, "Pulled %s (%s)\n", p.image, human(total))
	}
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f kB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
