#!/usr/bin/env bash
# registry.sh runs Debian's docker-registry (CNCF distribution v2) on a loopback
# port for demos and CI, with the same settings as internal/testenv's
# StartRegistry: filesystem storage under DIR/data, deletes enabled, the access
# log in DIR/access.log, everything else at level warn in DIR/registry.log.
#
#   registry.sh start DIR PORT   start it, wait until GET /v2/ answers, print HOST
#   registry.sh stop DIR         SIGTERM, then SIGKILL after 10 s; idempotent
#   registry.sh status DIR       print HOST and exit 0 if it is running
#
# HOST is 127.0.0.1:PORT, the registry part of an image reference. It listens
# on 127.0.0.1 only. SHOAL_REGISTRY_BIN overrides /usr/bin/docker-registry.
set -euo pipefail

bin=${SHOAL_REGISTRY_BIN:-/usr/bin/docker-registry}

usage() {
	echo "usage: $0 start DIR PORT | stop DIR | status DIR" >&2
	exit 2
}
log() { printf 'registry: %s\n' "$*" >&2; }

# pid_of DIR: the pid of the registry started in DIR, if it still runs.
pid_of() {
	local f=$1/registry.pid pid
	[ -s "$f" ] || return 1
	pid=$(cat "$f")
	[ -d "/proc/$pid" ] || return 1
	# The pid may have been reused by another program since.
	[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$bin")" ] || return 1
	echo "$pid"
}

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then usage; fi

case "$cmd" in
start)
	port=${3:-}
	if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -eq 0 ] || [ "$port" -gt 65535 ]; then usage; fi
	if [ ! -x "$bin" ]; then
		log "$bin not found: apt-get install docker-registry"
		exit 1
	fi
	mkdir -p "$dir/data"
	dir=$(cd "$dir" && pwd)
	host=127.0.0.1:$port
	if pid=$(pid_of "$dir"); then
		log "already running in $dir (pid $pid)"
		cat "$dir/host"
		exit 0
	fi
	cat >"$dir/config.yml" <<CONFIG
version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $host
  # Fixed, so that an upload survives a restart; this is a loopback test registry.
  secret: shoal-testenv-not-secret
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
CONFIG
	# Its own session, so that it outlives this shell and a terminal's hangup.
	setsid "$bin" serve "$dir/config.yml" >>"$dir/access.log" 2>>"$dir/registry.log" </dev/null &
	pid=$!
	echo "$pid" >"$dir/registry.pid"
	echo "$host" >"$dir/host"
	for _ in $(seq 1 300); do
		if curl -fsS -o /dev/null --max-time 1 "http://$host/v2/" 2>/dev/null; then
			echo "$host"
			exit 0
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			log "exited at start; its log:"
			tail -n 20 "$dir/registry.log" >&2 || true
			rm -f "$dir/registry.pid"
			exit 1
		fi
		sleep 0.05
	done
	log "not answering on http://$host/v2/ after 15 s; stopping it"
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$dir/registry.pid"
	exit 1
	;;
stop)
	if ! pid=$(pid_of "$dir"); then
		rm -f "$dir/registry.pid"
		exit 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 100); do
		[ -d "/proc/$pid" ] || break
		sleep 0.1
	done
	if [ -d "/proc/$pid" ]; then
		log "pid $pid ignored SIGTERM for 10 s; killing it"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$dir/registry.pid"
	;;
status)
	if pid_of "$dir" >/dev/null; then
		cat "$dir/host"
	else
		exit 1
	fi
	;;
*)
	usage
	;;
esac
