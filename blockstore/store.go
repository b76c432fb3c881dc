package blockstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/flat"
)

const (
	// valueThreshold keeps everything but tiny blocks in the value log, so the
	// LSM tree holds only keys and small metadata and stays small.
	valueThreshold = 1 << 10
	// entryOverhead is a generous estimate of what one stored block costs
	// besides its bytes (value-log header, WAL and LSM entries for two keys).
	entryOverhead = 256
	// accessFlushInterval and accessFlushBatch bound how much access order a
	// crash can lose: it is persisted every interval, or sooner once this
	// many blocks have been touched.
	accessFlushInterval = 10 * time.Second
	accessFlushBatch    = 1024
	// gcDiscardRatio is the share of a value-log file that must be garbage
	// before GC rewrites it; gcMaxRounds bounds one GC run.
	gcDiscardRatio = 0.5
	gcMaxRounds    = 16
)

// Block is a block ID with its bytes, for PutMany.
type Block struct {
	ID   flat.BlockID
	Data []byte
}

// Stats describes the store's contents.
type Stats struct {
	Blocks       int   // stored blocks
	Bytes        int64 // bytes of stored blocks (what the quota counts)
	Quota        int64 // 0: unlimited
	PinnedBlocks int   // stored blocks with at least one pin
	PinnedBytes  int64 // bytes of those
	PinnedIDs    int   // IDs with at least one pin, stored or not
	Reserved     int64 // bytes set aside for writes beside the store (Reserve)
}

// Store is a content-addressed block cache on disk. It is safe for concurrent
// use. See the package doc for the design.
type Store struct {
	db   *badger.DB
	dir  string
	cfg  config
	log  *slog.Logger // through hold
	base *slog.Logger // not held: for the summary lines of Open and Close
	hold *hold

	// closeMu is read-held by every operation that uses db and write-held by
	// Close while it marks the store closed, so the database (whose files
	// are memory-mapped) is never closed under a reader.
	closeMu sync.RWMutex
	closed  bool

	// wmu serializes every write to db together with the index change that
	// goes with it, so the index and the database agree after each write.
	// Reads do not take it. Lock order: closeMu, wmu, mu.
	wmu sync.Mutex
	// compactions counts compactDeleted's runs.
	compactions atomic.Int64

	mu       sync.Mutex // guards idx, reserved and pending
	idx      *index
	reserved int64 // bytes of the Reservations held
	pending  int64 // of those, bytes not yet written (Reservation.Used)

	kick      chan struct{} // asks loop to persist the access order early
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// Open opens or creates the store in dir. ctx bounds loading the index; it
// is not kept. The returned Store runs value-log GC and persists access order
// in a goroutine until Close.
//
// A directory whose contents badger cannot open (garbage, truncated or
// corrupt files, or a file where the directory should be) is damage: Open
// moves it aside to <dir>.damaged-<UTC time>, removing any older damaged
// copy, starts an empty store and logs one error line saying so. Failures
// of the environment are returned instead: permission denied, a full or
// read-only file system, another open store holding the directory, an
// incompatible database (ErrIncompatible).
func Open(ctx context.Context, dir string, opts ...Option) (*Store, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("open blockstore %s: %w", dir, err)
		}
	}
	cfg.derive()
	s, err := open(ctx, dir, cfg)
	if err == nil {
		return s, nil
	}
	if !isDamage(err) {
		return nil, fmt.Errorf("open blockstore %s: %w", dir, err)
	}
	aside, removedOld, aerr := setAside(dir, time.Now())
	if aerr != nil {
		return nil, fmt.Errorf("open blockstore %s: %w; moving the damaged store aside failed: %w", dir, err, aerr)
	}
	s, err2 := open(ctx, dir, cfg)
	if err2 != nil {
		return nil, fmt.Errorf("open blockstore %s after moving its damaged copy aside: %w", dir, err2)
	}
	where := []any{"moved_to", aside}
	if aside == "" {
		where = []any{"removed", "its contents (a mount point cannot be moved)"}
	}
	s.base.Error("block store was damaged and could not be opened; it was set aside and the store starts empty",
		append([]any{"dir", dir, "err", err, "older_copies_removed", removedOld}, where...)...)
	return s, nil
}

// open is one attempt at Open. Its failures caused by what dir holds are
// damageErrors; what it and badger log is held until it succeeds.
func open(ctx context.Context, dir string, cfg config) (*Store, error) {
	base := cfg.logger.With("component", "blockstore")
	h := &hold{on: true}
	s := &Store{
		dir:  dir,
		cfg:  cfg,
		base: base,
		hold: h,
		log:  slog.New(holdHandler{base.Handler(), h}),
		idx:  newIndex(),
		kick: make(chan struct{}, 1),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		h.discard(false)
		return nil, damaged(fmt.Errorf("%s is not a directory (%s)", dir, fi.Mode().Type()))
	}
	err := s.openDB(ctx)
	if err != nil {
		if isDamage(err) {
			h.discard(false)
		} else {
			h.release()
		}
		return nil, err
	}
	h.release()
	go s.loop()

	st := s.Stats()
	s.log.Info("opened block store", "dir", dir, "blocks", st.Blocks, "bytes", st.Bytes,
		"quota", st.Quota, "pinned_ids", st.PinnedIDs)
	return s, nil
}

// openDB creates dir, checks its tables, opens badger and loads the index.
func (s *Store) openDB(ctx context.Context) error {
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			err = fmt.Errorf("%w: %w", ErrNoSpace, err)
		}
		return err
	}
	if err := s.checkSpace(0, true); err != nil {
		return err
	}
	if err := checkTables(ctx, s.dir, badgerOptions(s.dir, s.cfg, s.log)); err != nil {
		return err
	}
	var db *badger.DB
	err := protect("open badger", func() (err error) {
		db, err = badger.Open(badgerOptions(s.dir, s.cfg, s.log))
		return err
	})
	if err != nil {
		return damaged(translate(err))
	}
	s.db = db
	var evicted []flat.BlockID
	err = protect("load index", func() (err error) {
		evicted, err = s.load(ctx)
		return err
	})
	if err != nil {
		if cerr := closeWithin(s.cfg.closeTimeout, db.Close); cerr != nil {
			s.log.Warn("closing the store after a failed open", "err", translate(cerr))
		}
		return damaged(err)
	}
	s.notify(evicted)
	return nil
}

// closeWithin runs fn and waits at most d for it. When fn does not return
// in time its goroutine is left behind (badger's Close can retry a failed
// memtable flush forever), and closeWithin returns ErrCloseTimeout.
func closeWithin(d time.Duration, fn func() error) error {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("%w after %v", ErrCloseTimeout, d)
	}
}

func badgerOptions(dir string, cfg config, log *slog.Logger) badger.Options {
	return badger.DefaultOptions(dir).
		WithLogger(badgerLogger{log.With("backend", "badger")}).
		WithMetricsEnabled(false).  // expvar metrics are process-global
		WithDetectConflicts(false). // writes are serialized by Store.wmu
		WithNumVersionsToKeep(1).
		WithSyncWrites(cfg.syncWrites).
		WithCompression(options.None). // block bytes live in the value log, uncompressed anyway
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithMemTableSize(cfg.memTableSize).
		WithNumMemtables(2).
		WithBaseTableSize(baseTableSize(cfg.memTableSize)).
		WithValueLogFileSize(cfg.vlogFileSize).
		WithValueThreshold(valueThreshold).
		WithNumCompactors(2)
}

// Close persists the access order, stops the background goroutine and closes
// the database. Operations after Close return ErrClosed; further calls to
// Close return the first call's result.
//
// Close gives up after the close timeout (WithCloseTimeout) and returns
// ErrCloseTimeout: badger retries a memtable flush that fails (the
// directory was removed, the disk failed or turned read-only) once a second
// forever, and a daemon must still stop. The abandoned goroutine, badger's
// files and its further log lines stay behind until the process exits,
// which is what the caller is expected to do next; the writes not yet
// flushed are lost. One error line says so.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.hold.start()
		err := closeWithin(s.cfg.closeTimeout, s.close)
		if !errors.Is(err, ErrCloseTimeout) {
			s.hold.release()
			s.closeErr = err
			return
		}
		n, first := s.hold.discard(true)
		s.base.Error("block store did not close in time and was abandoned; writes not yet flushed are lost (has its disk failed?)",
			"dir", s.dir, "timeout", s.cfg.closeTimeout, "badger_messages", n, "first_badger_error", first)
		s.closeErr = fmt.Errorf("close blockstore %s: %w", s.dir, err)
	})
	return s.closeErr
}

func (s *Store) close() error {
	close(s.stop)
	<-s.done
	s.closeMu.Lock()
	s.closed = true
	s.closeMu.Unlock()

	var errs []error
	if err := s.flushAccess(); err != nil {
		errs = append(errs, err)
	}
	if err := s.db.Close(); err != nil {
		errs = append(errs, translate(err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close blockstore %s: %w", s.dir, err)
	}
	return nil
}

// Sync makes every block stored so far durable against a power failure.
// A Put that returned survives the process being killed without it (see
// the package doc); a machine that loses power may lose the last ones.
// Sync flushes the whole file system holding the store (syncfs): badger
// does not sync the value-log files it has rotated out, so syncing its open
// files alone would not cover every block.
func (s *Store) Sync(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	release, err := s.enter()
	if err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	defer release()
	f, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", s.dir, translate(err))
	}
	return nil
}

// enter guards an operation against Close; call release when done with db.
func (s *Store) enter() (release func(), err error) {
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		return nil, ErrClosed
	}
	return s.closeMu.RUnlock, nil
}

// Put stores data under id after checking that data hashes to id; if it does
// not, Put returns ErrCorrupt and stores nothing. Putting a stored block only
// marks it as used. If the quota requires, Put first evicts least recently
// used unpinned blocks; if that cannot make room it returns ErrFull and
// evicts nothing. Put returns ErrNoSpace rather than let the file system fill
// up, and ErrTooLarge for a block larger than the value-log file size. Put
// does not keep data.
func (s *Store) Put(ctx context.Context, id flat.BlockID, data []byte) error {
	if err := s.checkSize(len(data)); err != nil {
		return fmt.Errorf("put %s: %w", id, err)
	}
	if !id.Verify(data) {
		return fmt.Errorf("put %s: data hashes to %s: %w", id, flat.Sum(data), ErrCorrupt)
	}
	evicted, err := s.put(ctx, []Block{{ID: id, Data: data}})
	s.notify(evicted)
	if err != nil {
		return fmt.Errorf("put %s: %w", id, err)
	}
	return nil
}

// PutMany is Put for several blocks, written in one badger WriteBatch. All
// blocks are verified first; if any does not match its ID, nothing is
// stored. The quota is checked for the batch as a whole: if the new blocks
// do not all fit, PutMany returns ErrFull and stores none. On other errors
// some of the blocks may have been stored.
func (s *Store) PutMany(ctx context.Context, blocks []Block) error {
	for i, b := range blocks {
		if err := s.checkSize(len(b.Data)); err != nil {
			return fmt.Errorf("put block %d (%s): %w", i, b.ID, err)
		}
		if !b.ID.Verify(b.Data) {
			return fmt.Errorf("put block %d (%s): data hashes to %s: %w", i, b.ID, flat.Sum(b.Data), ErrCorrupt)
		}
	}
	evicted, err := s.put(ctx, blocks)
	s.notify(evicted)
	if err != nil {
		return fmt.Errorf("put %d blocks: %w", len(blocks), err)
	}
	return nil
}

func (s *Store) checkSize(n int) error {
	if int64(n) > s.cfg.vlogFileSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, n, s.cfg.vlogFileSize)
	}
	return nil
}

// put stores verified blocks and returns the IDs it evicted, which the
// caller reports once no lock is held.
func (s *Store) put(ctx context.Context, blocks []Block) (evicted []flat.BlockID, err error) {
	release, err := s.enter()
	if err != nil {
		return nil, err
	}
	defer release()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	s.mu.Lock()
	keep := make(map[flat.BlockID]struct{}, len(blocks))
	var fresh []Block
	var need int64
	for _, b := range blocks {
		if _, dup := keep[b.ID]; dup {
			continue
		}
		keep[b.ID] = struct{}{}
		if e := s.idx.entries[b.ID]; e != nil {
			s.idx.touch(e)
			continue
		}
		fresh = append(fresh, b)
		need += int64(len(b.Data))
	}
	if len(fresh) == 0 {
		s.mu.Unlock()
		return nil, nil
	}
	victims, err := s.idx.victims(need, s.cfg.quota, keep)
	if err == nil {
		err = s.checkSpace(need+entryOverhead*int64(len(fresh)), false)
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	for _, v := range victims {
		s.idx.remove(v)
	}
	added := make([]*entry, len(fresh))
	for i, b := range fresh {
		added[i] = &entry{id: b.ID, size: int64(len(b.Data)), seq: s.idx.nextSeq()}
	}
	s.mu.Unlock()

	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	err = func() error {
		for _, v := range victims {
			if err := wb.Delete(blockKey(prefixData, v.id)); err != nil {
				return err
			}
			if err := wb.Delete(blockKey(prefixAccess, v.id)); err != nil {
				return err
			}
		}
		for i, b := range fresh {
			if err := wb.Set(blockKey(prefixData, b.ID), b.Data); err != nil {
				return err
			}
			if err := wb.Set(blockKey(prefixAccess, b.ID), encodeAccess(added[i].seq, added[i].size)); err != nil {
				return err
			}
		}
		return wb.Flush()
	}()
	if err == nil {
		s.mu.Lock()
		for _, e := range added {
			s.idx.add(e)
		}
		s.mu.Unlock()
		evicted = make([]flat.BlockID, len(victims))
		for i, v := range victims {
			evicted[i] = v.id
		}
		if len(victims) > 0 {
			s.log.Debug("evicted blocks", "count", len(victims), "for_bytes", need)
		}
		return evicted, nil
	}

	// A WriteBatch is not atomic once it spans several transactions: find out
	// what actually landed so the index matches the database.
	present, perr := s.present(append(entryIDs(victims), entryIDs(added)...))
	s.mu.Lock()
	for _, v := range victims {
		if perr != nil || present[v.id] {
			s.idx.add(v) // when unsure, keep it: a Get of a missing block repairs the index
		} else {
			evicted = append(evicted, v.id)
		}
	}
	for _, e := range added {
		if perr == nil && present[e.id] {
			s.idx.add(e)
			s.idx.dirty[e.id] = struct{}{} // its access record may be missing
		}
	}
	s.mu.Unlock()
	return evicted, translate(err)
}

// present reports which of ids have block bytes in the database.
func (s *Store) present(ids []flat.BlockID) (map[flat.BlockID]bool, error) {
	out := make(map[flat.BlockID]bool, len(ids))
	err := s.db.View(func(txn *badger.Txn) error {
		for _, id := range ids {
			_, err := txn.Get(blockKey(prefixData, id))
			switch {
			case err == nil:
				out[id] = true
			case !errors.Is(err, badger.ErrKeyNotFound):
				return err
			}
		}
		return nil
	})
	return out, err
}

func entryIDs(es []*entry) []flat.BlockID {
	ids := make([]flat.BlockID, len(es))
	for i, e := range es {
		ids[i] = e.id
	}
	return ids
}

// Get returns the bytes of block id, or ErrNotFound. The bytes are hashed
// again before they are returned: if they no longer match id, Get removes the
// stored copy and returns ErrCorrupt, never the bytes. Get marks the block as
// used. The returned slice belongs to the caller.
func (s *Store) Get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	data, removed, err := s.get(ctx, id)
	if removed {
		s.notify([]flat.BlockID{id})
	}
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", id, err)
	}
	return data, nil
}

func (s *Store) get(ctx context.Context, id flat.BlockID) (data []byte, removed bool, err error) {
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	release, err := s.enter()
	if err != nil {
		return nil, false, err
	}
	defer release()

	s.mu.Lock()
	e := s.idx.entries[id]
	if e != nil {
		s.idx.touch(e)
		s.kickIfDirty()
	}
	s.mu.Unlock()
	if e == nil {
		return nil, false, ErrNotFound
	}

	err = s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(blockKey(prefixData, id))
		if err != nil {
			return err
		}
		data, err = item.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		// The index outlived the data (a write whose outcome was unknown).
		s.mu.Lock()
		if removed = s.idx.entries[id] == e; removed {
			s.idx.remove(e)
		}
		s.mu.Unlock()
		return nil, removed, ErrNotFound
	}
	if err != nil {
		return nil, false, translate(err)
	}
	if !id.Verify(data) {
		removed = s.dropCorrupt(e)
		return nil, removed, fmt.Errorf("stored bytes hash to %s, copy removed: %w", flat.Sum(data), ErrCorrupt)
	}
	return data, false, nil
}

// dropCorrupt removes the stored copy of e, which failed verification. Its
// pins stay: they protect the block once a good copy arrives.
func (s *Store) dropCorrupt(e *entry) bool {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	if s.idx.entries[e.id] != e {
		s.mu.Unlock()
		return false // replaced or removed meanwhile
	}
	s.idx.remove(e)
	s.mu.Unlock()

	err := s.checkSpace(0, true)
	if err == nil {
		err = s.db.Update(func(txn *badger.Txn) error {
			if err := txn.Delete(blockKey(prefixData, e.id)); err != nil {
				return err
			}
			return txn.Delete(blockKey(prefixAccess, e.id))
		})
	}
	if err != nil {
		// The bad copy stays on disk; it is out of the index, a later Put
		// overwrites it, and after a restart Get catches it again.
		s.log.Error("corrupt block: removing stored copy failed", "block", e.id, "err", translate(err))
	} else {
		s.log.Warn("corrupt block removed", "block", e.id)
	}
	return true
}

// Has reports whether block id is stored. It consults the in-memory index
// only and does not count as a use; Get still verifies the bytes.
func (s *Store) Has(ctx context.Context, id flat.BlockID) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	release, err := s.enter()
	if err != nil {
		return false, err
	}
	defer release()
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.idx.entries[id]
	return ok, nil
}

// Size returns the size in bytes of stored block id, or ErrNotFound.
func (s *Store) Size(id flat.BlockID) (int64, error) {
	release, err := s.enter()
	if err != nil {
		return 0, fmt.Errorf("size %s: %w", id, err)
	}
	defer release()
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.idx.entries[id]
	if e == nil {
		return 0, fmt.Errorf("size %s: %w", id, ErrNotFound)
	}
	return e.size, nil
}

// Stats returns a snapshot of the store's usage. It works after Close too.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{
		Blocks:       len(s.idx.entries),
		Bytes:        s.idx.used,
		Quota:        s.cfg.quota,
		PinnedBlocks: len(s.idx.entries) - s.idx.lru.Len(),
		PinnedBytes:  s.idx.pinnedBytes,
		PinnedIDs:    len(s.idx.pins),
		Reserved:     s.reserved,
	}
}

// Delete removes block id. Deleting an absent block is not an error;
// deleting a pinned one returns ErrPinned and keeps it.
func (s *Store) Delete(ctx context.Context, id flat.BlockID) error {
	removed, err := s.delete(ctx, id)
	if removed {
		s.notify([]flat.BlockID{id})
	}
	if err != nil {
		return fmt.Errorf("delete %s: %w", id, err)
	}
	return nil
}

func (s *Store) delete(ctx context.Context, id flat.BlockID) (bool, error) {
	release, err := s.enter()
	if err != nil {
		return false, err
	}
	defer release()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return false, err
	}

	s.mu.Lock()
	e := s.idx.entries[id]
	if e == nil {
		s.mu.Unlock()
		return false, nil
	}
	if n := s.idx.pins[id]; n > 0 {
		s.mu.Unlock()
		return false, fmt.Errorf("%w (%d pins)", ErrPinned, n)
	}
	if err := s.checkSpace(0, true); err != nil {
		s.mu.Unlock()
		return false, err
	}
	s.idx.remove(e)
	s.mu.Unlock()

	err = s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Delete(blockKey(prefixData, id)); err != nil {
			return err
		}
		return txn.Delete(blockKey(prefixAccess, id))
	})
	if err != nil {
		s.mu.Lock()
		s.idx.add(e) // the transaction is atomic: nothing was deleted
		s.mu.Unlock()
		return false, translate(err)
	}
	return true, nil
}

// notify calls the OnEvict hook; callers hold no lock.
func (s *Store) notify(ids []flat.BlockID) {
	if s.cfg.onEvict == nil {
		return
	}
	for _, id := range ids {
		s.cfg.onEvict(id)
	}
}

// checkSpace refuses a write of need bytes that would leave less than the
// configured reserve free (half of it for metadata writes). Badger writes
// through memory-mapped files, and a page fault on a full file system kills
// the process with SIGBUS instead of returning an error. Block writes also
// leave the unwritten part of the reservations free (Reserve); their
// callers hold mu.
func (s *Store) checkSpace(need int64, meta bool) error {
	free, ok, err := freeSpace(s.dir)
	if err != nil {
		// Without a number the guard cannot help; badger reports what it can.
		s.log.Warn("cannot determine free space", "dir", s.dir, "err", err)
		return nil
	}
	if !ok {
		return nil
	}
	reserve, pending := s.cfg.minFree, int64(0)
	if meta {
		reserve /= 2
	} else {
		pending = s.pending
	}
	if free-need-pending < reserve {
		return spaceError(free, s.dir, need, pending, reserve)
	}
	return nil
}

// kickIfDirty wakes loop to persist the access order once enough has
// changed. Callers hold mu.
func (s *Store) kickIfDirty() {
	if len(s.idx.dirty) < accessFlushBatch {
		return
	}
	select {
	case s.kick <- struct{}{}:
	default: // a flush is already requested
	}
}

// loop persists the access order and runs value-log GC until Close.
func (s *Store) loop() {
	defer close(s.done)
	flush := time.NewTicker(accessFlushInterval)
	defer flush.Stop()
	var gcTick <-chan time.Time
	if s.cfg.gcInterval > 0 {
		t := time.NewTicker(s.cfg.gcInterval)
		defer t.Stop()
		gcTick = t.C
	}
	for {
		select {
		case <-s.stop:
			return
		case <-flush.C:
			s.background("persist access order", s.flushAccess)
		case <-s.kick:
			s.background("persist access order", s.flushAccess)
		case <-gcTick:
			s.background("value log gc", s.collectGarbage)
		}
	}
}

func (s *Store) background(what string, fn func() error) {
	release, err := s.enter()
	if err != nil {
		return
	}
	defer release()
	if err := fn(); err != nil {
		s.log.Warn(what+" failed", "err", err)
	}
}

// flushAccess writes the last-access sequence of every touched block.
func (s *Store) flushAccess() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()

	s.mu.Lock()
	if len(s.idx.dirty) == 0 {
		s.mu.Unlock()
		return nil
	}
	if err := s.checkSpace(0, true); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("persist access order: %w", err)
	}
	type rec struct {
		id   flat.BlockID
		seq  uint64
		size int64
	}
	recs := make([]rec, 0, len(s.idx.dirty))
	for id := range s.idx.dirty {
		if e := s.idx.entries[id]; e != nil {
			recs = append(recs, rec{id, e.seq, e.size})
		}
	}
	dirty := s.idx.dirty
	s.idx.dirty = make(map[flat.BlockID]struct{})
	s.mu.Unlock()

	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	err := func() error {
		for _, r := range recs {
			if err := wb.Set(blockKey(prefixAccess, r.id), encodeAccess(r.seq, r.size)); err != nil {
				return err
			}
		}
		return wb.Flush()
	}()
	if err != nil {
		s.mu.Lock()
		for id := range dirty {
			if s.idx.entries[id] != nil {
				s.idx.dirty[id] = struct{}{}
			}
		}
		s.mu.Unlock()
		return fmt.Errorf("persist access order of %d blocks: %w", len(recs), translate(err))
	}
	return nil
}

// collectGarbage rewrites value-log files that are mostly garbage, which is
// how the space of deleted and evicted blocks returns to the file system.
//
// Badger learns which value-log bytes are garbage only when a compaction
// drops the keys that pointed at them. A cache that deletes or evicts and
// then goes quiet writes no memtable full enough to flush, so nothing is
// compacted and RunValueLogGC finds nothing to rewrite, however much was
// removed. So when the blocks removed since the last compaction this
// routine forced could fill half a value-log file (less cannot make any
// file worth a rewrite at gcDiscardRatio) and badger still finds nothing,
// it compacts (compactDeleted) and tries again.
func (s *Store) collectGarbage() error {
	// A rewrite copies up to one value-log file before deleting the old one.
	if err := s.checkSpace(s.cfg.vlogFileSize, true); err != nil {
		s.log.Debug("value log gc skipped", "err", err)
		return nil
	}
	rewrote, err := s.rewriteValueLog()
	if err != nil || rewrote {
		return err
	}
	s.mu.Lock()
	garbage := s.idx.garbage
	if float64(garbage) < gcDiscardRatio*float64(s.cfg.vlogFileSize) {
		s.mu.Unlock()
		return nil
	}
	s.idx.garbage = 0
	s.mu.Unlock()
	if err := s.compactDeleted(); err != nil {
		s.mu.Lock()
		s.idx.garbage += garbage
		s.mu.Unlock()
		return err
	}
	_, err = s.rewriteValueLog()
	return err
}

// rewriteValueLog runs badger's value-log GC until it has nothing to
// rewrite (or gcMaxRounds), and reports whether it rewrote a file.
//
// Each round holds wmu: a rewrite starts by reading the memtable's highest
// version (DB.MaxVersion), which badger's write goroutine updates without
// a lock, so a rewrite beside a write is a data race (badger v4.9.6). Writes
// wait for one file's rewrite at most (its live half or less, at
// gcDiscardRatio), and go on between rounds.
func (s *Store) rewriteValueLog() (bool, error) {
	rewrote := false
	for range gcMaxRounds {
		select {
		case <-s.stop:
			return rewrote, nil
		default:
		}
		s.wmu.Lock()
		err := s.db.RunValueLogGC(gcDiscardRatio)
		s.wmu.Unlock()
		switch {
		case err == nil:
			rewrote = true
		case errors.Is(err, badger.ErrNoRewrite), errors.Is(err, badger.ErrRejected):
			return rewrote, nil
		default:
			return rewrote, translate(err)
		}
	}
	return rewrote, nil
}

// compactDeleted flushes the memtables to level 0 and compacts level 0
// into the levels below, where the keys of removed blocks are dropped and
// badger counts their value-log bytes as garbage. Badger exposes both only
// through DropPrefix, so it drops compactKey, written just before. Writes
// wait on wmu meanwhile: DropPrefix refuses concurrent writes
// (ErrBlockedWrites) rather than queueing them. The keys are small (block
// bytes live in the value log), so this takes milliseconds.
func (s *Store) compactDeleted() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(compactKey, nil) }); err != nil {
		return fmt.Errorf("compact deleted blocks: %w", translate(err))
	}
	if err := s.db.DropPrefix(compactKey); err != nil {
		return fmt.Errorf("compact deleted blocks: %w", translate(err))
	}
	s.compactions.Add(1)
	return nil
}

// load checks the format version and builds the index from the database,
// repairing what an interrupted write may have left behind. If the store
// holds more than the quota (it was lowered), load evicts down to it and
// returns the evicted IDs.
func (s *Store) load(ctx context.Context) ([]flat.BlockID, error) {
	if err := s.checkFormat(); err != nil {
		return nil, err
	}
	type access struct {
		seq  uint64
		size int64
	}
	accessOf := make(map[flat.BlockID]access)
	var entries []*entry
	var stale [][]byte // keys to delete
	s.mu.Lock()
	defer s.mu.Unlock()

	scan := func(txn *badger.Txn, prefix byte, values bool, fn func(id flat.BlockID, item *badger.Item) error) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = values
		opts.Prefix = []byte{prefix}
		it := txn.NewIterator(opts)
		defer it.Close()
		n := 0
		for it.Rewind(); it.Valid(); it.Next() {
			if n++; n%4096 == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			item := it.Item()
			id, ok := idFromKey(item.Key())
			if !ok {
				s.log.Warn("ignoring unexpected key", "key", fmt.Sprintf("%q", item.Key()))
				continue
			}
			if err := fn(id, item); err != nil {
				return err
			}
		}
		return nil
	}
	err := s.db.View(func(txn *badger.Txn) error {
		err := scan(txn, prefixAccess, true, func(id flat.BlockID, item *badger.Item) error {
			return item.Value(func(v []byte) error {
				if seq, size, ok := decodeAccess(v); ok {
					accessOf[id] = access{seq, size}
				} else {
					stale = append(stale, item.KeyCopy(nil))
				}
				return nil
			})
		})
		if err != nil {
			return err
		}
		err = scan(txn, prefixPin, true, func(id flat.BlockID, item *badger.Item) error {
			return item.Value(func(v []byte) error {
				if n, ok := decodePins(v); ok && n > 0 {
					s.idx.pins[id] = n
				} else {
					stale = append(stale, item.KeyCopy(nil))
				}
				return nil
			})
		})
		if err != nil {
			return err
		}
		return scan(txn, prefixData, false, func(id flat.BlockID, item *badger.Item) error {
			if a, ok := accessOf[id]; ok {
				delete(accessOf, id)
				entries = append(entries, &entry{id: id, size: a.size, seq: a.seq})
				return nil
			}
			// Bytes without an access record: a batch interrupted midway.
			// Read them to learn the size; they count as least recently used.
			data, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			if !id.Verify(data) {
				s.log.Warn("corrupt block removed", "block", id)
				stale = append(stale, item.KeyCopy(nil))
				return nil
			}
			entries = append(entries, &entry{id: id, size: int64(len(data))})
			s.idx.dirty[id] = struct{}{}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("load index: %w", translate(err))
	}
	for id := range accessOf { // access records without bytes
		stale = append(stale, blockKey(prefixAccess, id))
	}

	slices.SortFunc(entries, func(a, b *entry) int { return cmp.Compare(a.seq, b.seq) })
	for _, e := range entries {
		s.idx.add(e)
		s.idx.seq = max(s.idx.seq, e.seq)
	}

	victims, err := s.idx.victims(0, s.cfg.quota, nil)
	if err != nil {
		s.log.Warn("store exceeds its quota and cannot shrink", "err", err)
		victims = nil
	}
	for _, v := range victims {
		s.idx.remove(v)
		stale = append(stale, blockKey(prefixData, v.id), blockKey(prefixAccess, v.id))
	}
	if len(stale) > 0 {
		if err := s.deleteKeys(stale); err != nil {
			return nil, fmt.Errorf("remove %d stale keys: %w", len(stale), err)
		}
		s.log.Info("cleaned up store", "stale_keys", len(stale), "evicted_over_quota", len(victims))
	}
	return entryIDs(victims), nil
}

// checkFormat stamps a new store with formatVersion and refuses a directory
// that holds another format or another badger database.
func (s *Store) checkFormat() error {
	return s.db.Update(func(txn *badger.Txn) error {
		item, err := txn.Get(versionKey)
		if errors.Is(err, badger.ErrKeyNotFound) {
			opts := badger.DefaultIteratorOptions
			opts.PrefetchValues = false
			it := txn.NewIterator(opts)
			it.Rewind()
			empty := !it.Valid()
			it.Close()
			if !empty {
				return fmt.Errorf("%s holds a badger database that is not a block store: %w", s.dir, ErrIncompatible)
			}
			return txn.Set(versionKey, []byte(formatVersion))
		}
		if err != nil {
			return translate(err)
		}
		return item.Value(func(v []byte) error {
			if string(v) != formatVersion {
				return fmt.Errorf("%s holds block store format %q, want %q: %w", s.dir, v, formatVersion, ErrIncompatible)
			}
			return nil
		})
	})
}

func (s *Store) deleteKeys(keys [][]byte) error {
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range keys {
		if err := wb.Delete(k); err != nil {
			return translate(err)
		}
	}
	return translate(wb.Flush())
}
