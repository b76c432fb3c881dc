# Shoal. `make demo` runs a demo against a local registry; `make test` runs the
# tests. Both install what they need first (scripts/deps.sh; root for apt).
GO       ?= go
BIN      := bin/shoal
PKGS     := ./...
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: all build deps test test-short fuzz lint check-docs bench demo ci clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/shoal

deps:
	@scripts/deps.sh

# Two passes: everything with the race detector, then the heavy end-to-end
# tests (built with !race: real images of 150-500 MB) without it.
HEAVY := ./converter ./node ./cmd/shoal
test: deps
	$(GO) test -race -count=1 -timeout 30m $(PKGS)
	$(GO) test -count=1 -timeout 30m -run 'TestConvertDebianImage|TestMountMatchesSource|TestRunFromLazyMount|TestRestartKeepsMounts|TestContainerdRemoteSnapshots|TestContainerdRestart' $(HEAVY) ./snapshotter

test-short:
	$(GO) test -short -count=1 $(PKGS)

# Bounded fuzzing of everything that decodes untrusted bytes: the index, tar
# entries, p2p frames, traces from registries, blob recipes from peers. The
# index, layer, frame and trace targets also fail an input that allocates
# more than a ceiling proportional to its size (docs/untrusted-input.md).
# Budgets are execution counts (Nx), each about 30 s here with an empty fuzz
# cache, not durations: with a duration, Go's fuzz coordinator before Go 1.27
# (golang/go#75804) can fail a target at the end of its window with a bare
# "context deadline exceeded", having found nothing (it did so in CI once). A
# count sets no deadline. FUZZTIME=10s (or 1000x) overrides every budget. The
# minimize budget is small: the default (60 s per new input) starves a short
# run.
FUZZ := $(GO) test -run '^$$' -fuzzminimizetime 50x
fuzz:
	$(FUZZ) -fuzz '^FuzzDecode$$' -fuzztime $(or $(FUZZTIME),600000x) ./flat/
	$(FUZZ) -fuzz '^FuzzDecodeBlob$$' -fuzztime $(or $(FUZZTIME),330000x) ./flat/
	$(FUZZ) -fuzz '^FuzzLayerTar$$' -fuzztime $(or $(FUZZTIME),40000x) ./converter/
	$(FUZZ) -fuzz '^FuzzReadFrame$$' -fuzztime $(or $(FUZZTIME),70000x) ./p2p/
	$(FUZZ) -fuzz '^FuzzUnmarshal$$' -fuzztime $(or $(FUZZTIME),200000x) ./trace/
	$(FUZZ) -fuzz '^FuzzDecodeRecipe$$' -fuzztime $(or $(FUZZTIME),80000x) ./mirror/

lint: check-docs
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)

# Every figure README.md and docs/ quote from a results file carries a
# reference to it (docs/architecture.md, "Quoting a number"); this fails
# when a file does not hold its figure, or a quoted file records no clean
# commit and is not listed as such. go test ./... runs it too.
check-docs:
	$(GO) test -count=1 ./internal/docfigures/

# Benchmarks write JSON under bench/results/ (see ../shared/BENCHMARKS.md),
# each with its commit, date, machine and reproducing command, and only
# from a clean tree: a result from uncommitted code describes code nobody
# can read. Changes under bench/results and simulation/results (outputs)
# do not count; untracked files do (the same rule as provenance.Git, which
# the bench package checks again). SHOAL_BENCH_DIRTY=1 runs anyway and
# marks every file "dirty": true, not for quoting. The recorded trace goes
# to bench/results/trace/, never to the fixture (see trace-fixture).
BENCH_OUTPUTS := ':(top,exclude)bench/results' ':(top,exclude)simulation/results'
bench: clean-tree deps build
	SHOAL_BENCH=1 $(GO) test -count=1 -timeout 90m -run 'Bench' -v ./bench/ 2>&1 | tee bench/results/last-run.log

.PHONY: clean-tree trace-fixture
clean-tree:
	@if [ "$$SHOAL_BENCH_DIRTY" != 1 ] && [ -n "$$(git status --porcelain -- ':/' $(BENCH_OUTPUTS))" ]; then \
		git status --short -- ':/' $(BENCH_OUTPUTS); \
		echo "the tree has uncommitted changes (above): results from it would describe code nobody can read; commit them, or set SHOAL_BENCH_DIRTY=1 for results marked not for quoting" >&2; \
		exit 1; \
	fi

# The trace the simulator's tests and sweeps read
# (simulation/testdata/python-debian.{trace,image}.json) is a fixture: it
# changes only by this target, never by make bench. Record it again when the
# image, the converter or the workload changes, and commit it with the
# change. SHOAL_TRACE_OUT is relative to bench/, where go test runs.
trace-fixture: clean-tree deps build
	SHOAL_BENCH=1 SHOAL_TRACE_OUT=../simulation/testdata $(GO) test -count=1 -timeout 30m -run '^TestBenchRecordTrace$$' -v ./bench/

# The rollout simulator (docs/simulation.md): every strategy at 10 to 10,000
# nodes, JSON and SVG plots under simulation/results/. The first sweep is a
# rollout before any trace is published (reads on demand only); the second,
# with the trace published (each node prefetches its blocks at mount, as the
# daemon does). On 2 cores the first takes about 6 minutes, the second about
# 25 (10,000 nodes prefetching at once).
SIM_TRACE := simulation/testdata/python-debian.trace.json
SIM_FLAGS := --trace $(SIM_TRACE) --nodes 10,100,1000,10000 --zones 4 --racks 4 --registry-mbps 10000 --seeds 4 --seed 1 --log-level info
.PHONY: simulate simulate-gone calibrate
simulate:
	$(GO) run ./cmd/shoal simulate $(SIM_FLAGS) --out simulation/results --name rollout
	$(GO) run ./cmd/shoal simulate $(SIM_FLAGS) --prefetch 98 --out simulation/results --name rollout-traced

# Members of the image's origin group that are gone (drained nodes whose
# provider records live on): the swarm at 1,000 and 10,000 nodes with one
# gone member whose host resets dials, and with two whose addresses are
# silent (a dial fails after 2 s), each beside the what-if of the daemon
# before it left them out (--designate-gone); with two and with four silent
# ones (3 s), beside the what-if of the daemon before it stopped waiting
# for a designated fetcher's dial after 200 ms (--no-designated-hedge); and
# with one member that is up but left the image (a restarted daemon: it
# answers NOT_MEMBER), beside the what-if of the daemon before NOT_MEMBER
# (--not-member-off). JSON under simulation/results/gone/; about 35 minutes
# on 2 cores.
GONE_FLAGS := --trace $(SIM_TRACE) --nodes 1000,10000 --zones 4 --racks 4 --registry-mbps 10000 --seed 1 --strategies lazy-swarm --log-level info
simulate-gone:
	mkdir -p simulation/results/gone
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 1 > simulation/results/gone/reset.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 1 --designate-gone > simulation/results/gone/reset-before.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 2 --gone-dial 2s > simulation/results/gone/silent.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 2 --gone-dial 2s --designate-gone > simulation/results/gone/silent-before.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 2 --gone-dial 2s --no-designated-hedge > simulation/results/gone/silent-nohedge.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 4 --gone-dial 3s > simulation/results/gone/silent4.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --gone 4 --gone-dial 3s --no-designated-hedge > simulation/results/gone/silent4-nohedge.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --left 1 > simulation/results/gone/left.json
	$(GO) run ./cmd/shoal simulate $(GONE_FLAGS) --left 1 --not-member-off > simulation/results/gone/left-before.json

# Byzantine members of the origin group (IDs ground into it) that answer
# every ORIGIN request COMING and send nothing: the swarm at 1,000 and
# 10,000 nodes with one and with two of them, beside the what-if of the
# daemon before p2p.ComingGrace and p2p.BlobGrace (--coming-grace-off).
# JSON under simulation/results/byzantine/; about 25 minutes on 2 cores.
BYZ_FLAGS := --trace $(SIM_TRACE) --nodes 1000,10000 --zones 4 --racks 4 --registry-mbps 10000 --seed 1 --strategies lazy-swarm --log-level info
.PHONY: simulate-byzantine
simulate-byzantine:
	mkdir -p simulation/results/byzantine
	$(GO) run ./cmd/shoal simulate $(BYZ_FLAGS) --liars 1 > simulation/results/byzantine/liar.json
	$(GO) run ./cmd/shoal simulate $(BYZ_FLAGS) --liars 1 --coming-grace-off > simulation/results/byzantine/liar-before.json
	$(GO) run ./cmd/shoal simulate $(BYZ_FLAGS) --liars 2 > simulation/results/byzantine/liar2.json
	$(GO) run ./cmd/shoal simulate $(BYZ_FLAGS) --liars 2 --coming-grace-off > simulation/results/byzantine/liar2-before.json

# The simulator against the real network-namespace rollout: first against
# the committed bench/results/rollout.json (fast), then a fresh real run of
# 12 nodes (root) written with the prediction to bench/results/calibration.json.
calibrate: clean-tree deps build
	$(GO) test -count=1 -run '^TestCalibration$$' -v ./simulation/
	SHOAL_BENCH=1 SHOAL_BENCH_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 30m -run '^TestBenchCalibrate$$' -v ./bench/

# The p2p, daemon and fetch tests under -race, FLAKE_RUNS times in a row
# (default 30), with FLAKE_SIMS rollout simulator sweeps running beside
# them as load (issue 23's check: 2); a summary line per package and run,
# the logs of failed runs kept. Knobs and output: scripts/flake-loop.sh.
.PHONY: flake-loop
flake-loop: deps
	scripts/flake-loop.sh

demo: deps build
	scripts/demo.sh

ci: lint test fuzz

clean:
	rm -rf bin
