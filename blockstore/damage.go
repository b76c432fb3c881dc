package blockstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/dgraph-io/badger/v4/table"
	"github.com/dgraph-io/ristretto/v2/z"
	"golang.org/x/sys/unix"
)

// damageSuffix is what a damaged store directory is renamed to, beside
// itself, followed by the UTC time: blocks.damaged-20060102T150405Z.
const damageSuffix = ".damaged-"

// damageError marks an Open failure caused by what the directory holds
// (garbage, truncated or corrupt files, a file where the directory should
// be), as opposed to the environment (permissions, a full or read-only file
// system, another process holding the store). Open moves a damaged
// directory aside and starts empty; environmental failures are returned.
type damageError struct{ err error }

func (e *damageError) Error() string { return e.err.Error() }
func (e *damageError) Unwrap() error { return e.err }

// environmentErrnos are the errors that say the environment, not the
// directory's contents, is at fault: moving the directory aside would not
// help, and for a lock held by a live process it would be wrong. Badger
// flattens the errors it wraps into text (y.Wrap without its debug mode), so
// they are matched by their message as well as by errors.Is.
var environmentErrnos = []syscall.Errno{
	syscall.EACCES, syscall.EPERM, syscall.EROFS, syscall.ENOSPC, syscall.EDQUOT,
	syscall.EWOULDBLOCK, syscall.EMFILE, syscall.ENFILE, syscall.ENOMEM,
}

// badgerLockText is how badger says another process has the directory open.
const badgerLockText = "Cannot acquire directory lock"

// isDamage reports whether an Open failure is damage to move aside.
func isDamage(err error) bool {
	var d *damageError
	if !errors.As(err, &d) {
		return false
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, ErrIncompatible) || errors.Is(err, ErrNoSpace) {
		return false
	}
	msg := err.Error()
	if strings.Contains(msg, badgerLockText) {
		return false
	}
	for _, e := range environmentErrnos {
		if errors.Is(err, e) || strings.Contains(msg, e.Error()) {
			return false
		}
	}
	return true
}

// damaged wraps err as damage unless it is nil.
func damaged(err error) error {
	if err == nil {
		return nil
	}
	return &damageError{err}
}

// protect runs fn and turns a panic in it into a damage error: badger
// panics, rather than failing, on some malformed files.
func protect(what string, fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			msg := strings.Join(strings.Fields(fmt.Sprint(r)), " ") // badger's panics span lines
			if len(msg) > 300 {
				msg = msg[:300] + "…"
			}
			err = &damageError{fmt.Errorf("%s: panic: %s", what, msg)}
		}
	}()
	return fn()
}

// checkTables opens every table (.sst) the manifest lists with badger's own
// reader and verifies its checksums. Badger opens tables on goroutines of
// its own and panics there on a malformed one, which no caller can recover
// from; here the same failure is an error, on this goroutine. The tables
// hold only keys and small records, so reading them costs little next to
// the blocks. A missing or unreadable manifest, or a table it lists that is
// missing, is left for badger to report.
func checkTables(ctx context.Context, dir string, opt badger.Options) error {
	f, err := os.Open(filepath.Join(dir, badger.ManifestFilename))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return damaged(err)
	}
	var m badger.Manifest
	err = protect("read manifest", func() (err error) {
		m, _, err = badger.ReplayManifestFile(f, opt.ExternalMagicVersion, opt)
		return err
	})
	f.Close()
	if err != nil {
		return damaged(fmt.Errorf("read manifest: %w", err))
	}
	for id, tf := range m.Tables {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := table.NewFilename(id, dir)
		if tf.KeyID != 0 {
			continue // encrypted: not a block store's; badger reports it
		}
		if _, err := os.Stat(p); err != nil {
			continue
		}
		err := protect("check table "+p, func() error {
			mf, err := z.OpenMmapFile(p, os.O_RDONLY, 0)
			if err != nil {
				return damaged(fmt.Errorf("open table %s: %w", p, err))
			}
			t, err := table.OpenTable(mf, table.Options{ReadOnly: true, ChkMode: options.OnTableRead,
				Compression: tf.Compression, BlockSize: opt.BlockSize})
			if err != nil {
				return damaged(fmt.Errorf("table %s: %w", p, err))
			}
			return t.Close(-1)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// probeLock takes the directory lock badger takes (flock on the directory)
// and returns its release, or an error if another open store holds it. It
// guards moving a directory aside: a store another process (or this one)
// has open is never damage, whatever its Open failed with.
func probeLock(dir string) (release func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s is in use by another open store: %w", dir, err)
	}
	return func() { f.Close() }, nil // closing the descriptor drops the lock
}

// setAside moves the damaged store at dir out of the way, to
// <dir>.damaged-<UTC time> beside it, and removes older damaged copies
// first: one copy is kept for a post-mortem, and repeated damage cannot
// fill the disk with them. A directory that cannot be renamed (it is a
// mount point) has its contents removed instead; aside is then "".
func setAside(dir string, now time.Time) (aside string, removedOld int, err error) {
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real // a symlinked cache is set aside where it lives
	}
	parent, base := filepath.Split(dir)
	if parent == "" {
		parent = "."
	}
	ents, err := os.ReadDir(parent)
	if err != nil {
		return "", 0, fmt.Errorf("list %s: %w", parent, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), base+damageSuffix) {
			if err := os.RemoveAll(filepath.Join(parent, e.Name())); err != nil {
				return "", removedOld, fmt.Errorf("remove old damaged copy: %w", err)
			}
			removedOld++
		}
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return "", removedOld, err
	}
	if fi.IsDir() {
		release, err := probeLock(dir)
		if err != nil {
			return "", removedOld, err
		}
		defer release()
	}
	aside = dir + damageSuffix + now.UTC().Format("20060102T150405Z")
	err = os.Rename(dir, aside)
	if errors.Is(err, syscall.EBUSY) || errors.Is(err, syscall.EXDEV) {
		return "", removedOld, clearDir(dir)
	}
	if err != nil {
		return "", removedOld, fmt.Errorf("move %s aside: %w", dir, err)
	}
	return aside, removedOld, nil
}

// clearDir removes everything in dir but dir itself.
func clearDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clear %s: %w", dir, err)
	}
	return nil
}
