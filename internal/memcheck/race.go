//go:build race

package memcheck

// Race reports whether the race detector is on.
const Race = true
