package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/lazyfs"
	"github.com/shoal-project/shoal/mirror"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/p2p"
	"github.com/shoal-project/shoal/seeder"
	"github.com/shoal-project/shoal/trace"
)

// MountRequest asks the daemon to mount Ref at Dir ("" for a fresh
// directory under the state directory, as `shoal run` wants).
type MountRequest struct {
	Ref string `json:"ref"`
	Dir string `json:"dir,omitempty"`
	// RecordTrace records the blocks read for the mount's whole life (not
	// only its first seconds); Unmount returns the trace.
	RecordTrace bool `json:"record_trace,omitempty"`
	// keychain, when set, is whose credentials the mount reads the
	// registry with instead of the daemon's (the snapshotter's, for CRI
	// pulls). Not part of the API.
	keychain authn.Keychain
}

// MountInfo describes a mount the daemon holds.
type MountInfo struct {
	ID         string               `json:"id"`
	Source     string               `json:"source"`
	Ref        string               `json:"ref"`
	Dir        string               `json:"dir"`
	RunDir     string               `json:"run_dir"`
	Local      bool                 `json:"local_conversion"`
	ImageBytes int64                `json:"image_bytes"`
	Entries    int                  `json:"entries"`
	MountMS    int64                `json:"mount_ms"`
	Fetch      fetch.Stats          `json:"fetch"`
	FS         lazyfs.Stats         `json:"fs"`
	Registry   *fetch.RegistryStats `json:"registry,omitempty"`
	UpSeconds  float64              `json:"up_seconds"`
	Env        []string             `json:"env,omitempty"`         // the source image's environment
	WorkingDir string               `json:"working_dir,omitempty"` // and working directory
	Seeding    *seeder.Progress     `json:"seeding,omitempty"`     // trace prefetch and fill, if any
	// Blocks reads waited on that were already in the cache when asked
	// (prefetched, or read before), and that had to be fetched.
	DemandLocal  int64        `json:"demand_local_blocks"`
	DemandRemote int64        `json:"demand_remote_blocks"`
	Trace        *trace.Trace `json:"trace,omitempty"` // on Unmount of a recording mount
	// Private is the image's node.Image.Private: the status page shows
	// it without its reference (publicview.go).
	Private bool `json:"private,omitempty"`
}

// Status is the daemon's state.
type Status struct {
	StateDir string           `json:"state_dir"`
	PeerID   string           `json:"peer_id,omitempty"`
	Addrs    []string         `json:"addrs,omitempty"` // p2p addresses, with /p2p/<id>
	Swarm    *p2p.Stats       `json:"swarm,omitempty"`
	Mirror   *mirror.Stats    `json:"mirror,omitempty"` // the registry mirror's counters, when it is on
	Cache    blockstore.Stats `json:"cache"`
	Mounts   []MountInfo      `json:"mounts"`
	Jobs     []Job            `json:"jobs,omitempty"` // background prefetches (keep-warm, prefetch without --wait)
}

// UnmountRequest names a mount by id or directory.
type UnmountRequest struct {
	ID  string `json:"id,omitempty"`
	Dir string `json:"dir,omitempty"`
}

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/mounts", d.handleMount)
	mux.HandleFunc("POST /v1/unmount", d.handleUnmount)
	mux.HandleFunc("GET /v1/status", d.handleStatus)
	mux.HandleFunc("POST /v1/prefetch", d.handlePrefetch)
	mux.HandleFunc("GET /v1/trace", d.handleTrace)
	return mux
}

func (d *Daemon) handleMount(w http.ResponseWriter, r *http.Request) {
	var req MountRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil || req.Ref == "" {
		httpError(w, http.StatusBadRequest, fmt.Errorf("want {\"ref\": ..., \"dir\": ...}"))
		return
	}
	info, err := d.Mount(r.Context(), req)
	if err != nil {
		httpError(w, http.StatusBadGateway, err)
		return
	}
	writeJSON(w, info)
}

// Mount resolves and mounts an image; the daemon holds it until Unmount.
func (d *Daemon) Mount(ctx context.Context, req MountRequest) (MountInfo, error) {
	d.mu.Lock()
	n := d.node
	d.mu.Unlock()
	if n == nil {
		return MountInfo{}, errors.New("daemon is not running")
	}
	// The mount outlives the request: only the resolving is bounded by it.
	kc := req.keychain
	if kc == nil {
		kc = d.keychain
	}
	img, err := n.ResolveWith(ctx, req.Ref, kc)
	if err != nil {
		return MountInfo{}, err
	}
	dir := req.Dir
	if dir != "" && !filepath.IsAbs(dir) {
		return MountInfo{}, fmt.Errorf("mount directory %q must be absolute", dir)
	}
	if e := d.heldAt(dir, img.Ref); e != nil {
		// Taken over from the previous daemon (handoff.go): the snapshotter
		// asks for its flat mounts again after a restart.
		return e.info(), nil
	}
	if req.RecordTrace && img.Digest == "" {
		return MountInfo{}, fmt.Errorf("record trace: %s has no flat form in its registry (convert it with `shoal convert` first)", req.Ref)
	}
	rec := d.recorder(img, req.RecordTrace)
	var opts []lazyfs.Option
	if rec != nil {
		opts = append(opts, lazyfs.WithAccessObserver(rec))
	}
	d.mu.Lock()
	d.seq++
	id := fmt.Sprintf("m%d", d.seq)
	d.mu.Unlock()
	kept := d.keep(id, img)
	if kept != nil {
		opts = append(opts, lazyfs.WithHandoff(kept.save))
	}
	m, err := n.Mount(context.WithoutCancel(ctx), img, dir, opts...)
	if err != nil {
		return MountInfo{}, err
	}
	if kept != nil {
		kept.put(ctx, m)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	e := &mountEntry{id: id, m: m, started: time.Now(), rec: rec, kept: kept}
	d.mounts[id] = e
	d.metrics.mounts.Set(float64(len(d.mounts)))
	d.log.Info("mounted", "id", id, "ref", img.Ref, "dir", m.Dir, "trace_prefetch", img.Trace != nil, "recording", rec != nil)
	if rec != nil && !req.RecordTrace {
		// Keep the recording of the first seconds once they are over
		// (stopped at unmount, which keeps it itself).
		e.saveTimer = time.AfterFunc(d.cfg.Seeding.recordWindow(), func() { d.saveTrace(rec, "") })
	}
	return e.info(), nil
}

func (e *mountEntry) info() MountInfo {
	img := e.m.Image
	mi := MountInfo{
		ID: e.id, Source: img.Source, Ref: img.Ref, Dir: e.m.Dir, RunDir: e.m.RunDir, Local: img.Local, Private: img.Private,
		ImageBytes: int64(img.Index.ImageBytes()), Entries: len(img.Index.Entries), MountMS: e.m.Elapsed.Milliseconds(),
		Fetch: img.Chain.Stats(), FS: e.m.FS.Stats(), UpSeconds: time.Since(e.started).Seconds(),
	}
	if img.Registry != nil {
		rs := img.Registry.Stats()
		mi.Registry = &rs
	}
	if img.Config != nil {
		mi.Env, mi.WorkingDir = img.Config.Config.Env, img.Config.Config.WorkingDir
	}
	if e.m.Seeder != nil {
		p := e.m.Seeder.Progress()
		mi.Seeding = &p
	}
	if e.m.Demand != nil {
		mi.DemandLocal, mi.DemandRemote = e.m.Demand.Local.Load(), e.m.Demand.Remote.Load()
	}
	return mi
}

func (d *Daemon) handleUnmount(w http.ResponseWriter, r *http.Request) {
	var req UnmountRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil || (req.ID == "" && req.Dir == "") {
		httpError(w, http.StatusBadRequest, fmt.Errorf("want {\"id\": ...} or {\"dir\": ...}"))
		return
	}
	info, err := d.Unmount(req)
	switch {
	case errors.Is(err, errNoMount):
		httpError(w, http.StatusNotFound, err)
	case err != nil:
		httpError(w, http.StatusConflict, err)
	default:
		writeJSON(w, info)
	}
}

var errNoMount = errors.New("no such mount")

// Unmount unmounts a mount and returns its final counters.
func (d *Daemon) Unmount(req UnmountRequest) (MountInfo, error) {
	d.mu.Lock()
	var e *mountEntry
	for id, m := range d.mounts {
		if id == req.ID || (req.Dir != "" && filepath.Clean(req.Dir) == m.m.Dir) {
			e = m
			break
		}
	}
	if e == nil {
		d.mu.Unlock()
		return MountInfo{}, fmt.Errorf("%w: %s%s", errNoMount, req.ID, req.Dir)
	}
	delete(d.mounts, e.id)
	d.metrics.mounts.Set(float64(len(d.mounts)))
	d.mu.Unlock()
	info := e.info()
	if e.saveTimer != nil {
		e.saveTimer.Stop()
	}
	info.Trace = d.saveTrace(e.rec, "")
	if e.kept != nil {
		e.kept.drop()
	}
	if err := e.m.Close(); err != nil {
		return info, err
	}
	d.log.Info("unmounted", "id", e.id, "dir", e.m.Dir)
	return info, nil
}

func (d *Daemon) handleStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, d.Status())
}

// Status reports the cache and the mounts.
func (d *Daemon) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := Status{StateDir: d.cfg.StateDir, Mounts: []MountInfo{}}
	if d.node != nil {
		st.Cache = d.node.Store().Stats()
	}
	if d.swarm != nil {
		ss := d.swarm.Stats()
		st.Swarm, st.PeerID, st.Addrs = &ss, d.swarm.ID().String(), d.swarm.Addrs()
	}
	for _, e := range d.mounts {
		st.Mounts = append(st.Mounts, e.info())
	}
	st.Jobs = d.Jobs()
	if d.mirror != nil {
		ms := d.mirror.Stats()
		st.Mirror = &ms
	}
	return st
}

type apiError struct {
	Error string `json:"error"`
}

func httpError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(apiError{Error: err.Error()})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// PrefetchRequest asks the daemon to fill its cache with a whole image.
type PrefetchRequest struct {
	Ref string `json:"ref"`
	// Background starts the prefetch as a daemon job (see Status.Jobs) and
	// answers at once with a single Final event, instead of streaming the
	// progress until the image is complete.
	Background bool `json:"background,omitempty"`
}

// PrefetchEvent is one line of the streamed answer to a prefetch: progress,
// then a last line with Final set (and Error if it failed).
type PrefetchEvent struct {
	node.Progress
	Final bool   `json:"final,omitempty"`
	Error string `json:"error,omitempty"`
	// Started is set on the answer to a Background request.
	Started bool `json:"started,omitempty"`
}

func (d *Daemon) handlePrefetch(w http.ResponseWriter, r *http.Request) {
	var req PrefetchRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil || req.Ref == "" {
		httpError(w, http.StatusBadRequest, fmt.Errorf("want {\"ref\": ...}"))
		return
	}
	d.mu.Lock()
	n := d.node
	d.mu.Unlock()
	if n == nil {
		httpError(w, http.StatusServiceUnavailable, errors.New("daemon is not running"))
		return
	}
	if req.Background {
		job := d.startJob(req.Ref, false)
		w.Header().Set("Content-Type", "application/x-ndjson")
		_ = json.NewEncoder(w).Encode(PrefetchEvent{Progress: job.Progress, Final: true, Started: true})
		return
	}
	img, err := n.Resolve(r.Context(), req.Ref)
	if err != nil {
		httpError(w, http.StatusBadGateway, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	last := time.Time{}
	p, err := n.Prefetch(r.Context(), img, func(p node.Progress) {
		if time.Since(last) >= 200*time.Millisecond {
			last = time.Now()
			_ = enc.Encode(PrefetchEvent{Progress: p})
			flush()
		}
	})
	ev := PrefetchEvent{Progress: p, Final: true}
	if err != nil {
		ev.Error = err.Error()
	}
	_ = enc.Encode(ev)
	flush()
}
