//go:build linux

package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestContainerd pulls the Debian image from the real registry into a
// private containerd with ctr, runs python3 in it with runc, and checks that
// stopping the daemon leaves no mount, shim or cgroup behind.
func TestContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("pulls and runs the Debian image")
	}
	reg := StartRegistry(t)
	ref := reg.Ref("debian:ctr")
	PushDebianImage(t, ref)

	c := StartContainerd(t)
	ctx := t.Context()
	c.CtrOutput(ctx, "images", "pull", "--plain-http", ref)
	out := c.CtrOutput(ctx, "run", "--rm", ref, "t1", "python3", "-c", "print('hello from ctr')")
	if strings.TrimSpace(out) != "hello from ctr" {
		t.Errorf("ctr run printed %q", out)
	}
	// A task left running: stop must kill it and its shim.
	if err := c.Ctr(ctx, "run", "-d", ref, "t2", "sleep", "600").Run(); err != nil {
		t.Fatalf("ctr run -d: %v", err)
	}
	if len(shimsOf(c.Address)) == 0 {
		t.Error("no shim found for the running task")
	}
	c.Stop()
	if m := MountsUnder(c.Dir); len(m) > 0 {
		t.Errorf("mounts left after stop: %v", m)
	}
	if s := shimsOf(c.Address); len(s) > 0 {
		t.Errorf("shims left after stop: %v", s)
	}
	if cg, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", c.Namespace)); len(cg) > 0 {
		t.Errorf("cgroups left after stop: %v", cg)
	}
	if _, err := os.Stat(c.Address); err == nil {
		t.Logf("socket %s left (removed with its directory)", c.Address)
	}
}
