package bench

import (
	"os"
	"testing"

	"github.com/shoal-project/shoal/sandbox"
)

// TestMain lets the baselines run commands with sandbox.Run, which
// re-executes this test binary as the sandbox's init.
func TestMain(m *testing.M) {
	sandbox.Init() // in the re-executed sandbox child this never returns
	os.Exit(m.Run())
}
