//go:build !(linux || darwin || freebsd)

package blockstore

// freeSpace cannot be determined on this platform; the free-space guard is off.
func freeSpace(string) (free int64, ok bool, err error) { return 0, false, nil }
