//go:build linux || darwin || freebsd

package blockstore

import "syscall"

// freeSpace reports the bytes available to this process on the file system
// holding dir. ok is false where that cannot be determined.
func freeSpace(dir string) (free int64, ok bool, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, false, err
	}
	free = int64(st.Bavail) * int64(st.Bsize)
	return max(free, 0), true, nil
}
