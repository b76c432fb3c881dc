package blockstore

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/shoal-project/shoal/flat"
)

// Option configures Open.
type Option func(*config) error

type config struct {
	quota        int64
	onEvict      func(flat.BlockID)
	logger       *slog.Logger
	gcInterval   time.Duration
	minFree      int64 // -1: derive from the badger sizes
	memTableSize int64
	vlogFileSize int64
	closeTimeout time.Duration
	// syncWrites makes badger fsync every write. The store runs without:
	// the benchmark that compares both sets it (see the package doc).
	syncWrites bool
}

const (
	defaultGCInterval   = 5 * time.Minute
	defaultMemTableSize = 8 << 20
	defaultVlogFileSize = 64 << 20
	defaultCloseTimeout = 5 * time.Second

	minMemTableSize = 1 << 20
	maxMemTableSize = 1 << 30
	minVlogFileSize = 1 << 20 // badger's limits
	maxVlogFileSize = 2<<30 - 1
)

func defaultConfig() config {
	return config{
		logger:       slog.Default(),
		gcInterval:   defaultGCInterval,
		minFree:      -1,
		memTableSize: defaultMemTableSize,
		vlogFileSize: defaultVlogFileSize,
		closeTimeout: defaultCloseTimeout,
	}
}

// derive fills in the defaults that depend on other settings.
func (c *config) derive() {
	if c.minFree < 0 {
		c.minFree = defaultMinFree(c.memTableSize, c.vlogFileSize)
	}
}

// defaultMinFree is the space badger may still need after the store stops
// accepting blocks: a memtable being flushed to an SST plus the WAL of its
// successor, a value-log file rewritten by GC, compaction output, and slack
// for the file headers.
func defaultMinFree(memTable, vlogFile int64) int64 {
	return 2*memTable + vlogFile + 4*baseTableSize(memTable) + 1<<20
}

func baseTableSize(memTable int64) int64 { return min(2<<20, memTable/2) }

// WithQuota limits the bytes of block data kept in the store; a Put that
// would exceed it evicts the least recently used unpinned blocks first. The
// quota counts block bytes only: badger's own overhead and value-log garbage
// awaiting GC come on top, so leave the file system some room beyond it.
// Default 0: unlimited.
func WithQuota(bytes int64) Option {
	return func(c *config) error {
		if bytes < 0 {
			return fmt.Errorf("quota %d: must not be negative", bytes)
		}
		c.quota = bytes
		return nil
	}
}

// WithOnEvict sets a hook called with the ID of every block that leaves the
// store: LRU eviction, Delete, or removal of a corrupt copy. It is called
// synchronously on the goroutine that removed the block, after the removal is
// committed and with no store lock held (so it may call the Store), and must
// not block for long: hand network work such as withdrawing a DHT provider
// record to another goroutine. Default: none.
func WithOnEvict(fn func(flat.BlockID)) Option {
	return func(c *config) error {
		c.onEvict = fn
		return nil
	}
}

// WithLogger sets the logger; the store adds component=blockstore, and
// badger's own warnings and errors are routed to it with backend=badger
// (badger's info and debug chatter is dropped). Default: slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("logger must not be nil")
		}
		c.logger = l
		return nil
	}
}

// WithGCInterval sets how often badger's value log is garbage-collected to
// reclaim the space of deleted and evicted blocks; 0 disables it.
// Default 5 minutes.
func WithGCInterval(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("gc interval %v: must not be negative", d)
		}
		c.gcInterval = d
		return nil
	}
}

// WithMinFreeSpace sets the free space, in bytes, that Put leaves on the file
// system for badger's background work (see the package doc for why running
// out would crash the process). Small metadata writes (pins, deletes, access
// order) may use half of it, and Open requires half of it to be free.
// Default: 2×memtable + value-log file size + 4×table size + 1 MiB, which is
// about 89 MiB with the default sizes.
func WithMinFreeSpace(bytes int64) Option {
	return func(c *config) error {
		if bytes < 0 {
			return fmt.Errorf("min free space %d: must not be negative", bytes)
		}
		c.minFree = bytes
		return nil
	}
}

// WithMemTableSize sets badger's memtable size, which bounds the memory used
// for buffered writes (the store keeps two) and the size of L0 tables.
// Range 1 MiB to 1 GiB. Default 8 MiB.
func WithMemTableSize(bytes int64) Option {
	return func(c *config) error {
		if bytes < minMemTableSize || bytes > maxMemTableSize {
			return fmt.Errorf("memtable size %d: want %d to %d", bytes, minMemTableSize, maxMemTableSize)
		}
		c.memTableSize = bytes
		return nil
	}
}

// WithValueLogFileSize sets the size at which badger starts a new value-log
// file; block bytes live in the value log, and GC reclaims space one file at
// a time. It is also the largest block the store accepts (ErrTooLarge).
// Range 1 MiB to 2 GiB-1. Default 64 MiB.
func WithValueLogFileSize(bytes int64) Option {
	return func(c *config) error {
		if bytes < minVlogFileSize || bytes > maxVlogFileSize {
			return fmt.Errorf("value log file size %d: want %d to %d", bytes, minVlogFileSize, maxVlogFileSize)
		}
		c.vlogFileSize = bytes
		return nil
	}
}

// WithCloseTimeout bounds how long Close waits for the database to close
// before it gives up and returns ErrCloseTimeout (see Close). A daemon that
// must stop within some time on SIGTERM gives the store part of it.
// Default 5 seconds.
func WithCloseTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("close timeout %v: must be positive", d)
		}
		c.closeTimeout = d
		return nil
	}
}

// withSyncWrites makes badger fsync its logs on every write, for the
// benchmark that measures what that would cost.
func withSyncWrites() Option {
	return func(c *config) error {
		c.syncWrites = true
		return nil
	}
}
