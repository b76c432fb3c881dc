//go:build linux

package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// CrictlVersion is the cri-tools release the CRI tests drive containerd
// with; scripts/deps.sh installs it (go install
// sigs.k8s.io/cri-tools/cmd/crictl@CrictlVersion).
const CrictlVersion = "v1.37.0"

// CRIOptions turns containerd's CRI plugin on (StartContainerd's WithCRI).
type CRIOptions struct {
	// SandboxImage is the pod sandbox ("pause") image, in a test registry.
	SandboxImage string
	// Snapshotter is CRI's snapshotter ("" for overlayfs), with snapshot
	// annotations on, as docs/containerd.md configures it.
	Snapshotter string
	// ConfigPath is the registry hosts directory (hosts.toml per
	// registry); "" for none.
	ConfigPath string
}

// WithCRI runs containerd's CRI plugin on the daemon's socket: runc's
// state and the CNI directories (empty: pods use the host's network) in
// the test's directory, the pods' cgroups under a parent of their own
// (Containerd.CgroupParent). Stop removes every pod first.
func WithCRI(o CRIOptions) ContainerdOption {
	return func(c *containerdConfig) { c.cri = &o }
}

// criConfig is the CRI plugin's part of config.toml.
func criConfig(dir string, o *CRIOptions) string {
	const p = `[plugins."io.containerd.grpc.v1.cri"`
	var b strings.Builder
	// restrict_oom_score_adj: CRI gives a pod sandbox oom_score_adj -998,
	// which some test machines refuse even to root (runc then fails with
	// "can't get final child's PID from pipe"); this keeps containerd's own.
	fmt.Fprintf(&b, "%s]\n  sandbox_image = %q\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  restrict_oom_score_adj = true\n\n",
		p, o.SandboxImage)
	fmt.Fprintf(&b, "%s.containerd]\n  default_runtime_name = \"runc\"\n  disable_snapshot_annotations = false\n", p)
	if o.Snapshotter != "" {
		fmt.Fprintf(&b, "  snapshotter = %q\n", o.Snapshotter)
	}
	fmt.Fprintf(&b, "\n%s.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n", p)
	fmt.Fprintf(&b, "%s.containerd.runtimes.runc.options]\n  Root = %q\n\n", p, filepath.Join(dir, "runc"))
	fmt.Fprintf(&b, "%s.cni]\n  bin_dir = %q\n  conf_dir = %q\n\n", p, filepath.Join(dir, "cni", "bin"), filepath.Join(dir, "cni", "conf"))
	if o.ConfigPath != "" {
		fmt.Fprintf(&b, "%s.registry]\n  config_path = %q\n\n", p, o.ConfigPath)
	}
	return b.String()
}

// Crictl returns `crictl` against this containerd's CRI plugin: the
// runtime endpoint is its socket, the image endpoint imageEndpoint (a
// unix socket path; "" for the same socket).
func (c *Containerd) Crictl(ctx context.Context, imageEndpoint string, args ...string) *exec.Cmd {
	if imageEndpoint == "" {
		imageEndpoint = c.Address
	}
	base := []string{"--runtime-endpoint", "unix://" + c.Address, "--image-endpoint", "unix://" + imageEndpoint, "--timeout", "60s"}
	cmd := exec.CommandContext(ctx, c.crictl, append(base, args...)...)
	cmd.Env = append(os.Environ(), "CRI_CONFIG_FILE="+filepath.Join(c.Dir, "crictl.yaml"))
	return cmd
}

// CrictlOutput runs crictl and returns its standard output, failing the
// test with crictl's output if it fails.
func (c *Containerd) CrictlOutput(ctx context.Context, imageEndpoint string, args ...string) string {
	c.tb.Helper()
	cmd := c.Crictl(ctx, imageEndpoint, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		c.tb.Fatalf("testenv: crictl %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return strings.TrimSpace(string(out))
}

// RunPod starts a pod sandbox in the host's network (no CNI) and returns
// its ID.
func (c *Containerd) RunPod(ctx context.Context, name string) string {
	c.tb.Helper()
	pod := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "shoal-test", "uid": name, "attempt": 1},
		"log_directory": filepath.Join(c.Dir, "pods", name),
		"linux": map[string]any{
			"cgroup_parent":    c.CgroupParent,
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}, // NODE
		},
	}
	return c.CrictlOutput(ctx, "", "runp", c.writeJSON(c.tb, name+"-pod.json", pod))
}

// RunContainer creates and starts a container of image (already pulled)
// in pod, waits for it to exit, and returns its output and exit code.
func (c *Containerd) RunContainer(ctx context.Context, pod, podName, image string, command ...string) (string, int) {
	c.tb.Helper()
	ctrName := fmt.Sprintf("%s-c%d", podName, c.ctrs.Add(1))
	cfg := map[string]any{
		"metadata": map[string]any{"name": ctrName},
		"image":    map[string]any{"image": image},
		"command":  command,
		"log_path": ctrName + ".log",
	}
	podCfg := filepath.Join(c.Dir, podName+"-pod.json")
	id := c.CrictlOutput(ctx, "", "create", "--no-pull", pod, c.writeJSON(c.tb, ctrName+".json", cfg), podCfg)
	c.CrictlOutput(ctx, "", "start", id)
	var st struct {
		Status struct {
			State    string `json:"state"`
			ExitCode int    `json:"exitCode"`
		} `json:"status"`
	}
	for deadline := time.Now().Add(60 * time.Second); ; {
		if err := json.Unmarshal([]byte(c.CrictlOutput(ctx, "", "inspect", "-o", "json", id)), &st); err != nil {
			c.tb.Fatalf("testenv: crictl inspect %s: %v", id, err)
		}
		if st.Status.State == "CONTAINER_EXITED" {
			break
		}
		if time.Now().After(deadline) {
			c.tb.Fatalf("testenv: container %s still %s after 60s", id, st.Status.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c.CrictlOutput(ctx, "", "logs", id), st.Status.ExitCode
}

func (c *Containerd) writeJSON(tb testing.TB, name string, v any) string {
	tb.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	p := filepath.Join(c.Dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return p
}

// stopPods removes every pod sandbox and container of the CRI plugin,
// while containerd still runs.
func (c *Containerd) stopPods(ctx context.Context) {
	if out, err := c.Crictl(ctx, "", "rmp", "--all", "--force").CombinedOutput(); err != nil {
		c.tb.Logf("testenv: crictl rmp: %v\n%s", err, out)
	}
}

// crictlBinary finds crictl: $SHOAL_CRICTL_BIN, the PATH, or where go
// install puts it.
func crictlBinary() (string, error) {
	if b := os.Getenv("SHOAL_CRICTL_BIN"); b != "" {
		return b, nil
	}
	if b, err := exec.LookPath("crictl"); err == nil {
		return b, nil
	}
	gopath, err := exec.Command("go", "env", "GOPATH").Output()
	if err == nil {
		b := filepath.Join(strings.TrimSpace(string(gopath)), "bin", "crictl")
		if _, err := os.Stat(b); err == nil {
			return b, nil
		}
	}
	return "", fmt.Errorf("crictl %s not found (make deps installs it)", CrictlVersion)
}

// findCrictl returns crictl at CrictlVersion, or skips the test (fails it
// in CI).
func findCrictl(tb testing.TB) string {
	tb.Helper()
	bin, err := crictlBinary()
	if err != nil {
		SkipOrFatal(tb, "testenv: %v", err)
	}
	if err := CheckGoToolVersion(bin, CrictlVersion); err != nil {
		SkipOrFatal(tb, "testenv: %v (make deps installs it)", err)
	}
	return bin
}

// CheckGoToolVersion checks that bin, built by go install, is of its
// module's version (go install'd binaries report none of their own, but
// carry their module's).
func CheckGoToolVersion(bin, version string) error {
	out, err := exec.Command("go", "version", "-m", bin).Output()
	if err != nil {
		return fmt.Errorf("go version -m %s: %w", bin, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "mod" {
			if f[2] != version {
				return fmt.Errorf("%s is %s %s, want %s", bin, f[1], f[2], version)
			}
			return nil
		}
	}
	return fmt.Errorf("%s: no module version in its build info", bin)
}

// ProbeImage is an image of a small random layer and one holding /probe
// (criprobe, built static), its entrypoint: a pod sandbox image, or with arguments a
// container that prints them. extra layers go on top. The binary is built
// once per test binary run into the test's temporary directory.
func ProbeImage(tb testing.TB, extra ...v1.Layer) v1.Image {
	tb.Helper()
	dir := tb.TempDir()
	bin := filepath.Join(dir, "probe")
	cmd := exec.CommandContext(tb.Context(), "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "github.com/shoal-project/shoal/internal/testenv/criprobe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("testenv: build criprobe: %v\n%s", err, out)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return fileTar(bin, "probe", 0o755) }, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	// A small random layer at the bottom gives each image chain IDs of its
	// own: images that shared the probe layer's would share snapshots.
	img := RandomImage(tb, 1, 512)
	if img, err = mutate.AppendLayers(img, append([]v1.Layer{layer}, extra...)...); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	cf = cf.DeepCopy()
	cf.Config.Entrypoint = []string{"/probe"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return img
}

// fileTar is a tar stream of the file at path, named name in it, with mode.
func fileTar(path, name string, mode int64) (io.ReadCloser, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return io.NopCloser(&buf), nil
}
