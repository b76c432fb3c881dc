// Package bench holds Shoal's benchmarks. Each scenario measures Shoal and a
// baseline that means something to users in the same run, alternating
// (A B A B ...), and writes one JSON file per scenario under bench/results/
// (see BENCHMARKS.md in the shared docs). They are tests, not Go benchmarks,
// because they start real registries and compare against real baselines; they
// run only with SHOAL_BENCH=1 (make bench).
package bench
