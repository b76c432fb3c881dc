//go:build shoal_hostile

// Command byzd is a byzantine member of a Shoal swarm, for the chaos
// rollout (bench/chaos_test.go): a real p2p node that opens a flat image
// from its registry and joins the image's swarm as a daemon does, then
// misbehaves as --mode says (p2p's hostile modes: coming-liar, corrupt,
// busy, silent). With --grind its peer ID is ground into the image's
// origin group first; with --hold-all it holds every block of the image,
// so that readers ask it. It prints "ready <peer ID>" once it is a member,
// and runs until SIGTERM or SIGINT. It is built only with -tags
// shoal_hostile: no shipped binary carries these modes.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/p2p"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "byzd:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		state     = flag.String("state-dir", "", "state directory (identity, blocks)")
		listen    = flag.String("listen", "/ip4/0.0.0.0/tcp/4701", "libp2p listen multiaddr")
		bootstrap = flag.String("bootstrap", "", "a peer to join the DHT through (multiaddr with /p2p/<id>)")
		ref       = flag.String("image", "", "the flat image to join (its -shoal tag or digest reference)")
		plainHTTP = flag.Bool("plain-http", false, "talk plain HTTP to the registry")
		mode      = flag.String("mode", "coming-liar", "hostile mode: coming-liar, corrupt, busy, silent")
		grind     = flag.Bool("grind", false, "grind the peer ID into the image's origin group")
		holdAll   = flag.Bool("hold-all", false, "hold every block of the image (read from the registry before joining)")
	)
	flag.Parse()
	if *state == "" || *ref == "" {
		return fmt.Errorf("--state-dir and --image are required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	im, err := fetch.OpenImage(ctx, *ref, fetch.WithPlainHTTP(*plainHTTP), fetch.WithLogger(log))
	if err != nil {
		return err
	}
	idDir := filepath.Join(*state, "identity")
	if *grind {
		gctx, cancel := context.WithTimeout(ctx, time.Minute)
		key, err := p2p.GrindIdentity(gctx, im.Digest(), 1000)
		cancel()
		if err != nil {
			return fmt.Errorf("grind: %w", err)
		}
		if err := writeIdentity(idDir, key); err != nil {
			return err
		}
	}
	store, err := blockstore.Open(ctx, filepath.Join(*state, "blocks"), blockstore.WithLogger(log))
	if err != nil {
		return err
	}
	defer store.Close()
	if *holdAll {
		got, err := im.Registry().FetchMany(ctx, im.Index().Blocks)
		if err != nil {
			return fmt.Errorf("hold: %w", err)
		}
		for id, data := range got {
			if err := store.Put(ctx, id, data); err != nil {
				return fmt.Errorf("hold: %w", err)
			}
		}
	}
	var boot []string
	if *bootstrap != "" {
		boot = []string{*bootstrap}
	}
	n, err := p2p.New(ctx, p2p.Config{ListenAddrs: []string{*listen}, IdentityDir: idDir, BootstrapPeers: boot, Blocks: store, Logger: log})
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	if err := n.JoinImage(ctx, im.Digest(), im.Index()); err != nil {
		return err
	}
	if err := n.SetHostile(*mode); err != nil {
		return err
	}
	fmt.Println("ready", n.ID())
	return <-done
}

// writeIdentity writes key where p2p.New loads the node's identity.
func writeIdentity(dir string, key crypto.PrivKey) error {
	data, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, p2p.IdentityFile), data, 0o600)
}
