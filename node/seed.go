package node

import (
	"context"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/seeder"
	"github.com/shoal-project/shoal/trace"
)

// Seeding says what a mount does beyond demand reads (see package seeder).
type Seeding struct {
	// Trace prefetches the image's published start-up trace at mount, in
	// order, ahead of the application (default on: the zero Seeding has
	// it off; DefaultSeeding has it on).
	Trace bool
	// Fill fetches the rest of the image after start-up, at low priority.
	Fill bool
	// FillDelay is the pause between the trace phase and the fill.
	FillDelay time.Duration
	// FillRate caps the fill in stored bytes per second (0: no cap).
	FillRate int64
}

// DefaultSeeding is what mounts do unless WithSeeding says otherwise:
// prefetch the trace; no fill.
var DefaultSeeding = Seeding{Trace: true}

// WithSeeding sets what mounts prefetch and fill (default DefaultSeeding).
func WithSeeding(s Seeding) Option { return func(c *config) error { c.seeding = &s; return nil } }

// WithoutTraceLookup makes Resolve skip looking for a published trace.
func WithoutTraceLookup() Option { return func(c *config) error { c.noTraces = true; return nil } }

// traceLookupTimeout bounds the search for a trace: it is an optimization,
// and a registry slow to answer must not hold the mount back.
const traceLookupTimeout = 5 * time.Second

// findTrace returns the newest trace published for the flat image, or nil.
func (n *Node) findTrace(ctx context.Context, ref, digest string, kc authn.Keychain) *trace.Trace {
	if n.cfg.noTraces {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, traceLookupTimeout)
	defer cancel()
	t, err := trace.Find(ctx, ref, digest, n.nameOpts(), remote.WithAuthFromKeychain(kc))
	switch {
	case err == nil:
		n.log.Debug("start-up trace found", "image", ref, "blocks", len(t.Events))
		return t
	case err == trace.ErrNotFound:
		n.log.Debug("no start-up trace", "image", ref)
	default:
		n.log.Warn("start-up trace not usable; mounting without", "image", ref, "err", err)
	}
	return nil
}

func (n *Node) seeding() Seeding {
	if n.cfg.seeding != nil {
		return *n.cfg.seeding
	}
	return DefaultSeeding
}

// startSeeder starts the mount's seeder, if there is anything to do.
func (n *Node) startSeeder(ctx context.Context, img *Image) *seeder.Seeder {
	s := n.seeding()
	tr := img.Trace
	if !s.Trace {
		tr = nil
	}
	if img.Local || (tr == nil && !s.Fill) {
		return nil
	}
	return seeder.Start(context.WithoutCancel(ctx), img.Index, img.Chain, n.store, seeder.Config{
		Trace: tr, Fill: s.Fill, FillDelay: s.FillDelay, FillRate: s.FillRate, Log: n.cfg.log,
	})
}
