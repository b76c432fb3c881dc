//go:build linux && !race

// Heavy integration test (a 150–500 MB image end to end): built without the
// race detector, which slows it tenfold; `make test` runs it in a second pass.

package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/internal/testenv"
)

// TestRunFromLazyMount: `shoal run` starts python3 from a flat image in the
// real registry, fetching a small part of the image; exit codes propagate;
// an image with no flat form still runs (local conversion); nothing stays
// mounted.
func TestRunFromLazyMount(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: real registry, Debian image, FUSE, namespaces")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE, overlayfs and namespaces")
	}
	reg := testenv.StartRegistry(t)
	src := reg.Ref("python:big")
	testenv.PushImage(t, src, testenv.BigImage(t))
	if _, err := converter.Convert(t.Context(), src, "", converter.WithPlainHTTP(true)); err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	statsFile := filepath.Join(t.TempDir(), "stats.json")

	var stdout, stderr bytes.Buffer
	code := run([]string{"run", "--plain-http", "--state-dir", state, "--stats", statsFile, src, "--",
		"python3", "-c", `import json, http.server; print("ok")`}, &stdout, &stderr)
	if code != 0 || strings.TrimSpace(stdout.String()) != "ok" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
	var st RunStats
	b, err := os.ReadFile(statsFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	t.Logf("stats: %s", b)
	if st.LocalConversion || st.BytesFromRegistry == 0 || st.ImageBytes < 400<<20 {
		t.Errorf("unexpected stats: %+v", st)
	}
	if ratio := float64(st.BytesFromRegistry) / float64(st.ImageBytes); ratio >= 0.10 {
		t.Errorf("registry served %.1f%% of the image's bytes, want well under 10%%", 100*ratio)
	}

	// The second run finds the blocks in the cache.
	stdout.Reset()
	if code := run([]string{"run", "--plain-http", "--state-dir", state, "--stats", statsFile, src, "--",
		"python3", "-c", `import json, http.server; print("ok")`}, &stdout, &stderr); code != 0 {
		t.Fatalf("second run: exit %d, stderr %q", code, stderr.String())
	}
	b, _ = os.ReadFile(statsFile)
	_ = json.Unmarshal(b, &st)
	if st.BytesFromRegistry != 0 || st.BytesFromCache == 0 {
		t.Errorf("second run: registry %d bytes, cache %d bytes; want all from the cache", st.BytesFromRegistry, st.BytesFromCache)
	}

	stderr.Reset()
	if code := run([]string{"run", "--plain-http", "--state-dir", state, src, "--", "sh", "-c", "echo err >&2; exit 7"}, &stdout, &stderr); code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}
	if !strings.Contains(stderr.String(), "err") {
		t.Errorf("command's stderr not passed through: %q", stderr.String())
	}

	// No flat form: converted here, with a notice, and it still runs.
	plain := reg.Ref("debian:plain")
	testenv.PushDebianImage(t, plain)
	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"run", "--plain-http", "--state-dir", state, plain, "--", "cat", "/etc/debian_version"}, &stdout, &stderr); code != 0 {
		t.Fatalf("fallback run: exit %d, stderr %q", code, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "12.") || !strings.Contains(stderr.String(), "converting it here") {
		t.Errorf("fallback: stdout %q, stderr %q", stdout.String(), stderr.String())
	}

	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), state) {
		t.Errorf("mounts left under the state directory:\n%s", mounts)
	}
	if runs, _ := os.ReadDir(filepath.Join(state, "runs")); len(runs) != 0 {
		t.Errorf("run directories left: %v", runs)
	}
}
