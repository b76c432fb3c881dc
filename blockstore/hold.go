package blockstore

import (
	"context"
	"log/slog"
	"sync"
)

// maxHeld bounds the records a hold keeps; later ones are counted only.
const maxHeld = 64

// holdHandler passes records on to its handler except while its hold is on.
// Open and Close hold what the store and badger log while they work: if
// the attempt ends in the one case that gets a summary line of its own (a
// damaged directory moved aside, a close abandoned on a failed disk), the
// held lines are dropped and the summary carries the first of them;
// otherwise they are let through.
type holdHandler struct {
	next slog.Handler
	h    *hold
}

type hold struct {
	mu      sync.Mutex
	on      bool
	held    []heldRecord
	dropped int
}

type heldRecord struct {
	h slog.Handler
	r slog.Record
}

func (h holdHandler) Enabled(ctx context.Context, l slog.Level) bool { return h.next.Enabled(ctx, l) }

func (h holdHandler) Handle(ctx context.Context, r slog.Record) error {
	h.h.mu.Lock()
	if h.h.on {
		if len(h.h.held) < maxHeld {
			h.h.held = append(h.h.held, heldRecord{h.next, r.Clone()})
		} else {
			h.h.dropped++
		}
		h.h.mu.Unlock()
		return nil
	}
	h.h.mu.Unlock()
	return h.next.Handle(ctx, r)
}

func (h holdHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return holdHandler{h.next.WithAttrs(as), h.h}
}

func (h holdHandler) WithGroup(name string) slog.Handler {
	return holdHandler{h.next.WithGroup(name), h.h}
}

// start turns the hold on.
func (h *hold) start() {
	h.mu.Lock()
	h.on = true
	h.mu.Unlock()
}

// release turns the hold off and lets the held records through.
func (h *hold) release() {
	h.mu.Lock()
	recs := h.held
	h.on, h.held, h.dropped = false, nil, 0
	h.mu.Unlock()
	for _, rec := range recs {
		_ = rec.h.Handle(context.Background(), rec.r)
	}
}

// discard drops the held records, keeping the hold on if keep says so, and
// returns how many there were and the message of the first warning or
// error among them.
func (h *hold) discard(keep bool) (n int, first string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n = len(h.held) + h.dropped
	for _, rec := range h.held {
		if rec.r.Level >= slog.LevelWarn {
			first = rec.r.Message
			break
		}
	}
	h.on, h.held, h.dropped = keep, nil, 0
	return n, first
}
