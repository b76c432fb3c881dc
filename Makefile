# Shoal. `make demo` runs a demo against a local registry; `make test` runs the
# tests. Both install what they need first (scripts/deps.sh; root for apt).
GO       ?= go
BIN      := bin/shoal
PKGS     := ./...
FUZZTIME ?= 30s
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: all build deps test test-short fuzz lint bench demo ci clean

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
	$(GO) test -count=1 -timeout 30m -run 'TestConvertDebianImage|TestMountMatchesSource|TestRunFromLazyMount' $(HEAVY)

test-short:
	$(GO) test -short -count=1 $(PKGS)

# Bounded fuzzing of the index decoder and the tar-entry handling. The
# minimize budget is small: the default (60 s per new input) starves a short run.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 50x ./flat/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeBlob$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 50x ./flat/
	$(GO) test -run '^$$' -fuzz '^FuzzLayerTar$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 50x ./converter/
	$(GO) test -run '^$$' -fuzz '^FuzzReadFrame$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 50x ./p2p/

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)

# Benchmarks write JSON under bench/results/ (see ../shared/BENCHMARKS.md).
bench: deps build
	SHOAL_BENCH=1 $(GO) test -count=1 -timeout 90m -run 'Bench' -v ./bench/ 2>&1 | tee bench/results/last-run.log

demo: deps build
	scripts/demo.sh

ci: lint test fuzz

clean:
	rm -rf bin
