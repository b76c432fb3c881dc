//go:build linux

package testenv

import (
	"os"
	"testing"
)

// InCI reports whether the tests run in CI, where a missing tool is the setup's
// fault and must fail the run rather than skip silently.
func InCI() bool {
	switch os.Getenv("CI") {
	case "", "0", "false", "FALSE", "False":
		return false
	}
	return true
}

// SkipOrFatal skips the test on a developer's machine and fails it in CI.
func SkipOrFatal(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if InCI() {
		tb.Fatalf(format+" (CI is set, so this is a failure: the CI setup must provide it)", args...)
	}
	tb.Skipf(format, args...)
}
