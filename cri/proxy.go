package cri

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Limits of the proxy's gRPC server and client.
const (
	// maxRequestBytes bounds a request from the kubelet: image service
	// requests are a reference, credentials and a little config.
	maxRequestBytes = 1 << 20
	// maxResponseBytes bounds an answer from the runtime (ListImages on a
	// node with many images) and so what the proxy sends on.
	maxResponseBytes = 64 << 20
	// maxStreams bounds the calls one connection may have in flight.
	maxStreams = 256
)

// Proxy is a CRI image service that forwards every call to the runtime's
// (containerd's CRI plugin), keeping the credentials of each pull in its
// Credentials on the way.
type Proxy struct {
	runtimeapi.UnimplementedImageServiceServer
	upstream runtimeapi.ImageServiceClient
	creds    *Credentials
	log      *slog.Logger
}

var _ runtimeapi.ImageServiceServer = (*Proxy)(nil)

// NewProxy returns a proxy to the image service on conn that records
// pulls' credentials in creds.
func NewProxy(conn grpc.ClientConnInterface, creds *Credentials, log *slog.Logger) *Proxy {
	if log == nil {
		log = slog.Default()
	}
	return &Proxy{upstream: runtimeapi.NewImageServiceClient(conn), creds: creds, log: log.With("component", "cri")}
}

// DialRuntime connects to a CRI runtime's unix socket (a path, or
// unix://path). The connection is made lazily, so the runtime may start
// after the daemon.
func DialRuntime(address string) (*grpc.ClientConn, error) {
	path := strings.TrimPrefix(address, "unix://")
	if path == "" || strings.Contains(path, "://") {
		return nil, fmt.Errorf("cri runtime endpoint %q: want a unix socket path", address)
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxResponseBytes), grpc.MaxCallSendMsgSize(maxRequestBytes)))
	if err != nil {
		return nil, fmt.Errorf("cri runtime endpoint %s: %w", address, err)
	}
	return conn, nil
}

// Serve serves p on ln until ctx is done, then stops: gracefully, or at
// once after 10 s (a pull in flight may take longer; the kubelet retries).
func Serve(ctx context.Context, p *Proxy, ln net.Listener) error {
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(maxRequestBytes), grpc.MaxSendMsgSize(maxResponseBytes),
		grpc.MaxConcurrentStreams(maxStreams))
	runtimeapi.RegisterImageServiceServer(srv, p)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("cri image service: %w", err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("cri image service: %w", err)
	}
	return nil
}

// PullImage records the pull's credentials for the image's repository,
// then asks the runtime to pull. containerd prepares the image's
// snapshots during the call, and the Shoal snapshotter reads the image's
// flat form with these credentials. A reference or credentials the proxy
// cannot read are refused before anything is kept or forwarded.
func (p *Proxy) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	image := req.GetImage().GetImage()
	ref, err := p.creds.Record(image, req.GetAuth())
	if err != nil {
		p.log.Warn("pull refused", "image", image, "err", err)
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	start := time.Now()
	resp, err := p.upstream.PullImage(ctx, req)
	if err != nil {
		p.log.Info("pull failed", "image", ref.String(), "with_credentials", req.GetAuth() != nil, "err", status.Convert(err).Message())
		return nil, err
	}
	p.log.Info("pulled", "image", ref.String(), "with_credentials", req.GetAuth() != nil, "image_ref", resp.GetImageRef(),
		"seconds", time.Since(start).Seconds())
	return resp, nil
}

// ListImages forwards.
func (p *Proxy) ListImages(ctx context.Context, req *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	return p.upstream.ListImages(ctx, req)
}

// ImageStatus forwards.
func (p *Proxy) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	return p.upstream.ImageStatus(ctx, req)
}

// RemoveImage forwards. The repository's credentials stay until they
// expire: another image of it may still be mounted again.
func (p *Proxy) RemoveImage(ctx context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	return p.upstream.RemoveImage(ctx, req)
}

// ImageFsInfo forwards.
func (p *Proxy) ImageFsInfo(ctx context.Context, req *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	return p.upstream.ImageFsInfo(ctx, req)
}

// StreamImages forwards the stream, answer by answer (runtimes without it
// answer Unimplemented, and the kubelet falls back to ListImages).
func (p *Proxy) StreamImages(req *runtimeapi.StreamImagesRequest, out grpc.ServerStreamingServer[runtimeapi.StreamImagesResponse]) error {
	in, err := p.upstream.StreamImages(out.Context(), req)
	if err != nil {
		return err
	}
	for {
		resp, err := in.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := out.Send(resp); err != nil {
			return err
		}
	}
}
