package bench

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// needBench skips unless SHOAL_BENCH=1 (make bench).
func needBench(t *testing.T) {
	t.Helper()
	if os.Getenv("SHOAL_BENCH") != "1" {
		t.Skip("benchmark scenario: run with SHOAL_BENCH=1 (make bench)")
	}
}

// pairs is how many A/B pairs every timed scenario runs.
func pairs() int {
	if n := os.Getenv("SHOAL_BENCH_PAIRS"); n != "" {
		if v, err := strconv.Atoi(n); err == nil && v > 0 {
			return v
		}
	}
	return 3
}

// Machine describes where a result was measured.
type Machine struct {
	Cores  int    `json:"cores"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
}

func machine() Machine {
	var u syscall.Utsname
	_ = syscall.Uname(&u)
	var b strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return Machine{Cores: runtime.NumCPU(), Kernel: b.String(), Go: runtime.Version()}
}

func commit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	s := strings.TrimSpace(string(out))
	if st, _ := exec.Command("git", "status", "--porcelain").Output(); len(st) > 0 {
		s += "-dirty"
	}
	return s
}

// writeResult writes bench/results/<scenario>.json.
func writeResult(t *testing.T, scenario string, v map[string]any) {
	t.Helper()
	v["scenario"] = scenario
	v["commit"] = commit()
	v["machine"] = machine()
	v["date"] = time.Now().UTC().Format(time.RFC3339)
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("results")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, scenario+".json")
	if err := os.WriteFile(p, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s:\n%s", p, b)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func secs(d time.Duration) float64 { return d.Seconds() }
