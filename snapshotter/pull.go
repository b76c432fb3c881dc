package snapshotter

import (
	"context"
	"fmt"
	"os"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// DefaultName is the snapshotter's name in containerd's proxy_plugins, as
// the docs configure it.
const DefaultName = "shoal"

// PullOptions says where to pull to.
type PullOptions struct {
	Address     string // containerd's socket; default /run/containerd/containerd.sock
	Namespace   string // default "default"
	Snapshotter string // default DefaultName
	PlainHTTP   bool   // talk plain HTTP to the registry
}

// PullResult describes a pulled image.
type PullResult struct {
	Name   string // the image's name in containerd
	Digest string // its target (manifest or index) digest
}

// Pull pulls ref into containerd and unpacks it with the snapshotter,
// labelling each layer with the image reference and manifest digest the
// way CRI does (containerd's AppendInfoHandlerWrapper): a snapshotter that
// can serve the layers remotely (Shoal, for an image with a flat form)
// then commits them itself, and containerd downloads only the manifest and
// config. Credentials come from the Docker config and its helpers.
func Pull(ctx context.Context, ref string, o PullOptions) (PullResult, error) {
	if o.Address == "" {
		o.Address = "/run/containerd/containerd.sock"
	}
	if o.Namespace == "" {
		o.Namespace = "default"
	}
	if o.Snapshotter == "" {
		o.Snapshotter = DefaultName
	}
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return PullResult{}, fmt.Errorf("image reference %q: %w", ref, err)
	}
	ref = named.String()
	if _, err := os.Stat(o.Address); err != nil {
		return PullResult{}, fmt.Errorf("no containerd socket at %s (--containerd-address): %w", o.Address, err)
	}
	client, err := containerd.New(o.Address, containerd.WithDefaultNamespace(o.Namespace), containerd.WithTimeout(10*time.Second))
	if err != nil {
		return PullResult{}, fmt.Errorf("connect to containerd at %s: %w", o.Address, err)
	}
	defer client.Close()
	hosts := config.HostOptions{Credentials: dockerCredentials}
	if o.PlainHTTP {
		hosts.DefaultScheme = "http"
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, hosts)})
	img, err := client.Pull(ctx, ref,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.Snapshotter),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		return PullResult{}, fmt.Errorf("pull %s into containerd (snapshotter %s): %w", ref, o.Snapshotter, err)
	}
	return PullResult{Name: img.Name(), Digest: img.Target().Digest.String()}, nil
}

// dockerCredentials answers containerd's resolver from the Docker config
// (and credential helpers), as the rest of Shoal does.
func dockerCredentials(host string) (string, string, error) {
	reg, err := name.NewRegistry(host)
	if err != nil {
		return "", "", nil
	}
	a, err := authn.DefaultKeychain.Resolve(reg)
	if err != nil {
		return "", "", err
	}
	cfg, err := a.Authorization()
	if err != nil {
		return "", "", err
	}
	if cfg.IdentityToken != "" {
		return "", cfg.IdentityToken, nil
	}
	return cfg.Username, cfg.Password, nil
}
