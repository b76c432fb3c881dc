package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/internal/netlab"
	"github.com/shoal-project/shoal/internal/testenv"
)

// staticKeychain is one account for every registry.
type staticKeychain struct{ auth authn.Authenticator }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) { return k.auth, nil }

// needNetlab skips the test unless network namespaces can be made, or
// fails it when CI is set or SHOAL_BENCH=1 asked for the benchmarks (make
// bench, make calibrate): a run that was asked for must not pass without
// having written its results.
func needNetlab(t *testing.T) {
	t.Helper()
	err := netlab.Available()
	if err == nil {
		return
	}
	if os.Getenv("SHOAL_BENCH") == "1" {
		t.Fatalf("no network namespaces: %v (SHOAL_BENCH=1 asked for this run, so this is a failure)", err)
	}
	testenv.SkipOrFatal(t, "no network namespaces: %v", err)
}

// rolloutLab is a network lab with a registry host holding the Debian +
// python image and its flat form, its link capped at mbit.
func rolloutLab(t *testing.T, mbit int) (lab *netlab.Lab, regHost *netlab.Host, src string, img v1.Image) {
	t.Helper()
	return rolloutLabAs(t, mbit, "", "")
}

// rolloutLabAs is rolloutLab with the registry behind htpasswd with one
// account (user, password), when user is not "".
func rolloutLabAs(t *testing.T, mbit int, user, password string) (lab *netlab.Lab, regHost *netlab.Host, src string, img v1.Image) {
	t.Helper()
	needNetlab(t)
	lab = netlab.New(t)
	regHost = lab.AddHost("registry")
	var opts []testenv.RegistryOption
	auth := authn.Anonymous
	if user != "" {
		opts = append(opts, testenv.WithBasicAuth(user, password))
		auth = &authn.Basic{Username: user, Password: password}
	}
	regAddr := regHost.StartRegistry(t, opts...)
	tr := &http.Transport{DialContext: regHost.DialContext}
	src = regAddr + "/bench/debian:v1"
	img = testenv.DebianImage(t)
	r, _ := name.ParseReference(src, name.Insecure)
	if err := remote.Write(r, img, remote.WithTransport(tr), remote.WithAuth(auth)); err != nil {
		t.Fatal(err)
	}
	if _, err := converter.Convert(t.Context(), src, "", converter.WithPlainHTTP(true), converter.WithTransport(tr),
		converter.WithKeychain(staticKeychain{auth}), converter.WithLogger(slog.New(slog.DiscardHandler))); err != nil {
		t.Fatal(err)
	}
	if err := regHost.SetRate(mbit); err != nil {
		t.Fatal(err)
	}
	return lab, regHost, src, img
}

// cluster is a Shoal daemon on each of a set of netlab hosts.
type cluster struct {
	bin    string
	hosts  []*netlab.Host
	states []string // state directory per host
	procs  []*os.Process
}

// startCluster starts a daemon per host (host 0 first, the others
// bootstrapped from it when peers is set; --no-p2p otherwise), with extra
// daemon arguments. The daemons are stopped and their state removed when
// ctx's test ends (stop).
func startCluster(t *testing.T, ctx context.Context, bin string, hosts []*netlab.Host, peers bool, extra ...string) *cluster {
	t.Helper()
	c := &cluster{bin: bin, hosts: hosts, states: make([]string, len(hosts))}
	var bootstrap string
	for i, h := range hosts {
		dir, err := os.MkdirTemp("", "bench-cluster-")
		if err != nil {
			c.stop()
			t.Fatal(err)
		}
		c.states[i] = dir
		args := []string{"daemon", "--state-dir", dir, "--plain-http", "--log-level", "warn"}
		if peers {
			args = append(args, "--listen", "/ip4/"+h.IP()+"/tcp/4701", "--label", "zone=z"+strconv.Itoa(i%2))
			if bootstrap != "" {
				args = append(args, "--bootstrap", bootstrap)
			}
		} else {
			args = append(args, "--no-p2p")
		}
		cmd := h.Command(ctx, bin, append(args, extra...)...)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			c.stop()
			t.Fatal(err)
		}
		c.procs = append(c.procs, cmd.Process)
		st := waitStatus(t, h, bin, dir)
		if peers && i == 0 && len(st.Addrs) > 0 {
			bootstrap = st.Addrs[0]
		}
	}
	return c
}

// stop ends the daemons (SIGTERM: they unmount everything) and removes
// their state, detaching first what a daemon killed with SIGKILL left
// mounted there.
func (c *cluster) stop() {
	for _, p := range c.procs {
		_ = p.Signal(syscall.SIGTERM)
	}
	for _, p := range c.procs {
		_, _ = p.Wait()
	}
	for _, s := range c.states {
		if s == "" {
			continue
		}
		for _, m := range mountsBelow(s) {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
		os.RemoveAll(s)
	}
}

// runPython starts pythonCmd with `shoal run` on the hosts at positions
// which, all at the same moment, and returns per host the seconds until
// "ok" and the run's stats.
func (c *cluster) runPython(t *testing.T, ctx context.Context, src string, which []int) ([]float64, []shoalRunStats) {
	t.Helper()
	ready, stats, errs := c.startPython(ctx, src, which)
	for k, err := range errs {
		if err != nil {
			t.Errorf("node %d: %v", which[k], err)
		}
	}
	return ready, stats
}

// startPython runs python on the daemons of which at once, as runPython
// does, and returns each node's error instead of failing the test: the
// chaos rollout kills some of them on purpose.
func (c *cluster) startPython(ctx context.Context, src string, which []int) ([]float64, []shoalRunStats, []error) {
	ready := make([]float64, len(which))
	stats := make([]shoalRunStats, len(which))
	errs := make([]error, len(which))
	var wg sync.WaitGroup
	start := time.Now()
	for k, i := range which {
		h := c.hosts[i]
		wg.Go(func() {
			statsFile := filepath.Join(c.states[i], "run-stats.json")
			out := &okWriter{start: start}
			var errb syncBuffer
			cmd := h.Command(ctx, c.bin, append([]string{"run", "--state-dir", c.states[i], "--stats", statsFile, src, "--"}, pythonCmd...)...)
			cmd.Stdout, cmd.Stderr = out, &errb
			if err := cmd.Run(); err != nil {
				errs[k] = fmt.Errorf("shoal run: %w\n%s", err, errb.String())
				return
			}
			ready[k] = out.okAfter().Seconds()
			if b, err := os.ReadFile(statsFile); err == nil {
				_ = json.Unmarshal(b, &stats[k])
			}
		})
	}
	wg.Wait()
	return ready, stats, errs
}

// all is 0..n-1.
func all(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}
