#!/usr/bin/env bash
# demo.sh: Shoal's main job on embedded defaults, against a local registry.
#   1. starts Debian's docker-registry on a free loopback port (temp dir);
#   2. pushes a real Debian bookworm image (debootstrap minbase + python3,
#      three layers with whiteouts, an opaque dir, hard links, symlinks);
#   3. converts it with `shoal convert` and shows the flat image beside it;
#   4. converts again to show the result is deterministic;
#   5. runs python3 from the image with `shoal run`, mounted lazily: only the
#      blocks python touches leave the registry; a second run needs none;
#   6. starts a three-node cluster of daemons on loopback (libp2p, DHT, a
#      private network whose key `shoal keygen` makes) and runs the same
#      command on each: the first node's blocks come from the registry,
#      the others' from their peers.
# Everything it starts is stopped and removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SHOAL_BIN:-bin/shoal}
work=$(mktemp -d -t shoal-demo-XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	scripts/registry.sh stop "$work/registry" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

port=""
for p in $(shuf -i 20000-45000 -n 50); do
	if ! (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || { echo "demo: no free loopback port" >&2; exit 1; }

step "starting docker-registry on 127.0.0.1:$port"
host=$(scripts/registry.sh start "$work/registry" "$port")

step "pushing a Debian bookworm image (debootstrap minbase + python3, 3 layers)"
src=$(go run ./internal/demo -ref "$host/demo/debian:bookworm")
echo "$src"

step "shoal convert --plain-http $host/demo/debian:bookworm"
start=$(date +%s%N)
flat=$("$bin" convert --plain-http "$host/demo/debian:bookworm" | tail -n1)
end=$(date +%s%N)
echo "$flat"
echo "converted in $(( (end - start) / 1000000 )) ms"

step "the registry now holds both tags; the original is untouched"
curl -fsS "http://$host/v2/demo/debian/tags/list"; echo
curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
	"http://$host/v2/demo/debian/manifests/bookworm-shoal" | head -c 600; echo

step "converting again gives the same digest"
again=$("$bin" convert --plain-http "$host/demo/debian:bookworm" "$host/demo/debian:again" 2>/dev/null | tail -n1)
if [ "${again#*@}" = "${flat#*@}" ]; then echo "same digest: ${flat#*@}"; else echo "DIFFERENT: $again vs $flat" >&2; exit 1; fi

stat() { python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("  from registry: %.1f MiB of %.1f MiB in the image (%.1f%%), from peers: %.1f MiB, from cache: %.1f MiB; mounted in %d ms, ran in %d ms" % (s["bytes_from_registry"]/2**20, s["image_bytes"]/2**20, 100*s["bytes_from_registry"]/s["image_bytes"], s["bytes_from_peers"]/2**20, s["bytes_from_cache"]/2**20, s["mount_ms"], s["run_ms"]))' "$1" 2>/dev/null || cat "$1"; }
state="$work/state"
step "shoal run $host/demo/debian:bookworm -- python3 -c 'import json, http.server; print(\"ok\")'   (cold: empty cache)"
"$bin" run --plain-http --state-dir "$state" --stats "$work/cold.json" "$host/demo/debian:bookworm" -- python3 -c 'import json, http.server; print("ok")'
stat "$work/cold.json"

step "the same again (warm: blocks come from the local cache)"
"$bin" run --plain-http --state-dir "$state" --stats "$work/warm.json" "$host/demo/debian:bookworm" -- python3 -c 'import json, http.server; print("ok")'
stat "$work/warm.json"

step "a three-node cluster: one daemon per node, peers on loopback, one private-network key"
"$bin" keygen "$work/swarm.key"
echo "made the swarm's key: $work/swarm.key (only nodes holding it can connect)"
boot=""
for i in 1 2 3; do
	args=(daemon --state-dir "$work/node$i" --plain-http --listen /ip4/127.0.0.1/tcp/0 --psk-file "$work/swarm.key" --log-level warn)
	[ -n "$boot" ] && args+=(--bootstrap "$boot")
	"$bin" "${args[@]}" 2>"$work/node$i.log" &
	pids+=($!)
	for _ in $(seq 100); do "$bin" status --state-dir "$work/node$i" >/dev/null 2>&1 && break; sleep 0.1; done
	if [ -z "$boot" ]; then
		boot=$("$bin" status --state-dir "$work/node1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["addrs"][0])')
		echo "node1 is $boot"
	fi
done
for i in 1 2 3; do
	echo "node$i: shoal run ... python3 -c 'import json, http.server; print(\"ok\")'"
	"$bin" run --state-dir "$work/node$i" --stats "$work/node$i.json" "$host/demo/debian:bookworm" -- python3 -c 'import json, http.server; print("ok")'
	stat "$work/node$i.json"
	sleep 0.5 # let the blocks' announcements reach the others
done

step "done: the registry served the blocks python reads once; peers served the rest"
