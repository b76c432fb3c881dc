package seeder

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/trace"
)

// Fetcher fetches blocks into the node's cache: fetch.Chain. Blocks a call
// is already fetching (a demand read, readahead) are joined, not fetched
// twice.
type Fetcher interface {
	FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error)
}

// Local says whether a block is in the node's cache already.
type Local interface {
	Has(ctx context.Context, id flat.BlockID) (bool, error)
}

// Config says what a Seeder does.
type Config struct {
	// Trace, if not nil, is fetched first, in order: the start-up phase.
	Trace *trace.Trace
	// TracePriority is the priority of the start-up phase (default
	// fetch.Prefetch: below demand reads, above fill).
	TracePriority fetch.Priority
	// Fill fetches every other block after the trace.
	Fill bool
	// FillDelay is how long to wait after the trace phase before filling,
	// leaving the application's own reads alone while it starts.
	FillDelay time.Duration
	// FillRate caps the fill in stored (compressed) bytes per second; 0
	// means no cap.
	FillRate int64
	// FillPriority is the priority of the fill (default fetch.Background;
	// `shoal prefetch` uses fetch.Prefetch).
	FillPriority fetch.Priority
	// BatchBytes is the stored bytes asked for in one call (default
	// DefaultBatchBytes): one call becomes a few merged range requests
	// toward the registry, or one batched request per peer.
	BatchBytes int64
	// Parallel is how many trace batches are in flight at once (default
	// 2); FillParallel the same for the fill (default 1).
	Parallel     int
	FillParallel int
	// Attempts is how many passes are made over blocks that failed
	// (default 3), with a growing pause between passes.
	Attempts int
	// OnProgress, if set, is called after every batch (not concurrently).
	OnProgress func(Progress)
	// Log receives failures; default slog.Default().
	Log *slog.Logger
}

// DefaultBatchBytes is the default stored size of one batch.
const DefaultBatchBytes = 4 << 20

// Phases of a Seeder.
const (
	PhaseTrace    = "trace"
	PhaseWaiting  = "waiting" // FillDelay
	PhaseFill     = "fill"
	PhaseComplete = "complete" // every block of the image is local
	PhaseIdle     = "done"     // trace done, no fill asked for
	PhaseStopped  = "stopped"
	PhaseFailed   = "failed"
)

// Progress is a snapshot of a Seeder's work. Bytes are stored
// (compressed) block bytes, as they cross the network.
type Progress struct {
	Phase       string `json:"phase"`
	TraceBlocks int    `json:"trace_blocks"`
	TraceDone   int    `json:"trace_done"`
	Blocks      int    `json:"blocks"`
	Done        int    `json:"done"` // blocks known local
	Bytes       int64  `json:"bytes"`
	DoneBytes   int64  `json:"done_bytes"`
	Fetched     int64  `json:"fetched"` // stored bytes this seeder fetched (the rest were local)
	Err         string `json:"error,omitempty"`
}

// Complete reports whether every block is local.
func (p Progress) Complete() bool { return p.Phase == PhaseComplete }

// Seeder fills one image's blocks into the node's cache in the background.
type Seeder struct {
	x      *flat.Index
	f      Fetcher
	local  Local
	cfg    Config
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	prog     Progress
	err      error
	reportMu sync.Mutex // OnProgress is not called concurrently

	traceDone  atomic.Int64
	doneBlocks atomic.Int64 // blocks known local
	doneBytes  atomic.Int64
	fetched    atomic.Int64
}

// Start starts filling x's blocks through f. It returns at once; Stop ends
// the work (and must be called, also after Done, to release the context).
func Start(ctx context.Context, x *flat.Index, f Fetcher, local Local, cfg Config) *Seeder {
	if cfg.TracePriority == fetch.Demand {
		cfg.TracePriority = fetch.Prefetch
	}
	if cfg.FillPriority == fetch.Demand {
		cfg.FillPriority = fetch.Background
	}
	if cfg.BatchBytes <= 0 {
		cfg.BatchBytes = DefaultBatchBytes
	}
	if cfg.Parallel <= 0 {
		cfg.Parallel = 2
	}
	if cfg.FillParallel <= 0 {
		cfg.FillParallel = 1
	}
	if cfg.Attempts <= 0 {
		cfg.Attempts = 3
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &Seeder{x: x, f: f, local: local, cfg: cfg, log: log.With("component", "seeder"), cancel: cancel, done: make(chan struct{})}
	s.prog.Blocks = len(x.Blocks)
	for _, b := range x.Blocks {
		s.prog.Bytes += int64(b.CLen)
	}
	order, split := Order(cfg.Trace, len(x.Blocks))
	s.prog.TraceBlocks = split
	s.prog.Phase = PhaseTrace
	if split == 0 {
		s.prog.Phase = PhaseFill
	}
	go s.run(ctx, order, split)
	return s
}

// Stop ends the work and waits for it to end.
func (s *Seeder) Stop() {
	s.cancel()
	<-s.done
}

// Done is closed when the work has ended: complete, failed or stopped.
func (s *Seeder) Done() <-chan struct{} { return s.done }

// Err is why the work ended early (nil when complete, or still running).
func (s *Seeder) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Progress returns a snapshot.
func (s *Seeder) Progress() Progress {
	s.mu.Lock()
	p := s.prog
	s.mu.Unlock()
	p.TraceDone = int(s.traceDone.Load())
	p.Done = int(s.doneBlocks.Load())
	p.DoneBytes = s.doneBytes.Load()
	p.Fetched = s.fetched.Load()
	return p
}

func (s *Seeder) setPhase(ph string) {
	s.mu.Lock()
	s.prog.Phase = ph
	s.mu.Unlock()
	s.report()
}

func (s *Seeder) report() {
	if s.cfg.OnProgress != nil {
		s.reportMu.Lock()
		s.cfg.OnProgress(s.Progress())
		s.reportMu.Unlock()
	}
}

func (s *Seeder) run(ctx context.Context, order []uint32, split int) {
	defer close(s.done)

	// Start-up phase: the trace, in order, several batches in flight.
	err := s.phase(fetch.WithPriority(ctx, s.cfg.TracePriority), PhaseTrace, order[:split], s.cfg.Parallel, nil, true)
	if err == nil && s.cfg.Fill {
		if s.cfg.FillDelay > 0 {
			s.setPhase(PhaseWaiting)
			select {
			case <-time.After(s.cfg.FillDelay):
			case <-ctx.Done():
				err = ctx.Err()
			}
		}
		if err == nil {
			var lim *rate.Limiter
			if s.cfg.FillRate > 0 {
				lim = rate.NewLimiter(rate.Limit(s.cfg.FillRate), int(max(s.cfg.FillRate, s.cfg.BatchBytes)))
			}
			err = s.phase(fetch.WithPriority(ctx, s.cfg.FillPriority), PhaseFill, order[split:], s.cfg.FillParallel, lim, false)
		}
	}
	switch {
	case err != nil && ctx.Err() != nil:
		s.mu.Lock()
		s.err = ctx.Err()
		s.mu.Unlock()
		s.setPhase(PhaseStopped)
	case err != nil:
		s.mu.Lock()
		s.err = err
		s.prog.Err = err.Error()
		s.mu.Unlock()
		s.log.Warn("seeding stopped", "err", err)
		s.setPhase(PhaseFailed)
	case s.cfg.Fill:
		s.setPhase(PhaseComplete)
	default:
		s.setPhase(PhaseIdle)
	}
}

// phase fetches blocks (positions in the table) in order, in batches of
// cfg.BatchBytes, up to parallel batches at once, pacing by lim if set.
// Failed blocks get further passes; what still fails is the error.
func (s *Seeder) phase(ctx context.Context, name string, blocks []uint32, parallel int, lim *rate.Limiter, isTrace bool) error {
	if len(blocks) == 0 {
		return nil
	}
	s.setPhase(name)
	pending := blocks
	var lastErr error
	for attempt := 1; len(pending) > 0; attempt++ {
		if attempt > 1 {
			if attempt > s.cfg.Attempts {
				return fmt.Errorf("%s: %d blocks could not be fetched: %w", name, len(pending), lastErr)
			}
			select {
			case <-time.After(time.Duration(attempt-1) * time.Second):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		var failedMu sync.Mutex
		var failed []uint32
		batches := make(chan []uint32)
		var wg sync.WaitGroup
		for range parallel {
			wg.Go(func() {
				for batch := range batches {
					bad, err := s.batch(ctx, batch, isTrace)
					if len(bad) > 0 {
						failedMu.Lock()
						failed = append(failed, bad...)
						lastErr = err
						failedMu.Unlock()
					}
					s.report()
				}
			})
		}
		feedErr := s.feed(ctx, pending, lim, batches, isTrace)
		close(batches)
		wg.Wait()
		if feedErr != nil {
			return feedErr
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		pending = failed
		if len(failed) > 0 {
			s.log.Debug("blocks failed, will retry", "phase", name, "blocks", len(failed), "attempt", attempt, "err", lastErr)
		}
	}
	return nil
}

// feed cuts blocks into batches of about cfg.BatchBytes stored bytes,
// skipping those already local, and sends them on out.
func (s *Seeder) feed(ctx context.Context, blocks []uint32, lim *rate.Limiter, out chan<- []uint32, isTrace bool) error {
	var batch []uint32
	var size int64
	send := func() error {
		if len(batch) == 0 {
			return nil
		}
		if lim != nil {
			if err := lim.WaitN(ctx, int(min(size, int64(lim.Burst())))); err != nil {
				return err
			}
		}
		select {
		case out <- batch:
		case <-ctx.Done():
			return ctx.Err()
		}
		batch, size = nil, 0
		return nil
	}
	for _, b := range blocks {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		blk := s.x.Blocks[b]
		if ok, err := s.local.Has(ctx, blk.ID); err == nil && ok {
			s.markDone(b, false)
			if isTrace {
				s.traceDone.Add(1)
			}
			continue
		}
		batch = append(batch, b)
		size += int64(blk.CLen)
		if size >= s.cfg.BatchBytes {
			if err := send(); err != nil {
				return err
			}
		}
	}
	return send()
}

// batch fetches one batch and returns the blocks that failed.
func (s *Seeder) batch(ctx context.Context, batch []uint32, isTrace bool) ([]uint32, error) {
	want := make([]flat.Block, 0, len(batch))
	for _, b := range batch {
		want = append(want, s.x.Blocks[b])
	}
	got, err := s.f.FetchMany(ctx, want)
	var bad []uint32
	for _, b := range batch {
		if _, ok := got[s.x.Blocks[b].ID]; ok {
			s.markDone(b, true)
			if isTrace {
				s.traceDone.Add(1)
			}
		} else {
			bad = append(bad, b)
		}
	}
	if len(bad) > 0 && err == nil {
		err = errors.New("not returned")
	}
	return bad, err
}

func (s *Seeder) markDone(b uint32, fetched bool) {
	blk := s.x.Blocks[b]
	s.doneBlocks.Add(1)
	s.doneBytes.Add(int64(blk.CLen))
	if fetched {
		s.fetched.Add(int64(blk.CLen))
	}
}
