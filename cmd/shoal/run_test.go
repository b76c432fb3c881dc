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
	"github.com/shoal-project/shoal/trace"
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
	traceFile := filepath.Join(t.TempDir(), "trace.json")

	var stdout, stderr bytes.Buffer
	code := run([]string{"run", "--plain-http", "--state-dir", state, "--stats", statsFile, "--record-trace", traceFile, src, "--",
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

	// The recorded trace: published beside the flat image, found by the
	// next cold node, whose start-up reads then find their blocks cached.
	tr, err := trace.ReadFile(traceFile)
	if err != nil || len(tr.Events) < 20 || !strings.Contains(tr.Command, "python3") {
		t.Fatalf("recorded trace: %v, %v", tr, err)
	}
	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"trace", "push", "--plain-http", src, traceFile}, &stdout, &stderr); code != 0 {
		t.Fatalf("trace push: exit %d, %s", code, stderr.String())
	}
	stdout.Reset()
	if code := run([]string{"trace", "get", "--plain-http", src}, &stdout, &stderr); code != 0 {
		t.Fatalf("trace get: exit %d, %s", code, stderr.String())
	}
	if got, err := trace.Unmarshal(stdout.Bytes()); err != nil || len(got.Events) != len(tr.Events) {
		t.Fatalf("trace get: %v, %v", got, err)
	}
	stdout.Reset()
	if code := run([]string{"run", "--plain-http", "--state-dir", t.TempDir(), "--stats", statsFile, src, "--",
		"python3", "-c", `import json, http.server; print("ok")`}, &stdout, &stderr); code != 0 || strings.TrimSpace(stdout.String()) != "ok" {
		t.Fatalf("run with the trace: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
	var withTrace RunStats
	b, _ = os.ReadFile(statsFile)
	_ = json.Unmarshal(b, &withTrace)
	t.Logf("cold run with the trace: %d demand blocks cached when read, %d fetched; without: %d, %d",
		withTrace.DemandLocalBlocks, withTrace.DemandRemoteBlocks, st.DemandLocalBlocks, st.DemandRemoteBlocks)
	if withTrace.DemandLocalBlocks <= withTrace.DemandRemoteBlocks {
		t.Errorf("with a trace, most start-up reads should find their blocks prefetched: %d local, %d fetched",
			withTrace.DemandLocalBlocks, withTrace.DemandRemoteBlocks)
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
