package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/lazyfs"
	"github.com/shoal-project/shoal/sandbox"
	"github.com/shoal-project/shoal/trace"
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
	// Blocks the command's reads waited on: already cached when asked
	// (prefetched from the start-up trace, or read before) or fetched.
	DemandLocalBlocks  int64 `json:"demand_local_blocks"`
	DemandRemoteBlocks int64 `json:"demand_remote_blocks"`
}

func runRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("run", stderr)
	nf := addNodeFlags(fs)
	statsFile := fs.String("stats", "", "write JSON stats (bytes by source, mount and run times) to this file")
	traceFile := fs.String("record-trace", "", "record the order in which the command first reads the image's blocks to this file (publish it with `shoal trace push`)")
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
	var mt *heldMount
	record := *traceFile != ""
	if c := dialDaemon(ctx, *nf.stateDir); c != nil {
		mt, err = mountWithDaemon(ctx, c, ref, record)
	} else {
		mt, err = mountInProcess(ctx, nf, log, stderr, ref, record)
	}
	if err != nil {
		return err
	}
	defer mt.finish() // on early errors; finishing twice is harmless
	mounted := time.Now()

	upper, work := filepath.Join(mt.runDir, "upper"), filepath.Join(mt.runDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	spec := sandbox.Spec{Lower: mt.dir, Upper: upper, Work: work, Args: cmdArgs, Env: mt.env, Dir: mt.workDir,
		Stdin: os.Stdin, Stdout: stdout, Stderr: stderr, Hostname: "shoal"}
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
	st, closeErr := mt.finish()
	if record {
		if mt.trace == nil || len(mt.trace.Events) == 0 {
			return errors.New("record trace: the command read no block of the image")
		}
		mt.trace.Command = strings.Join(cmdArgs, " ")
		if err := trace.WriteFile(*traceFile, mt.trace); err != nil {
			return err
		}
		size, stored := mt.trace.Bytes()
		fmt.Fprintf(stderr, "trace: %d blocks (%s, %s stored) in %s written to %s\n", len(mt.trace.Events), human(size), human(stored),
			time.Duration(mt.trace.Window).Round(time.Millisecond), *traceFile)
	}
	if *statsFile != "" {
		st.MountMS, st.RunMS, st.ExitCode = mounted.Sub(start).Milliseconds(), ran.Sub(mounted).Milliseconds(), code
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

// heldMount is a lazy mount for `run`, held in this process or by the daemon.
type heldMount struct {
	dir, runDir string
	env         []string
	workDir     string
	finish      func() (RunStats, error) // unmounts and returns the counters; idempotent
	trace       *trace.Trace             // after finish, when recording
}

func mountInProcess(ctx context.Context, nf nodeFlags, log *slog.Logger, stderr io.Writer, ref string, record bool) (*heldMount, error) {
	n, err := nf.open(ctx, log, stderr)
	if err != nil {
		return nil, err
	}
	img, err := n.Resolve(ctx, ref)
	if err != nil {
		n.Close()
		return nil, err
	}
	var opts []lazyfs.Option
	var rec *trace.Recorder
	if record {
		if img.Digest == "" {
			n.Close()
			return nil, fmt.Errorf("record trace: %s has no flat form in its registry (convert it with `shoal convert` first)", ref)
		}
		// Without materialized files every first read reaches lazyfs.
		rec = trace.NewRecorder(img.Digest, img.Index, 0)
		opts = append(opts, lazyfs.WithAccessObserver(rec), lazyfs.WithBackingDir("", 0))
	}
	m, err := n.Mount(ctx, img, "", opts...)
	if err != nil {
		n.Close()
		return nil, err
	}
	rm := &heldMount{dir: m.Dir, runDir: m.RunDir}
	if cf := img.Config; cf != nil {
		rm.env, rm.workDir = cf.Config.Env, cf.Config.WorkingDir
	}
	var once sync.Once
	var st RunStats
	var ferr error
	rm.finish = func() (RunStats, error) {
		once.Do(func() {
			fsStats := m.FS.Stats()
			if rec != nil {
				rec.Stop()
				rm.trace = rec.Trace()
			}
			ferr = errors.Join(m.Close(), n.Close())
			var rs *fetch.RegistryStats
			if img.Registry != nil {
				r := img.Registry.Stats()
				rs = &r
			}
			st = runStats(img.Ref, img.Local, int64(img.Index.ImageBytes()), img.Chain.Stats(), rs, fsStats)
			st.DemandLocalBlocks, st.DemandRemoteBlocks = m.Demand.Local.Load(), m.Demand.Remote.Load()
		})
		return st, ferr
	}
	return rm, nil
}

func mountWithDaemon(ctx context.Context, c *daemon.Client, ref string, record bool) (*heldMount, error) {
	mi, err := c.Mount(ctx, daemon.MountRequest{Ref: ref, RecordTrace: record})
	if err != nil {
		return nil, err
	}
	rm := &heldMount{dir: mi.Dir, runDir: mi.RunDir, env: mi.Env, workDir: mi.WorkingDir}
	var once sync.Once
	var st RunStats
	var ferr error
	rm.finish = func() (RunStats, error) {
		once.Do(func() {
			// Unmount even when the run was interrupted.
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			fin, err := c.Unmount(uctx, daemon.UnmountRequest{ID: mi.ID})
			ferr = err
			rm.trace = fin.Trace
			st = runStats(fin.Ref, fin.Local, fin.ImageBytes, fin.Fetch, fin.Registry, fin.FS)
			st.DemandLocalBlocks, st.DemandRemoteBlocks = fin.DemandLocal, fin.DemandRemote
		})
		return st, ferr
	}
	return rm, nil
}

func runStats(ref string, local bool, imageBytes int64, fs fetch.Stats, rs *fetch.RegistryStats, lfs lazyfs.Stats) RunStats {
	st := RunStats{
		Ref: ref, LocalConversion: local,
		BytesFromCache: fs.BytesFromCache, BytesFromPeers: fs.BytesFromPeers, BytesFromRegistry: fs.BytesFromRegistry,
		BlocksFetched: fs.BlocksFetched, ImageBytes: imageBytes, BytesRead: lfs.ReadBytes,
	}
	if rs != nil {
		st.RegistryWireBytes, st.RegistryRequests = rs.Bytes, rs.Requests
	}
	return st
}
