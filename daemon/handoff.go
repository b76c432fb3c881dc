package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/internal/keeper"
	"github.com/shoal-project/shoal/lazyfs"
	"github.com/shoal-project/shoal/node"
)

// Mounts outlive the daemon through the keeper (Config.KeeperSocket, a
// `shoal keeper` process): every mount's FUSE connection is handed to it
// with what the next daemon needs to serve it (keptMount). A daemon that
// stops (SIGTERM) leaves its mounts to the keeper instead of unmounting
// them; one that dies leaves them anyway. Either way their requests wait in
// the kernel, and the next daemon takes every connection back at start,
// resolves each image again by digest, and serves on (lazyfs.Attach),
// answering first the requests the old one had read and not answered.
// Mounts of images converted on the node (no flat form in a registry) are
// not kept.

// keptMount is a mount's entry in the keeper: the state beside its
// connection.
type keptMount struct {
	d *Daemon

	mu sync.Mutex
	st keptState
}

type keptState struct {
	ID      string         `json:"id"`
	Ref     string         `json:"ref"` // the flat image, pinned to its digest
	Digest  string         `json:"digest"`
	Source  string         `json:"source"`
	Dir     string         `json:"dir"`
	RunDir  string         `json:"run_dir"`
	Handoff lazyfs.Handoff `json:"handoff"`
}

// keeperTimeout bounds one call to the keeper.
const keeperTimeout = 5 * time.Second

func (d *Daemon) keeper() *keeper.Client {
	if d.cfg.KeeperSocket == "" {
		return nil
	}
	return &keeper.Client{Path: d.cfg.KeeperSocket}
}

// keep returns the keeper entry for mount id of img, or nil when mounts are
// not kept (no keeper, or an image only this node has).
func (d *Daemon) keep(id string, img *node.Image) *keptMount {
	if d.keeper() == nil || img.Digest == "" {
		return nil
	}
	return &keptMount{d: d, st: keptState{ID: id, Ref: img.Ref, Digest: img.Digest, Source: img.Source}}
}

// put hands m's connection to the keeper. A mount the keeper does not hold
// works, but dies with the daemon: that is logged, not failed.
func (k *keptMount) put(ctx context.Context, m *node.Mount) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.st.Dir, k.st.RunDir = m.Dir, m.RunDir
	conn, err := m.FS.Conn()
	if err == nil {
		defer conn.Close()
		var b []byte
		if b, err = json.Marshal(k.st); err == nil {
			ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), keeperTimeout)
			defer cancel()
			err = k.d.keeper().Put(ctx, k.st.ID, b, conn)
		}
	}
	if err != nil {
		k.d.log.Warn("the keeper does not hold this mount: it will not outlive the daemon", "id", k.st.ID, "dir", m.Dir, "err", err)
	}
}

// save records the mount's lazyfs.Handoff (lazyfs.WithHandoff).
func (k *keptMount) save(h lazyfs.Handoff) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.st.Handoff = h
	b, err := json.Marshal(k.st)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), keeperTimeout)
	defer cancel()
	return k.d.keeper().SetState(ctx, k.st.ID, b)
}

// drop has the keeper forget the mount: it is being unmounted.
func (k *keptMount) drop() {
	ctx, cancel := context.WithTimeout(context.Background(), keeperTimeout)
	defer cancel()
	if err := k.d.keeper().Drop(ctx, k.st.ID); err != nil {
		k.d.log.Warn("keeper: drop", "id", k.st.ID, "err", err)
	}
}

// heldAt returns the mount at dir of image ref (of any image for ""), if
// the daemon holds one.
func (d *Daemon) heldAt(dir, ref string) *mountEntry {
	if dir == "" {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range d.mounts {
		if e.m.Dir == filepath.Clean(dir) && (ref == "" || e.m.Image.Ref == ref) {
			return e
		}
	}
	return nil
}

// held reports whether the daemon serves a mount at dir.
func (d *Daemon) held(dir string) bool { return d.heldAt(dir, "") != nil }

// attachGiveUp is how long the daemon tries to serve a kept mount again
// (its image must resolve) before it detaches it: its readers then get
// ENOTCONN instead of waiting for ever.
const attachGiveUp = 5 * time.Minute

// kept is what the keeper holds, taken (duplicated) at start.
type kept struct {
	st  keptState
	ent keeper.Entry
}

// takeKept reads what the keeper holds, before the node opens: the run
// directories of kept mounts must not be cleared as a crash's leftovers.
func (d *Daemon) takeKept(ctx context.Context) []kept {
	k := d.keeper()
	if k == nil {
		return nil
	}
	tctx, cancel := context.WithTimeout(ctx, keeperTimeout)
	ents, err := k.Take(tctx)
	cancel()
	if err != nil {
		d.log.Warn("no keeper: mounts will not outlive the daemon", "keeper", k.Path, "err", err)
		return nil
	}
	var out []kept
	for _, e := range ents {
		var st keptState
		if err := json.Unmarshal(e.State, &st); err != nil || st.ID == "" || st.Dir == "" || st.RunDir == "" {
			d.log.Error("keeper: an entry this daemon cannot read; dropped", "key", e.Key, "err", err)
			e.Conn.Close()
			_ = k.Drop(ctx, e.Key)
			continue
		}
		out = append(out, kept{st, e})
	}
	return out
}

// takeOver serves again the mounts takeKept found. Mounts whose image
// resolves at once are the daemon's before it serves its API; the others
// keep trying in the background until attachGiveUp.
func (d *Daemon) takeOver(ctx context.Context, n *node.Node, ks []kept) {
	start := time.Now()
	var wg sync.WaitGroup
	for _, k := range ks {
		d.mu.Lock()
		if seq, err := strconv.Atoi(strings.TrimPrefix(k.st.ID, "m")); err == nil && seq > d.seq {
			d.seq = seq
		}
		d.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.attach(ctx, n, k.st, k.ent)
		}()
	}
	wg.Wait()
	if len(ks) > 0 {
		d.log.Info("took over the kept mounts", "mounts", len(ks), "elapsed", time.Since(start).Round(time.Millisecond))
	}
}

// keptRuns lists the run directories of ks.
func keptRuns(ks []kept) []string {
	out := make([]string, len(ks))
	for i, k := range ks {
		out[i] = k.st.RunDir
	}
	return out
}

// attach serves one kept mount again. When its image does not resolve
// (the registry is down, say), it goes on trying in the background until
// attachGiveUp; the mount's readers wait meanwhile.
func (d *Daemon) attach(ctx context.Context, n *node.Node, st keptState, e keeper.Entry) {
	img, err := d.resolveKept(ctx, n, st)
	if err != nil {
		d.log.Warn("cannot serve a kept mount yet; retrying", "id", st.ID, "ref", st.Ref, "err", err)
		go func() {
			deadline := time.Now().Add(attachGiveUp)
			for delay := 200 * time.Millisecond; err != nil; delay = min(2*delay, 10*time.Second) {
				if ctx.Err() != nil || time.Now().After(deadline) {
					d.giveUp(ctx, st, e, err)
					return
				}
				select {
				case <-ctx.Done():
				case <-time.After(delay):
				}
				img, err = d.resolveKept(ctx, n, st)
			}
			d.attachImage(ctx, n, st, e, img)
		}()
		return
	}
	d.attachImage(ctx, n, st, e, img)
}

func (d *Daemon) resolveKept(ctx context.Context, n *node.Node, st keptState) (*node.Image, error) {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	img, err := n.ResolveWith(rctx, st.Ref, d.keychain)
	if err != nil {
		return nil, err
	}
	if img.Digest != st.Digest {
		return nil, fmt.Errorf("%s resolved to %s, not the %s that is mounted", st.Ref, img.Digest, st.Digest)
	}
	return img, nil
}

func (d *Daemon) attachImage(ctx context.Context, n *node.Node, st keptState, e keeper.Entry, img *node.Image) {
	kept := &keptMount{d: d, st: st}
	m, err := n.Attach(ctx, img, st.Dir, st.RunDir, e.Conn, st.Handoff, lazyfs.WithHandoff(kept.save))
	if err != nil {
		d.giveUp(ctx, st, e, err)
		return
	}
	d.mu.Lock()
	d.mounts[st.ID] = &mountEntry{id: st.ID, m: m, started: time.Now(), kept: kept}
	d.metrics.mounts.Set(float64(len(d.mounts)))
	d.mu.Unlock()
	d.log.Info("serving a kept mount again", "id", st.ID, "ref", st.Ref, "dir", st.Dir, "inherited_backing_ids", len(st.Handoff.Backing))
}

// giveUp detaches a kept mount the daemon cannot serve, so that its readers
// get ENOTCONN instead of waiting for ever, and has the keeper forget it.
func (d *Daemon) giveUp(ctx context.Context, st keptState, e keeper.Entry, err error) {
	d.log.Error("gave up serving a kept mount; detached (its readers get ENOTCONN)", "id", st.ID, "dir", st.Dir, "err", err)
	e.Conn.Close()
	_ = unix.Unmount(st.Dir, unix.MNT_DETACH)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), keeperTimeout)
	defer cancel()
	_ = d.keeper().Drop(dctx, st.ID)
}

// leaving reports whether the daemon is stopping with a keeper: its
// mounts are then left for the next daemon, not unmounted.
func (d *Daemon) leaving() bool {
	return d.keeper() != nil && d.runCtx != nil && d.runCtx.Err() != nil
}
