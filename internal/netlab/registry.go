//go:build linux

package netlab

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/internal/testenv"
)

const (
	// RegistryPort is the port StartRegistry listens on, on the host's
	// address.
	RegistryPort = 5000
	// RegistryBinary is where Debian's docker-registry package installs the
	// registry (CNCF distribution v2); $SHOAL_REGISTRY_BIN overrides it, as
	// for internal/testenv.
	RegistryBinary = "/usr/bin/docker-registry"

	registryReadyTimeout = 15 * time.Second
	registryStopTimeout  = 10 * time.Second
)

func registryBinary() string {
	if b := os.Getenv("SHOAL_REGISTRY_BIN"); b != "" {
		return b
	}
	return RegistryBinary
}

// StartRegistry runs Debian's docker-registry inside the host, listening on
// the host's address only, port RegistryPort, with its storage in a
// temporary directory of tb. It returns "198.18.0.N:5000" once GET /v2/
// answers across the lab: from another host when the lab has one (through the
// bridge and any shaped links), otherwise from the host itself. The registry
// is stopped when tb ends, before the lab closes. Without the binary the test
// is skipped, or fails in CI.
func (h *Host) StartRegistry(tb testing.TB, opts ...testenv.RegistryOption) string {
	tb.Helper()
	bin := registryBinary()
	if _, err := exec.LookPath(bin); err != nil {
		testenv.SkipOrFatal(tb, "netlab: real registry not available: %v (apt-get install docker-registry)", err)
	}
	dir := tb.TempDir()
	addr := h.HostPort(RegistryPort)
	cfg := filepath.Join(dir, "config.yml")
	conf := testenv.RegistryConfig(addr, filepath.Join(dir, "data"))
	if user, password := testenv.RegistryAuth(opts...); user != "" {
		// Behind htpasswd, as testenv.WithBasicAuth: anonymous reads get 401.
		htpasswd := filepath.Join(dir, "htpasswd")
		if err := testenv.WriteHtpasswd(htpasswd, [2]string{user, password}); err != nil {
			tb.Fatalf("netlab: %v", err)
		}
		conf += testenv.HtpasswdConfig(htpasswd)
	}
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		tb.Fatalf("netlab: registry config: %v", err)
	}
	accessLog, err := os.Create(filepath.Join(dir, "access.log"))
	if err != nil {
		tb.Fatalf("netlab: %v", err)
	}
	defer accessLog.Close()
	logPath := filepath.Join(dir, "registry.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		tb.Fatalf("netlab: %v", err)
	}
	defer logFile.Close()

	cmd := h.Command(context.Background(), bin, "serve", cfg)
	cmd.Dir = dir
	cmd.Stdout = accessLog
	cmd.Stderr = logFile
	p, err := testenv.StartLocked(cmd)
	if err != nil {
		tb.Fatalf("netlab: start registry on %s: %v", h.name, err)
	}
	logTail := func() string {
		data, _ := os.ReadFile(logPath)
		data = bytes.TrimSpace(data)
		if len(data) > 4096 {
			data = data[len(data)-4096:]
		}
		return string(data)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			if tail := logTail(); tail != "" {
				tb.Logf("netlab: registry %s log (tail):\n%s", addr, tail)
			}
		}
		select {
		case <-p.Done:
			tb.Logf("netlab: registry %s had already exited: %v", addr, p.Err)
			return
		default:
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.Done:
		case <-time.After(registryStopTimeout):
			tb.Logf("netlab: registry %s ignored SIGTERM for %v; killing it", addr, registryStopTimeout)
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.Done
		}
	})

	from := h
	for _, o := range h.lab.Hosts() {
		if o != h {
			from = o
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), registryReadyTimeout)
	defer cancel()
	url := "http://" + addr + "/v2/"
	client := from.HTTPClient()
	defer client.CloseIdleConnections()
	if err := testenv.WaitRegistryReady(ctx, client, url, p.Done); err != nil {
		tb.Fatalf("netlab: registry on %s not ready for %s: %v; its log: %s", addr, from.name, err, logTail())
	}
	h.lab.logf("netlab: registry on host %s at %s (storage %s; checked from %s)", h.name, addr, dir, from.name)
	return addr
}
