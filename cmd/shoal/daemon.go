package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/node"
)

// labels is a repeatable --label key=value flag.
type labels map[string]string

func (l labels) String() string { return fmt.Sprint(map[string]string(l)) }
func (l labels) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want key=value, got %q", s)
	}
	l[k] = v
	return nil
}

func runDaemon(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("daemon", stderr)
	config := fs.String("config", "", "YAML config file (keys: state_dir, socket, metrics_addr, plain_http, cache_quota, labels); flags override it")
	stateDir := fs.String("state-dir", "", "state directory (default "+node.DefaultStateDir()+")")
	socket := fs.String("socket", "", "API socket (default <state-dir>/shoal.sock)")
	metrics := fs.String("metrics-addr", "", "serve Prometheus metrics (/metrics) and the status page (/) on this address, unauthenticated: keep it on loopback, e.g. 127.0.0.1:9464 (default: off)")
	plain := fs.Bool("plain-http", false, "talk plain HTTP to registries")
	quota := fs.Int64("cache-quota", -1, "block cache size limit in bytes (0: unlimited)")
	lbl := labels{}
	fs.Var(lbl, "label", "a node label key=value (zone, rack), repeatable")
	kubeNode := fs.String("kube-node", "", "in a Kubernetes pod: take the zone (and rack) labels from this Node object, read with the pod's service account; --label overrides")
	kubeRack := fs.String("kube-rack-label", "", "with --kube-node: the Node label that holds the rack (none by default)")
	var listen, bootstrap multi
	fs.Var(&listen, "listen", "p2p listen multiaddr, repeatable (default /ip4/0.0.0.0/tcp/4701)")
	fs.Var(&bootstrap, "bootstrap", "p2p bootstrap peer multiaddr ending in /p2p/<id>, repeatable")
	pskFile := fs.String("psk-file", "", "private network key file (shoal keygen): only nodes with the same key can connect; a missing file stops the daemon")
	noP2P := fs.Bool("no-p2p", false, "no swarm: fetch from the registry only")
	uploads := fs.Int("upload-streams", 0, "concurrent block uploads to peers (default 4)")
	uploadRate := fs.Int64("upload-bytes-per-sec", 0, "cap on bytes/s uploaded to peers (0: unlimited)")
	keeperSock := fs.String("keeper-socket", "", "socket of `shoal keeper`, which holds the mounts so that they outlive the daemon (default: none; mounts end with the daemon)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: no arguments expected", errUsage)
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	var cfg daemon.Config
	if *config != "" {
		if cfg, err = daemon.LoadConfig(*config); err != nil {
			return err
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["state-dir"] {
		cfg.StateDir = *stateDir
	}
	if set["socket"] {
		cfg.Socket = *socket
	}
	if set["metrics-addr"] {
		cfg.MetricsAddr = *metrics
	}
	if set["plain-http"] {
		cfg.PlainHTTP = *plain
	}
	if set["cache-quota"] {
		cfg.CacheQuota = *quota
	}
	if len(listen) > 0 {
		cfg.P2P.Listen = listen
	}
	if len(bootstrap) > 0 {
		cfg.P2P.Bootstrap = bootstrap
	}
	if set["psk-file"] {
		cfg.P2P.PSKFile = *pskFile
	}
	if set["no-p2p"] {
		cfg.P2P.Disabled = *noP2P
	}
	if set["upload-streams"] {
		cfg.P2P.UploadStreams = *uploads
	}
	if set["upload-bytes-per-sec"] {
		cfg.P2P.UploadBytesPerSec = *uploadRate
	}
	if set["keeper-socket"] {
		cfg.KeeperSocket = *keeperSock
	}
	if *kubeNode != "" {
		kl, err := kubeNodeLabels(ctx, *kubeNode, *kubeRack)
		if err != nil {
			return err
		}
		log.Info("labels from the Kubernetes node", "node", *kubeNode, "labels", kl)
		for k, v := range kl {
			if cfg.Labels == nil {
				cfg.Labels = map[string]string{}
			}
			cfg.Labels[k] = v
		}
	}
	for k, v := range lbl {
		if cfg.Labels == nil {
			cfg.Labels = map[string]string{}
		}
		cfg.Labels[k] = v
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		return err
	}
	if cfg.KeeperSocket != "" {
		fmt.Fprintln(stderr, "shoal daemon: starting (SIGTERM or Ctrl-C stops it and leaves its mounts to the keeper for the next daemon)")
	} else {
		fmt.Fprintln(stderr, "shoal daemon: starting (SIGTERM or Ctrl-C stops it and unmounts everything)")
	}
	return d.Run(ctx)
}

// multi is a repeatable string flag.
type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, _ := newFlags("status", stderr)
	stateDir := fs.String("state-dir", node.DefaultStateDir(), "state directory of the daemon")
	socket := fs.String("socket", "", "API socket (default <state-dir>/shoal.sock)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	sock := *socket
	if sock == "" {
		sock = daemon.SocketPath(*stateDir)
	}
	c, err := daemon.Dial(ctx, sock)
	if err != nil {
		return err
	}
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(st)
}

// dialDaemon returns a client when a daemon serves the state directory.
func dialDaemon(ctx context.Context, stateDir string) *daemon.Client {
	c, err := daemon.Dial(ctx, daemon.SocketPath(stateDir))
	if err != nil {
		return nil
	}
	return c
}
