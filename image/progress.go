package image

import (
	"context"
	"sync"

	"github.com/containers/image/v5/types"
)

// pumpProgress returns the channel to hand to copy.Options.Progress and a
// function to call once the copy has returned, which closes the channel and
// waits until every event has been delivered to fn.
//
// copy blocks on each send to its progress channel, so the channel is
// drained at once into a queue, and fn is called from a second goroutine.
// While fn is busy, successive "progress" events of a blob replace each
// other in the queue; the other events are all kept.
func pumpProgress(ref string, fn func(Progress)) (chan types.ProgressProperties, func()) {
	ch := make(chan types.ProgressProperties)
	var (
		mu      sync.Mutex
		queue   []Progress
		drained bool
		wake    = make(chan struct{}, 1)
		done    = make(chan struct{})
	)

	go func() {
		for p := range ch {
			ev := Progress{
				Ref:    ref,
				Layer:  p.Artifact.Digest.String(),
				Event:  eventName(p.Event),
				Offset: int64(p.Offset),
				Total:  p.Artifact.Size,
			}
			mu.Lock()
			if n := len(queue); n > 0 && ev.Event == "progress" &&
				queue[n-1].Event == "progress" && queue[n-1].Layer == ev.Layer {
				queue[n-1] = ev
			} else {
				queue = append(queue, ev)
			}
			mu.Unlock()
			select {
			case wake <- struct{}{}:
			default:
			}
		}
		mu.Lock()
		drained = true
		mu.Unlock()
		select {
		case wake <- struct{}{}:
		default:
		}
	}()

	go func() {
		defer close(done)
		for range wake {
			mu.Lock()
			batch, last := queue, drained
			queue = nil
			mu.Unlock()
			for _, ev := range batch {
				fn(ev)
			}
			if last {
				return
			}
		}
	}()

	return ch, func() {
		close(ch)
		<-done
	}
}

func eventName(e types.ProgressEvent) string {
	switch e {
	case types.ProgressEventNewArtifact:
		return "start"
	case types.ProgressEventRead:
		return "progress"
	case types.ProgressEventDone:
		return "done"
	case types.ProgressEventSkipped:
		return "skipped"
	default:
		return "unknown"
	}
}

type progressKey struct{}

// WithProgress returns a context whose pulls also report their progress to
// fn (as Options.Progress does for every pull of the store): one caller's
// pull can be followed without seeing the others'.
func WithProgress(ctx context.Context, fn func(Progress)) context.Context {
	return context.WithValue(ctx, progressKey{}, fn)
}

// progressFor is where a pull under ctx reports: the store's callback,
// the context's, or both.
func (s *Store) progressFor(ctx context.Context) func(Progress) {
	own, _ := ctx.Value(progressKey{}).(func(Progress))
	switch {
	case own == nil:
		return s.progress
	case s.progress == nil:
		return own
	}
	all := s.progress
	return func(p Progress) { all(p); own(p) }
}
