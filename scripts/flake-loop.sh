#!/bin/sh
# flake-loop.sh: runs the race-built tests of the packages whose tests lean
# on timing (p2p, daemon, fetch) RUNS times in a row, optionally with
# rollout simulator sweeps running beside them as load, and reports every
# run: which package failed, which tests, how long each took.
#
#   FLAKE_RUNS   runs (default 30)
#   FLAKE_PKGS   packages (default "./p2p ./daemon ./fetch")
#   FLAKE_SIMS   simulator sweeps kept running beside the tests (default 0;
#                issue 23's check uses 2), each the first sweep of
#                make simulate, restarted when it ends, written to a
#                scratch directory (never simulation/results)
#   FLAKE_RUN    a -run pattern to narrow the tests (default: all)
#   FLAKE_OUT    directory for logs and the summary (default: a new one
#                under ${TMPDIR:-/tmp})
#
# The test binaries are built once, so every run tests the same code. The
# summary (summary.txt) has one line per package and run; the logs of
# failed runs are kept beside it. Exit status: 1 if any run failed.
set -eu

runs=${FLAKE_RUNS:-30}
pkgs=${FLAKE_PKGS:-"./p2p ./daemon ./fetch"}
sims=${FLAKE_SIMS:-0}
pattern=${FLAKE_RUN:-.}
root=$(git rev-parse --show-toplevel)
out=${FLAKE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/flake-loop.XXXXXX")}
mkdir -p "$out/bin"
cd "$root"

for p in $pkgs; do
	name=$(basename "$p")
	go test -race -c -o "$out/bin/$name.test" "$p"
done

simpids=""
# A sweep stops at SIGTERM within seconds; wait for it, so that the load
# ends with the script.
stop_sims() {
	for pid in $simpids; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in $simpids; do
		wait "$pid" 2>/dev/null || true
	done
	simpids=""
}
trap stop_sims EXIT INT TERM
if [ "$sims" -gt 0 ]; then
	go build -o "$out/bin/shoal" ./cmd/shoal
	i=0
	while [ "$i" -lt "$sims" ]; do
		i=$((i + 1))
		mkdir -p "$out/sim$i"
		(
			child=""
			trap 'test -z "$child" || { kill "$child"; wait "$child"; } 2>/dev/null; exit 0' TERM
			while :; do
				"$out/bin/shoal" simulate --trace simulation/testdata/python-debian.trace.json \
					--nodes 10,100,1000,10000 --zones 4 --racks 4 --registry-mbps 10000 \
					--seeds 4 --seed 1 --out "$out/sim$i" --name rollout >"$out/sim$i/log" 2>&1 &
				child=$!
				wait "$child" || exit 1
				echo "sweep done $(date -u +%T)" >>"$out/sim$i/sweeps"
			done
		) &
		simpids="$simpids $!"
	done
fi

{
	echo "flake loop: $runs runs of $pkgs (-run '$pattern'), $sims simulator sweeps beside"
	echo "commit $(git rev-parse --short HEAD)$(test -z "$(git status --porcelain)" || echo -dirty), $(nproc) cores, $(uname -r), start $(date -u +%FT%TZ)"
} | tee "$out/summary.txt"

failed=0
run=0
while [ "$run" -lt "$runs" ]; do
	run=$((run + 1))
	for p in $pkgs; do
		name=$(basename "$p")
		log="$out/$name.$run.log"
		start=$(date +%s)
		if (cd "$p" && "$out/bin/$name.test" -test.count=1 -test.timeout=30m -test.run "$pattern" >"$log" 2>&1); then
			status=ok
			rm -f "$log"
		else
			status=FAIL
			failed=$((failed + 1))
		fi
		line="run $run $name $status $(($(date +%s) - start))s"
		if [ "$status" = FAIL ]; then
			line="$line: $(grep -E '^\s*--- FAIL' "$log" | sed 's/^ *--- FAIL: //; s/ (.*//' | tr '\n' ' ')(log $log)"
		fi
		echo "$line" | tee -a "$out/summary.txt"
	done
done

sweeps=0
for f in "$out"/sim*/sweeps; do
	[ -f "$f" ] && sweeps=$((sweeps + $(wc -l <"$f")))
done
echo "end $(date -u +%FT%TZ): $failed failed package runs of $((runs * $(echo $pkgs | wc -w))); $sweeps simulator sweeps completed beside" | tee -a "$out/summary.txt"
echo "summary: $out/summary.txt"
[ "$failed" -eq 0 ]
