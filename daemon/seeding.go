package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/seeder"
	"github.com/shoal-project/shoal/trace"
)

// SeedingConfig says what the daemon fetches beyond what containers read,
// and what it records (see package seeder and docs/traces.md).
type SeedingConfig struct {
	// TracePrefetch fetches an image's published start-up trace at mount,
	// ahead of the container (default true).
	TracePrefetch *bool `yaml:"trace_prefetch"`
	// Fill fetches the rest of every mounted image after start-up, at low
	// priority, so the node ends up holding (and serving) whole images.
	Fill bool `yaml:"fill"`
	// FillDelay is the pause between start-up and the fill (default 10s).
	FillDelay time.Duration `yaml:"fill_delay"`
	// FillBytesPerSec caps the fill (stored bytes/s; 0: no cap).
	FillBytesPerSec int64 `yaml:"fill_bytes_per_sec"`
	// RecordSeconds records the blocks every mount touches in its first
	// seconds (default 60; -1 turns recording off). `shoal trace push REF`
	// publishes the latest recording of REF's image.
	RecordSeconds int `yaml:"record_seconds"`
	// KeepWarm lists images kept whole in the cache: prefetched at start
	// and re-checked every KeepWarmInterval (default 10m), which refetches
	// whatever the cache evicted.
	KeepWarm         []string      `yaml:"keep_warm"`
	KeepWarmInterval time.Duration `yaml:"keep_warm_interval"`
}

func (c SeedingConfig) nodeSeeding() node.Seeding {
	s := node.Seeding{Trace: c.TracePrefetch == nil || *c.TracePrefetch, Fill: c.Fill, FillDelay: c.FillDelay, FillRate: c.FillBytesPerSec}
	if s.Fill && c.FillDelay == 0 {
		s.FillDelay = 10 * time.Second
	}
	return s
}

func (c SeedingConfig) recordWindow() time.Duration {
	switch {
	case c.RecordSeconds < 0:
		return -1
	case c.RecordSeconds == 0:
		return 60 * time.Second
	}
	return time.Duration(c.RecordSeconds) * time.Second
}

// Job is a prefetch the daemon runs on its own: a keep-warm image, or a
// `shoal prefetch` without --wait.
type Job struct {
	Ref      string          `json:"ref"`
	KeepWarm bool            `json:"keep_warm,omitempty"`
	Progress seeder.Progress `json:"progress"`
	Started  time.Time       `json:"started"`
	Finished *time.Time      `json:"finished,omitempty"`
	Error    string          `json:"error,omitempty"`
	// Private is the resolved image's node.Image.Private; resolved says
	// whether it is known yet.
	Private  bool `json:"private,omitempty"`
	resolved bool
}

// jobs runs the daemon's own prefetches.
type jobs struct {
	mu    sync.Mutex
	byRef map[string]*Job
	wg    sync.WaitGroup
	ctx   context.Context // ends at shutdown
	stop  context.CancelFunc
}

func newJobs() *jobs {
	j := &jobs{byRef: map[string]*Job{}}
	j.ctx, j.stop = context.WithCancel(context.Background())
	return j
}

// startJob prefetches ref in the background unless a prefetch of it is
// running already; it returns the job.
func (d *Daemon) startJob(ref string, keepWarm bool) *Job {
	j := d.jobs
	j.mu.Lock()
	defer j.mu.Unlock()
	if cur, ok := j.byRef[ref]; ok && cur.Finished == nil {
		return cur
	}
	job := &Job{Ref: ref, KeepWarm: keepWarm, Started: time.Now()}
	j.byRef[ref] = job
	j.wg.Go(func() {
		p, err := d.prefetch(j.ctx, ref, func(img *node.Image) {
			j.mu.Lock()
			job.Private, job.resolved = img.Private, true
			j.mu.Unlock()
		}, func(p seeder.Progress) {
			j.mu.Lock()
			job.Progress = p
			j.mu.Unlock()
		})
		j.mu.Lock()
		defer j.mu.Unlock()
		now := time.Now()
		job.Progress, job.Finished = p, &now
		if err != nil {
			job.Error = err.Error()
			if j.ctx.Err() == nil {
				d.log.Warn("background prefetch failed", "ref", ref, "err", err)
			}
			return
		}
		d.log.Info("image complete in the cache", "ref", ref, "fetched_bytes", p.Fetched, "blocks", p.Blocks)
	})
	return job
}

// prefetch resolves ref, tells resolved the image, and fills the cache
// with it.
func (d *Daemon) prefetch(ctx context.Context, ref string, resolved func(*node.Image), report func(seeder.Progress)) (seeder.Progress, error) {
	d.mu.Lock()
	n := d.node
	d.mu.Unlock()
	if n == nil {
		return seeder.Progress{}, errors.New("daemon is not running")
	}
	img, err := n.Resolve(ctx, ref)
	if err != nil {
		return seeder.Progress{}, err
	}
	resolved(img)
	return n.Prefetch(ctx, img, report)
}

// Jobs lists the background prefetches, keep-warm ones first.
func (d *Daemon) Jobs() []Job {
	j := d.jobs
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]Job, 0, len(j.byRef))
	for _, job := range j.byRef {
		out = append(out, *job)
	}
	return out
}

// stopJobs cancels the background prefetches and waits for them.
func (d *Daemon) stopJobs() {
	j := d.jobs
	j.stop()
	j.wg.Wait()
}

// keepWarm prefetches the keep-warm images now and then every interval,
// until ctx ends.
func (d *Daemon) keepWarm(ctx context.Context) error {
	refs := d.cfg.Seeding.KeepWarm
	if len(refs) == 0 {
		return nil
	}
	every := d.cfg.Seeding.KeepWarmInterval
	if every <= 0 {
		every = 10 * time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		for _, ref := range refs {
			d.startJob(ref, true)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// recorder returns the recorder for a new mount of img: for the whole mount
// when asked, otherwise for the configured first seconds (nil when off or
// for a local conversion, which has no published image to attach to).
func (d *Daemon) recorder(img *node.Image, whole bool) *trace.Recorder {
	if img.Digest == "" {
		return nil
	}
	w := d.cfg.Seeding.recordWindow()
	switch {
	case whole:
		w = 0
	case w < 0:
		return nil
	}
	return trace.NewRecorder(img.Digest, img.Index, w)
}

// tracePath is where the latest recording for an image is kept.
func (d *Daemon) tracePath(digest string) string {
	return filepath.Join(d.cfg.StateDir, "traces", strings.ReplaceAll(digest, ":", "-")+".json")
}

// saveTrace keeps a recording as the latest for its image, if it saw any
// block.
func (d *Daemon) saveTrace(rec *trace.Recorder, command string) *trace.Trace {
	if rec == nil || rec.Len() == 0 {
		return nil
	}
	rec.Stop()
	rec.SetCommand(command)
	t := rec.Trace()
	p := d.tracePath(t.Image)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err == nil {
		err = trace.WriteFile(p, t)
		if err != nil {
			d.log.Warn("could not keep the trace", "image", t.Image, "err", err)
		}
	}
	return t
}

// handleTrace answers GET /v1/trace?ref=REF with the latest recording of
// REF's image.
func (d *Daemon) handleTrace(w http.ResponseWriter, r *http.Request) {
	ref := r.URL.Query().Get("ref")
	if ref == "" {
		httpError(w, http.StatusBadRequest, errors.New("want ?ref=REF"))
		return
	}
	// A mount of the image that is recording now has the freshest data.
	d.mu.Lock()
	var live *trace.Trace
	for _, e := range d.mounts {
		if e.rec != nil && (e.m.Image.Source == ref || e.m.Image.Ref == ref) && e.rec.Len() > 0 {
			live = e.rec.Trace()
		}
	}
	n := d.node
	d.mu.Unlock()
	if live != nil {
		writeJSON(w, live)
		return
	}
	if n == nil {
		httpError(w, http.StatusServiceUnavailable, errors.New("daemon is not running"))
		return
	}
	img, err := n.Resolve(r.Context(), ref)
	if err != nil {
		httpError(w, http.StatusBadGateway, err)
		return
	}
	t, err := trace.ReadFile(d.tracePath(img.Digest))
	if err != nil {
		httpError(w, http.StatusNotFound, fmt.Errorf("no trace recorded for %s on this node", ref))
		return
	}
	writeJSON(w, t)
}

// Trace asks the daemon for its latest recording of ref's image.
func (c *Client) Trace(ctx context.Context, ref string) (*trace.Trace, error) {
	var raw json.RawMessage
	if err := c.do(ctx, http.MethodGet, "/v1/trace?ref="+url.QueryEscape(ref), nil, &raw); err != nil {
		return nil, err
	}
	return trace.Unmarshal(raw)
}
