package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/shoal-project/shoal/sandbox"
)

// exitStatus carries a command's exit status out of `shoal run`.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// RunStats is what `shoal run --stats FILE` writes.
type RunStats struct {
	Ref               string `json:"ref"`
	LocalConversion   bool   `json:"local_conversion"`
	BytesFromCache    int64  `json:"bytes_from_cache"`
	BytesFromPeers    int64  `json:"bytes_from_peers"`
	BytesFromRegistry int64  `json:"bytes_from_registry"`
	RegistryWireBytes int64  `json:"registry_wire_bytes"` // compressed bytes on the wire, gaps included
	RegistryRequests  int64  `json:"registry_requests"`
	BlocksFetched     int64  `json:"blocks_fetched"`
	ImageBytes        int64  `json:"image_bytes"`
	BytesRead         int64  `json:"bytes_read"` // bytes the kernel read from the mount
	MountMS           int64  `json:"mount_ms"`
	RunMS             int64  `json:"run_ms"`
	ExitCode          int    `json:"exit_code"`
}

func runRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("run", stderr)
	nf := addNodeFlags(fs)
	statsFile := fs.String("stats", "", "write JSON stats (bytes by source, mount and run times) to this file")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal run [flags] REF -- CMD [ARGS...]\n\nRuns CMD in the image REF, mounted lazily with a writable overlay on top, in\nits own mount and PID namespaces. Exits with CMD's status. Every mount it\nmakes is gone when it returns.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) < 2 || (rest[1] == "--" && len(rest) < 3) {
		return fmt.Errorf("%w: want REF -- CMD [ARGS...]", errUsage)
	}
	ref, cmdArgs := rest[0], rest[1:]
	if cmdArgs[0] == "--" {
		cmdArgs = cmdArgs[1:]
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	start := time.Now()
	n, err := nf.open(ctx, log, stderr)
	if err != nil {
		return err
	}
	defer n.Close()
	img, err := n.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	m, err := n.Mount(ctx, img, "")
	if err != nil {
		return err
	}
	defer m.Close()
	mounted := time.Now()

	upper, work := filepath.Join(m.RunDir, "upper"), filepath.Join(m.RunDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	spec := sandbox.Spec{Lower: m.Dir, Upper: upper, Work: work, Args: cmdArgs,
		Stdin: os.Stdin, Stdout: stdout, Stderr: stderr, Hostname: "shoal"}
	if cf := img.Config; cf != nil {
		spec.Env, spec.Dir = cf.Config.Env, cf.Config.WorkingDir
	}
	runErr := sandbox.Run(ctx, spec)
	ran := time.Now()
	code := 0
	var ee *sandbox.ExitError
	switch {
	case errors.As(runErr, &ee):
		code = ee.ExitCode()
	case runErr != nil:
		return runErr
	}
	fsStats := m.FS.Stats()
	closeErr := m.Close()
	if *statsFile != "" {
		cs := img.Chain.Stats()
		st := RunStats{
			Ref: img.Ref, LocalConversion: img.Local,
			BytesFromCache: cs.BytesFromCache, BytesFromPeers: cs.BytesFromPeers, BytesFromRegistry: cs.BytesFromRegistry,
			BlocksFetched: cs.BlocksFetched, ImageBytes: int64(img.Index.ImageBytes()), BytesRead: fsStats.ReadBytes,
			MountMS: mounted.Sub(start).Milliseconds(), RunMS: ran.Sub(mounted).Milliseconds(), ExitCode: code,
		}
		if img.Registry != nil {
			rs := img.Registry.Stats()
			st.RegistryWireBytes, st.RegistryRequests = rs.Bytes, rs.Requests
		}
		b, _ := json.MarshalIndent(st, "", "  ")
		if err := os.WriteFile(*statsFile, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("write stats: %w", err)
		}
	}
	if closeErr != nil {
		return closeErr
	}
	if code != 0 {
		return exitStatus(code)
	}
	return nil
}
