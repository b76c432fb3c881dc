//go:build linux

package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// The OCI distribution-spec conformance suite (opencontainers/
// distribution-spec, conformance/): its ginkgo test binary, pinned to the
// last version configured by OCI_ROOT_URL, OCI_NAMESPACE, OCI_TEST_PULL,
// OCI_TAG_NAME, OCI_MANIFEST_DIGEST, OCI_BLOB_DIGEST and
// OCI_USERNAME/OCI_PASSWORD. It comes through the Go module proxy.
const (
	ConformanceModule  = "github.com/opencontainers/distribution-spec/conformance"
	ConformanceVersion = "v0.0.0-20231101194043-f2182352d4cc"
)

const conformanceBuildTimeout = 5 * time.Minute

// ConformanceBinary returns the conformance suite's test binary, built
// once (go mod download of the pinned version, go test -c) into CacheDir.
// Without the go command or the module the test is skipped, or fails in
// CI.
func ConformanceBinary(tb testing.TB) string {
	tb.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		SkipOrFatal(tb, "testenv: conformance suite: %v", err)
	}
	dir := filepath.Join(CacheDir(), "conformance-"+ConformanceVersion)
	bin := filepath.Join(dir, "conformance.test")
	if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() {
		return bin
	}
	if err := os.MkdirAll(CacheDir(), 0o755); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	lock, err := os.OpenFile(filepath.Join(CacheDir(), ".conformance.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	defer lock.Close() // releases the flock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		tb.Fatalf("testenv: lock %s: %v", lock.Name(), err)
	}
	if _, err := os.Stat(bin); err == nil { // built while we waited
		return bin
	}
	ctx, cancel := context.WithTimeout(tb.Context(), conformanceBuildTimeout)
	defer cancel()
	start := time.Now()
	if err := buildConformance(ctx, goBin, dir); err != nil {
		SkipOrFatal(tb, "testenv: conformance suite %s@%s: %v", ConformanceModule, ConformanceVersion, err)
	}
	tb.Logf("testenv: built the conformance suite %s in %v", ConformanceVersion, time.Since(start).Round(time.Millisecond))
	return bin
}

// buildConformance downloads the pinned module, copies it out of the
// read-only module cache and builds its test binary into dir.
func buildConformance(ctx context.Context, goBin, dir string) error {
	work, err := os.MkdirTemp("", "conformance-build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	env := append(os.Environ(), "GOFLAGS=-mod=mod", "GOWORK=off")
	run := func(dir string, args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, goBin, args...)
		cmd.Dir, cmd.Env = dir, env
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("go %v: %w: %s", args, err, bytes.TrimSpace(stderr.Bytes()))
		}
		return out, nil
	}
	out, err := run(work, "mod", "download", "-json", ConformanceModule+"@"+ConformanceVersion)
	if err != nil {
		return err
	}
	var mod struct{ Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		return fmt.Errorf("go mod download: %s (%v)", mod.Error, err)
	}
	src := filepath.Join(work, "src")
	if err := os.CopyFS(src, os.DirFS(mod.Dir)); err != nil {
		return fmt.Errorf("copy the module: %w", err)
	}
	if _, err := run(src, "test", "-c", "-o", filepath.Join(work, "conformance.test"), "."); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.Rename(filepath.Join(work, "conformance.test"), filepath.Join(dir, "conformance.test"))
}

// ConformanceResult is what one run of the suite counted.
type ConformanceResult struct {
	Ran, Total                       int
	Passed, Failed, Pending, Skipped int
	Output                           string // the suite's output, for a failure message
}

var (
	ranRE     = regexp.MustCompile(`Ran (\d+) of (\d+) Specs`)
	summaryRE = regexp.MustCompile(`(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped`)
)

// RunConformance runs the suite's binary with env (OCI_* settings, added
// to a clean environment) and returns its counts. A run that prints no
// summary fails the test.
func RunConformance(tb testing.TB, bin string, env map[string]string) ConformanceResult {
	tb.Helper()
	dir := tb.TempDir()
	ctx, cancel := context.WithTimeout(tb.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-ginkgo.no-color")
	cmd.Dir = dir
	cmd.Env = []string{"HOME=" + dir, "PATH=" + os.Getenv("PATH"), "OCI_REPORT_DIR=" + dir}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, _ := cmd.CombinedOutput() // a failing suite exits non-zero; the counts tell
	r := ConformanceResult{Output: string(out)}
	m := summaryRE.FindSubmatch(out)
	ran := ranRE.FindSubmatch(out)
	if m == nil || ran == nil {
		tb.Fatalf("testenv: the conformance suite printed no summary:\n%s", out)
	}
	atoi := func(b []byte) int { n, _ := strconv.Atoi(string(b)); return n }
	r.Ran, r.Total = atoi(ran[1]), atoi(ran[2])
	r.Passed, r.Failed, r.Pending, r.Skipped = atoi(m[1]), atoi(m[2]), atoi(m[3]), atoi(m[4])
	return r
}
