//go:build linux

package testenv

import (
	"os"
	"strconv"
	"syscall"
	"testing"
)

// Tmpfs mounts a tmpfs of size bytes on a fresh directory, for tests that
// fill a file system, and unmounts it at cleanup. When that is not possible
// (not root, or the mount fails) it skips the test, or fails it when CI is
// set: a full-disk test must not pass in CI untested.
func Tmpfs(tb testing.TB, size int64) string {
	tb.Helper()
	if os.Geteuid() != 0 {
		SkipOrFatal(tb, "mounting a small tmpfs to fill up needs root")
	}
	dir := tb.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.FormatInt(size, 10)); err != nil {
		SkipOrFatal(tb, "mount tmpfs on %s: %v", dir, err)
	}
	tb.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			tb.Errorf("unmount %s: %v; detaching", dir, err)
			if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
				tb.Errorf("detach %s: %v", dir, err)
			}
		}
	})
	return dir
}
