package converter

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/bounded"
)

// Option configures a conversion.
type Option func(*config) error

type config struct {
	plainHTTP  bool
	platform   v1.Platform
	avgBlock   int
	blobTarget int64
	workers    int
	workDir    string
	keychain   authn.Keychain
	transport  http.RoundTripper
	log        *slog.Logger
	progress   io.Writer
	limits     limits
	first      []string // paths laid out first (WithTraceLayout)
}

func defaults() config {
	return config{
		platform:   HostPlatform(),
		avgBlock:   flat.DefaultAvgBlockSize,
		blobTarget: 128 << 20,
		workers:    max(runtime.GOMAXPROCS(0), 1),
		keychain:   authn.DefaultKeychain,
		transport:  remote.DefaultTransport,
		log:        slog.Default(),
		limits: limits{
			maxBytes:   64 << 30,
			maxRatio:   200,
			ratioFloor: 256 << 20,
			maxEntries: 10_000_000,
		},
	}
}

// HostPlatform is the platform of this machine (linux/GOARCH).
func HostPlatform() v1.Platform {
	p := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if runtime.GOARCH == "arm64" {
		p.Variant = "v8"
	}
	return p
}

// WithPlainHTTP talks plain HTTP to the registries (default: HTTPS only).
func WithPlainHTTP(on bool) Option { return func(c *config) error { c.plainHTTP = on; return nil } }

// WithPlatform picks the image from a multi-platform index (default: the host's).
func WithPlatform(p v1.Platform) Option {
	return func(c *config) error {
		if p.OS == "" || p.Architecture == "" {
			return fmt.Errorf("platform %q: want os/arch[/variant]", p.String())
		}
		c.platform = p
		return nil
	}
}

// WithAvgBlockSize sets the chunker's target block size (default 256 KiB;
// a power of two between 4 KiB and 4 MiB).
func WithAvgBlockSize(n int) Option {
	return func(c *config) error {
		if _, err := flat.NewChunker(n); err != nil {
			return err
		}
		c.avgBlock = n
		return nil
	}
}

// WithWorkDir sets where contents are spooled during conversion (default:
// the system temp dir). It needs room for the image's uncompressed contents.
func WithWorkDir(dir string) Option { return func(c *config) error { c.workDir = dir; return nil } }

// WithKeychain sets registry credentials (default: the Docker config and
// credential helpers, as `docker` uses them).
func WithKeychain(k authn.Keychain) Option {
	return func(c *config) error { c.keychain = k; return nil }
}

// WithTransport sets the HTTP transport (default: ggcr's remote.DefaultTransport).
// Manifests read through it are bounded (bounded.Transport).
func WithTransport(t http.RoundTripper) Option {
	return func(c *config) error { c.transport = t; return nil }
}

// WithLogger sets the logger (default: slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(c *config) error { c.log = l; return nil } }

// WithProgress writes human progress lines to w (default: none).
func WithProgress(w io.Writer) Option { return func(c *config) error { c.progress = w; return nil } }

// WithWorkers sets how many goroutines hash and compress blocks (default: GOMAXPROCS).
func WithWorkers(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("workers %d: want at least 1", n)
		}
		c.workers = n
		return nil
	}
}

// WithLimits sets the decompression-bomb guards: the most uncompressed bytes
// in the whole image (default 64 GiB) and the highest uncompressed ÷
// compressed ratio of a layer bigger than 256 MiB (default 200).
func WithLimits(maxImageBytes, maxRatio int64) Option {
	return func(c *config) error {
		if maxImageBytes <= 0 || maxRatio <= 0 {
			return errors.New("limits must be positive")
		}
		c.limits.maxBytes, c.limits.maxRatio = maxImageBytes, maxRatio
		return nil
	}
}

// Result is what a conversion pushed.
type Result struct {
	Source       string      `json:"source"`        // the source reference as resolved
	SourceDigest string      `json:"source_digest"` // its manifest digest
	Ref          string      `json:"ref"`           // the flat image, as repo:tag@digest
	Digest       string      `json:"digest"`        // the flat image's manifest digest
	Stats        Stats       `json:"stats"`
	Index        *flat.Index `json:"-"`
}

// DefaultDestination names the flat form of src: the same repository, tag
// "<tag>-shoal" (or "sha256-<hex>-shoal" for a digest reference).
func DefaultDestination(src name.Reference) (name.Tag, error) {
	var tag string
	switch r := src.(type) {
	case name.Tag:
		tag = r.TagStr() + flat.TagSuffix
	case name.Digest:
		tag = strings.Replace(r.DigestStr(), ":", "-", 1) + flat.TagSuffix
	default:
		return name.Tag{}, fmt.Errorf("reference %s: neither tag nor digest", src)
	}
	if len(tag) > 128 {
		return name.Tag{}, fmt.Errorf("derived tag %q is longer than the 128 characters registries accept; name the destination explicitly", tag)
	}
	return src.Context().Tag(tag), nil
}

func (c *config) nameOpts() []name.Option {
	if c.plainHTTP {
		return []name.Option{name.Insecure}
	}
	return nil
}

func (c *config) remoteOpts(ctx context.Context) []remote.Option {
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(c.keychain),
		remote.WithTransport(bounded.Transport(c.transport)),
		remote.WithPlatform(c.platform),
	}
}

// Convert reads the image src from its registry, flattens it and pushes the
// flat form to dst (default: DefaultDestination(src)). The source image is
// only read.
func Convert(ctx context.Context, src, dst string, opts ...Option) (*Result, error) {
	c := defaults()
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, err
		}
	}
	srcRef, err := name.ParseReference(src, c.nameOpts()...)
	if err != nil {
		return nil, fmt.Errorf("source reference %q: %w", src, err)
	}
	var dstRef name.Reference
	if dst == "" {
		if dstRef, err = DefaultDestination(srcRef); err != nil {
			return nil, err
		}
	} else if dstRef, err = name.ParseReference(dst, c.nameOpts()...); err != nil {
		return nil, fmt.Errorf("destination reference %q: %w", dst, err)
	}

	img, err := remote.Image(srcRef, c.remoteOpts(ctx)...)
	if err != nil {
		return nil, RegistryError("read", srcRef.String(), err)
	}
	res, flatImg, cleanup, err := build(ctx, img, &c)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	res.Source = srcRef.String()

	c.log.Info("pushing flat image", "component", "converter", "ref", dstRef.String(), "blobs", len(res.Index.Blobs)+1)
	ropts := c.remoteOpts(ctx)
	var done chan struct{}
	if c.progress != nil {
		updates := make(chan v1.Update, 16)
		done = make(chan struct{})
		go func() {
			defer close(done)
			for u := range updates {
				if u.Total > 0 {
					fmt.Fprintf(c.progress, "\rpush %s: %d/%d MB   ", dstRef.Context().RepositoryStr(), u.Complete>>20, u.Total>>20)
				}
			}
			fmt.Fprintln(c.progress)
		}()
		ropts = append(ropts, remote.WithProgress(updates))
	}
	err = remote.Write(dstRef, flatImg, ropts...)
	if done != nil {
		<-done
	}
	if err != nil {
		return nil, RegistryError("push", dstRef.String(), err)
	}
	d, err := flatImg.Digest()
	if err != nil {
		return nil, err
	}
	res.Digest = d.String()
	res.Ref = dstRef.String() + "@" + d.String()
	return res, nil
}

// Build flattens img into a flat image held in a work directory, without
// pushing it. cleanup removes the work directory; call it once the image has
// been written or is no longer needed.
func Build(ctx context.Context, img v1.Image, opts ...Option) (res *Result, flatImg v1.Image, cleanup func(), err error) {
	c := defaults()
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, nil, nil, err
		}
	}
	return build(ctx, img, &c)
}

func build(ctx context.Context, img v1.Image, c *config) (res *Result, flatImg v1.Image, cleanup func(), err error) {
	mt, err := img.MediaType()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("read manifest: %w", err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, nil, nil, RegistryError("read manifest of", "source image", err)
	}
	if m.Config.MediaType == flat.MediaTypeConfig {
		return nil, nil, nil, errors.New("the source is already a shoal flat image")
	}
	srcDigest, err := img.Digest()
	if err != nil {
		return nil, nil, nil, err
	}
	cf, err := bounded.ConfigFile(img)
	if err != nil {
		return nil, nil, nil, RegistryError("read config of", "source image", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, nil, nil, RegistryError("list layers of", "source image", err)
	}

	work, err := os.MkdirTemp(c.workDir, "shoal-convert-")
	if err != nil {
		return nil, nil, nil, fmt.Errorf("work directory: %w", err)
	}
	remove := func() { os.RemoveAll(work) }
	defer func() {
		if err != nil {
			remove()
		}
	}()
	spool, err := os.CreateTemp(work, "spool-")
	if err != nil {
		return nil, nil, nil, fmt.Errorf("spool: %w", err)
	}
	defer spool.Close()

	t := newTree(spool, c.limits, c.log)
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return nil, nil, nil, err
		}
		if err := applyLayer(t, i, l, len(layers), mt, c); err != nil {
			return nil, nil, nil, err
		}
	}
	br, err := t.build(ctx, buildOptions{
		avgBlock: c.avgBlock, blobTarget: c.blobTarget, workers: c.workers,
		workDir: work, level: zstd.SpeedDefault, first: c.first,
	})
	if err != nil {
		return nil, nil, nil, err
	}
	br.index.Source = srcDigest.String()
	indexBlob, err := flat.EncodeBlob(br.index)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("encode index: %w", err)
	}
	st := br.stats
	st.IndexBytes = int64(len(indexBlob))
	st.LayerBytes = t.total
	st.SourceEntries = t.count
	// The source's own config names the platform, so the result does not
	// depend on the machine that converts.
	var plat v1.Platform
	if cf != nil {
		plat = v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}
	}
	flatImg, err = newFlatImage(Config{
		FormatVersion: flat.Version, Source: srcDigest.String(), Platform: plat,
		ImageBytes: st.ImageBytes, Entries: st.Entries, Blocks: st.UniqueBlocks,
	}, indexBlob, br.blobs)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("assemble flat image: %w", err)
	}
	c.log.Info("flattened image", "component", "converter", "entries", st.Entries, "files", st.Files,
		"image_bytes", st.ImageBytes, "blocks", st.UniqueBlocks, "compressed_bytes", st.CompressedBytes)
	return &Result{SourceDigest: srcDigest.String(), Stats: st, Index: br.index}, flatImg, remove, nil
}

func applyLayer(t *tree, i int, l v1.Layer, n int, _ types.MediaType, c *config) error {
	d, err := l.Digest()
	if err != nil {
		return RegistryError("read layer of", "source image", err)
	}
	if mt, err := l.MediaType(); err == nil && !isFilesystemLayer(mt) {
		return fmt.Errorf("layer %s has media type %s, not a filesystem layer", d, mt)
	}
	size, err := l.Size()
	if err != nil {
		return RegistryError("read layer", d.String(), err)
	}
	if c.progress != nil {
		fmt.Fprintf(c.progress, "layer %d/%d %s (%d MB compressed)\n", i+1, n, d.String()[:19], size>>20)
	}
	rc, err := uncompressed(l)
	if err != nil {
		return RegistryError("read layer", d.String(), err)
	}
	defer rc.Close()
	if err := t.apply(i, d.String(), rc, size); err != nil {
		if errors.Is(err, ErrUnsafe) || errors.Is(err, ErrTooLarge) {
			return err
		}
		return RegistryError("read layer", d.String(), err)
	}
	return nil
}

func isFilesystemLayer(mt types.MediaType) bool {
	switch mt {
	case types.DockerLayer, types.DockerUncompressedLayer, types.OCILayer, types.OCIUncompressedLayer,
		types.OCILayerZStd, types.DockerForeignLayer, types.OCIRestrictedLayer, types.OCIUncompressedRestrictedLayer:
		return true
	}
	return false
}

// RegistryError turns a registry or network failure into one clear line.
func RegistryError(op, ref string, err error) error {
	var terr *transport.Error
	if errors.As(err, &terr) {
		switch terr.StatusCode {
		case http.StatusNotFound:
			return fmt.Errorf("%s %s: not found in the registry (check the repository and tag)", op, ref)
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("%s %s: access denied by the registry (run `docker login` for it, or check your credentials)", op, ref)
		case http.StatusTooManyRequests:
			return fmt.Errorf("%s %s: the registry is rate limiting requests; try again later", op, ref)
		}
		if terr.StatusCode >= 500 {
			return fmt.Errorf("%s %s: the registry failed (HTTP %d)", op, ref, terr.StatusCode)
		}
	}
	var nerr net.Error
	var operr *net.OpError
	switch {
	case errors.As(err, &operr):
		return fmt.Errorf("%s %s: registry unreachable: %v", op, ref, operr.Err)
	case errors.As(err, &nerr) && nerr.Timeout():
		return fmt.Errorf("%s %s: registry timed out", op, ref)
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return fmt.Errorf("%s %s: the registry speaks plain HTTP; pass --plain-http", op, ref)
	}
	return fmt.Errorf("%s %s: %w", op, ref, err)
}

// maxLayerWindow is the largest zstd window a layer may ask for: the limit
// of zstd's own decoder by default (window log 27), which only --long or
// --ultra levels past 19 make frames pass. A decoder allocates the window
// a frame header asks for before it decodes a byte, and fills it as it
// decodes: klauspost's default allows 512 MiB, so a few kilobytes of layer
// could make the converter hold half a gigabyte.
const maxLayerWindow = 128 << 20

// uncompressed opens a layer's tar stream. It reads the compressed blob
// (which go-containerregistry verifies against its digest as it is read) and
// picks the decompressor from the magic bytes: klauspost's gzip is about
// twice as fast as the standard library's, which ggcr's Uncompressed uses.
func uncompressed(l v1.Layer) (io.ReadCloser, error) {
	rc, err := l.Compressed()
	if err != nil {
		return nil, err
	}
	return decompressLayer(rc, maxLayerWindow)
}

// decompressLayer returns rc's bytes decompressed if they start with the
// magic of gzip or zstd, as they are otherwise; closing it closes rc. A
// zstd frame may ask for a window of at most maxWindow bytes.
func decompressLayer(rc io.ReadCloser, maxWindow uint64) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(rc, 1<<20)
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		rc.Close()
		return nil, err
	}
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			rc.Close()
			return nil, fmt.Errorf("gzip: %w", err)
		}
		return readCloser{drainAtEOF{zr, br}, func() error { zr.Close(); return rc.Close() }}, nil
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		// For a stream, the decoder's memory limit is its window limit.
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(maxWindow), zstd.WithDecoderMaxMemory(maxWindow))
		if err != nil {
			rc.Close()
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return readCloser{drainAtEOF{zstdLayer{zr, maxWindow}, br}, func() error { zr.Close(); return rc.Close() }}, nil
	}
	return readCloser{br, rc.Close}, nil
}

// zstdLayer says which limit a frame broke when it asks for too large a
// window.
type zstdLayer struct {
	*zstd.Decoder
	maxWindow uint64
}

func (z zstdLayer) Read(p []byte) (int, error) {
	n, err := z.Decoder.Read(p)
	if errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded) {
		err = fmt.Errorf("%w: a zstd frame asks for a window over %d MiB (zstd's own limit by default; --long or --ultra compression passes it)",
			ErrTooLarge, z.maxWindow>>20)
	}
	return n, err
}

// drainAtEOF reads what follows the compressed stream when it ends, so that
// the verifying reader underneath reaches EOF and checks the blob's digest; a
// mismatch surfaces as the read error instead of io.EOF.
type drainAtEOF struct {
	io.Reader
	tail io.Reader
}

func (d drainAtEOF) Read(p []byte) (int, error) {
	n, err := d.Reader.Read(p)
	if errors.Is(err, io.EOF) {
		if _, derr := io.Copy(io.Discard, d.tail); derr != nil {
			return n, derr
		}
	}
	return n, err
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r readCloser) Close() error { return r.close() }
