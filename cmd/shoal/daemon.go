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
	metrics := fs.String("metrics-addr", "", "serve Prometheus metrics on this address, e.g. 127.0.0.1:9464")
	plain := fs.Bool("plain-http", false, "talk plain HTTP to registries")
	quota := fs.Int64("cache-quota", -1, "block cache size limit in bytes (0: unlimited)")
	lbl := labels{}
	fs.Var(lbl, "label", "a node label key=value (zone, rack), repeatable")
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
	fmt.Fprintln(stderr, "shoal daemon: starting (SIGTERM or Ctrl-C stops it and unmounts everything)")
	return d.Run(ctx)
}

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
