//go:build linux

package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
)

// helmVersion is the Helm release the chart is linted and rendered with;
// scripts/deps.sh installs it (go install helm.sh/helm/v3/cmd/helm@…).
const helmVersion = "v3.21.4"

const chartDir = "helm/shoal"

// helmBinary finds helm at helmVersion: $SHOAL_HELM_BIN, the PATH, or
// where go install puts it. Missing, the test is skipped (fails in CI).
func helmBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("SHOAL_HELM_BIN")
	if bin == "" {
		bin, _ = exec.LookPath("helm")
	}
	if bin == "" {
		if gopath, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			bin = filepath.Join(strings.TrimSpace(string(gopath)), "bin", "helm")
		}
	}
	if _, err := os.Stat(bin); bin == "" || err != nil {
		testenv.SkipOrFatal(t, "helm %s not found (make deps installs it)", helmVersion)
	}
	if err := testenv.CheckGoToolVersion(bin, helmVersion); err != nil {
		testenv.SkipOrFatal(t, "%v (make deps installs it)", err)
	}
	return bin
}

// helm runs helm with args and returns its standard output and error.
func helm(t *testing.T, bin string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	// Its own config and cache: nothing of the user's repositories or
	// plugins plays in.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CONFIG_HOME="+home, "HELM_CACHE_HOME="+home, "HELM_DATA_HOME="+home)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), &helmError{err, stderr.String()}
	}
	return string(out), nil
}

type helmError struct {
	err    error
	stderr string
}

func (e *helmError) Error() string { return e.err.Error() + ": " + strings.TrimSpace(e.stderr) }

// TestHelmChart lints the chart (helm lint --strict) and renders it (helm
// template) with its defaults and with each value it offers changed; the
// output is decoded strictly into the Kubernetes types and passes every
// check the plain manifests pass (TestKubernetes), and each value lands
// where it should.
func TestHelmChart(t *testing.T) {
	t.Parallel()
	bin := helmBinary(t)
	const ns = "shoal-system" // docs/deploy.md's
	for _, tc := range []struct {
		name   string
		values string
		check  func(t *testing.T, m manifests, ds *appsv1.DaemonSet, args map[string]string, cfg daemon.Config)
	}{
		{"defaults", "", func(t *testing.T, m manifests, ds *appsv1.DaemonSet, args map[string]string, cfg daemon.Config) {
			if ds.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
				t.Errorf("update strategy %q, want OnDelete: a restart unmounts the node's images", ds.Spec.UpdateStrategy.Type)
			}
			if len(m.secrets) != 0 {
				t.Errorf("the chart makes %d Secrets by default; the key must not sit in a release", len(m.secrets))
			}
			if _, ok := args["kube-rack-label"]; ok || cfg.CacheQuota != 20<<30 || cfg.CRI.ImageSocket != "" {
				t.Errorf("defaults: rack label %q, cache quota %d, CRI socket %q", args["kube-rack-label"], cfg.CacheQuota, cfg.CRI.ImageSocket)
			}
			if got := daemonContainer(t, ds).Resources.Requests[corev1.ResourceMemory]; got.Cmp(resource.MustParse("256Mi")) != 0 {
				t.Errorf("memory request %s", got.String())
			}
		}},
		{"every value changed", `
updateStrategy:
  type: RollingUpdate
  rollingUpdate:
    maxUnavailable: 1
topology:
  rackLabel: example.com/rack
cacheQuota: 1073741824
resources:
  requests: {cpu: 200m, memory: 512Mi}
  limits: {memory: 2Gi}
p2p:
  port: 4801
  bootstrap: ["/ip4/198.18.0.10/tcp/4801/p2p/12D3KooWD6isRxoEXBCPNusCafcg56aoGZc3MfucP6QeqWi8aE9C"]
mirror:
  upstreams:
    - host: docker.io
      endpoint: registry-1.docker.io
      default: true
    - host: ghcr.io
    - host: registry.example:5000
      plain_http: true
      shared_repositories: ["tools/*"]
cri:
  enabled: true
swarmKey:
  secretName: cluster-key
  key: psk
`, func(t *testing.T, m manifests, ds *appsv1.DaemonSet, args map[string]string, cfg daemon.Config) {
			us := ds.Spec.UpdateStrategy
			if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil || us.RollingUpdate.MaxUnavailable.IntValue() != 1 {
				t.Errorf("update strategy %+v, want RollingUpdate, maxUnavailable 1", us)
			}
			if args["kube-rack-label"] != "example.com/rack" || cfg.CacheQuota != 1<<30 {
				t.Errorf("rack label %q, cache quota %d", args["kube-rack-label"], cfg.CacheQuota)
			}
			c := daemonContainer(t, ds)
			if got := c.Resources.Limits[corev1.ResourceMemory]; got.Cmp(resource.MustParse("2Gi")) != 0 {
				t.Errorf("memory limit %s", got.String())
			}
			if len(cfg.P2P.Bootstrap) != 1 || len(cfg.Mirror.Upstreams) != 3 || cfg.Mirror.Upstreams[2].SharedRepositories[0] != "tools/*" {
				t.Errorf("bootstrap %q, upstreams %+v", cfg.P2P.Bootstrap, cfg.Mirror.Upstreams)
			}
			// The kubelet on the host reaches the CRI socket: it is in the
			// state directory, which is the host's.
			if cfg.CRI.ImageSocket == "" || path.Dir(cfg.CRI.ImageSocket) != cfg.StateDir {
				t.Errorf("CRI image socket %q is not in the state directory %s", cfg.CRI.ImageSocket, cfg.StateDir)
			}
			if cfg.P2P.PSKFile != "/var/run/secrets/shoal/psk" || ds.Spec.Template.Spec.Volumes[len(ds.Spec.Template.Spec.Volumes)-1].Secret.SecretName != "cluster-key" {
				t.Errorf("swarm key %s, volumes %+v; want key psk of Secret cluster-key", cfg.P2P.PSKFile, ds.Spec.Template.Spec.Volumes)
			}
			var rt bool
			for _, vm := range c.VolumeMounts {
				rt = rt || strings.HasPrefix(cfg.CRI.RuntimeEndpoint, vm.MountPath+"/") && vm.MountPath != cfg.StateDir
			}
			if !rt {
				t.Errorf("CRI runtime endpoint %s is in no host directory the pod mounts", cfg.CRI.RuntimeEndpoint)
			}
		}},
		{"secret made by the chart", `
swarmKey:
  create: true
  value: "0000000000000000000000000000000000000000000000000000000000000000"
`, func(t *testing.T, m manifests, ds *appsv1.DaemonSet, args map[string]string, cfg daemon.Config) {
			if len(m.secrets) != 1 || m.secrets[0].Name != "shoal-swarm-key" || m.secrets[0].Namespace != ns ||
				string(m.secrets[0].Data["swarm.key"]) != strings.Repeat("0", 64) {
				t.Errorf("secrets %+v, want shoal-swarm-key with the key", m.secrets)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			args := []string{chartDir}
			if tc.values != "" {
				f := filepath.Join(t.TempDir(), "values.yaml")
				if err := os.WriteFile(f, []byte(tc.values), 0o644); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--values", f)
			}
			if out, err := helm(t, bin, append([]string{"lint", "--strict"}, args...)...); err != nil {
				t.Fatalf("helm lint: %v\n%s", err, out)
			}
			out, err := helm(t, bin, append([]string{"template", "shoal", "--namespace", ns}, args...)...)
			if err != nil {
				t.Fatalf("helm template: %v", err)
			}
			var m manifests
			m.decode(t, "helm template", []byte(out))
			if len(m.namespaces) != 0 {
				t.Errorf("the chart makes %d namespaces; helm install --create-namespace does", len(m.namespaces))
			}
			ds, flags, cfg := checkManifests(t, m, ns, !strings.Contains(tc.values, "secretName"))
			tc.check(t, m, ds, flags, cfg)
		})
	}
	// A chart-made Secret needs its value.
	if _, err := helm(t, bin, "template", "shoal", chartDir, "--set", "swarmKey.create=true"); err == nil ||
		!strings.Contains(err.Error(), "swarmKey.create needs swarmKey.value") {
		t.Errorf("swarmKey.create without a value: %v", err)
	}
}

// daemonContainer is the DaemonSet's container that runs `shoal daemon`.
func daemonContainer(t *testing.T, ds *appsv1.DaemonSet) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if len(c.Args) > 0 && c.Args[0] == "daemon" {
			return c
		}
	}
	t.Fatal("no container runs `shoal daemon`")
	return corev1.Container{}
}
