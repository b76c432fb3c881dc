package daemon

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sync/errgroup"

	"github.com/shoal-project/shoal/cri"
)

// CRIConfig configures the CRI image service proxy (package cri): the
// kubelet (or crictl) sends image calls to ImageSocket, and the daemon
// forwards them to the runtime at RuntimeEndpoint, keeping each pull's
// credentials for the snapshotter. Off by default.
type CRIConfig struct {
	// ImageSocket is where the daemon serves the CRI image service: the
	// kubelet's imageServiceEndpoint (unix://<path>). "" turns it off, and
	// the snapshotter reads registries with registry.docker_config.
	ImageSocket string `yaml:"image_socket"`
	// RuntimeEndpoint is containerd's CRI socket, where every call goes
	// on. Default /run/containerd/containerd.sock.
	RuntimeEndpoint string `yaml:"runtime_endpoint"`
}

// DefaultCRIRuntimeEndpoint is containerd's socket on a standard node.
const DefaultCRIRuntimeEndpoint = "/run/containerd/containerd.sock"

// startCRI serves the CRI image service proxy in g until ctx is done, and
// from then on the snapshotter reads registries with the credentials of
// CRI pulls only.
func (d *Daemon) startCRI(ctx context.Context, g *errgroup.Group) error {
	c := d.cfg.CRI
	if c.ImageSocket == "" {
		return nil
	}
	if c.RuntimeEndpoint == "" {
		c.RuntimeEndpoint = DefaultCRIRuntimeEndpoint
	}
	conn, err := cri.DialRuntime(c.RuntimeEndpoint)
	if err != nil {
		return err
	}
	ln, err := listenUnix(c.ImageSocket)
	if err != nil {
		conn.Close()
		return fmt.Errorf("cri: %w", err)
	}
	d.criCreds = cri.NewCredentials(0, 0)
	p := cri.NewProxy(conn, d.criCreds, d.base)
	g.Go(func() error {
		return errors.Join(cri.Serve(ctx, p, ln), conn.Close())
	})
	d.log.Info("serving the CRI image service", "socket", c.ImageSocket, "runtime", c.RuntimeEndpoint)
	return nil
}
