//go:build linux

package netlab

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CleanupStale removes what labs of dead processes left behind: for every
// lab ID among the namespaces in /run/netns whose names start with
// NamespacePrefix, if nobody holds that lab's lock (its process has exited,
// however it died), it kills the processes still in those namespaces and
// deletes them, which destroys their veths and bridge. Labs of running
// processes, in this test binary or another, are left alone. It returns the
// names of the namespaces it deleted.
func CleanupStale() (removed []string, err error) {
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	byID := map[string][]string{}
	for _, e := range entries {
		if id, ok := labID(e.Name()); ok {
			byID[id] = append(byID[id], e.Name())
		}
	}
	var errs []error
	for _, id := range slices.Sorted(maps.Keys(byID)) {
		nss := byID[id]
		lock, err := tryLock(lockPath(id), true)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if lock == nil {
			continue // a live lab
		}
		// Only what is still there: the lab may have closed since ReadDir.
		nss = slices.DeleteFunc(nss, func(ns string) bool {
			_, err := os.Lstat(filepath.Join(netnsDir, ns))
			return err != nil
		})
		// The switch (the shortest name) last.
		slices.SortFunc(nss, func(a, b string) int { return len(b) - len(a) })
		if _, err := killInNetns(nss, killTimeout); err != nil {
			errs = append(errs, err)
		}
		for _, ns := range nss {
			if err := deleteNetns(ns); err != nil {
				errs = append(errs, err)
			} else {
				removed = append(removed, ns)
			}
		}
		os.Remove(lock.Name())
		lock.Close()
	}
	// Lock files of labs that died before they made a namespace, and the
	// rare temporary one of a lab that died while taking its lock (a young
	// one may be a lab taking its lock now).
	if files, err := os.ReadDir(lockDir); err == nil {
		for _, f := range files {
			p := filepath.Join(lockDir, f.Name())
			if strings.HasPrefix(f.Name(), ".new-") {
				if fi, err := f.Info(); err != nil || time.Since(fi.ModTime()) < time.Hour {
					continue
				}
			} else if !strings.HasSuffix(f.Name(), ".lock") {
				continue
			}
			if lock, err := tryLock(p, false); err == nil && lock != nil {
				os.Remove(p)
				lock.Close()
			}
		}
	}
	return removed, errors.Join(errs...)
}

// labID returns the lab ID in a namespace name made by a lab.
func labID(ns string) (string, bool) {
	rest, ok := strings.CutPrefix(ns, NamespacePrefix)
	if !ok {
		return "", false
	}
	id, _, _ := strings.Cut(rest, "-")
	if len(id) != 2*idBytes || strings.Trim(id, "0123456789abcdef") != "" {
		return "", false
	}
	return id, true
}

// tryLock takes the flock on path without waiting. It returns nil, nil if
// someone else holds it. With create, a missing file is created: a lab's
// lock file exists before its first namespace does, so namespaces without
// one are stale.
func tryLock(path string, create bool) (*os.File, error) {
	flags := os.O_RDWR
	if create {
		if err := os.MkdirAll(lockDir, 0o755); err != nil {
			return nil, err
		}
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(path, flags, 0o644)
	if err != nil {
		if !create && errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	switch err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); {
	case err == nil:
		return f, nil
	case errors.Is(err, unix.EWOULDBLOCK):
		f.Close()
		return nil, nil
	default:
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
}
