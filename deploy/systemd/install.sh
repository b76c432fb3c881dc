#!/usr/bin/env bash
# install.sh: installs Shoal's daemon under systemd on this machine, with
# the swarm's private-network key.
#
#   first node:   deploy/systemd/install.sh
#                 (makes the key, /etc/shoal/swarm.key)
#   other nodes:  deploy/systemd/install.sh --key swarm.key
#                 (the first node's key file, copied over: scp, your
#                 configuration management, a secret store)
#
# Every node must hold the same key: nodes with another key, or none,
# cannot connect to them. Run again, it keeps /etc/shoal/config.yaml (edit
# it in place) and the key, and replaces the binary and the unit.
#
# Options:
#   --key FILE   install FILE as the swarm's key instead of making one
#   --bin FILE   the shoal binary to install (default: bin/shoal, `make build`)
#   --root DIR   install under DIR instead of /, and start nothing
#   --no-start   do not enable and start the unit
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin="$here/../../bin/shoal"
key=""
root=""
start=1
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
	case $1 in
	--key) [ $# -ge 2 ] || die "--key needs a FILE"; key=$2; shift 2 ;;
	--bin) [ $# -ge 2 ] || die "--bin needs a FILE"; bin=$2; shift 2 ;;
	--root) [ $# -ge 2 ] || die "--root needs a DIR"; root=$2; start=0; shift 2 ;;
	--no-start) start=0; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument $1" ;;
	esac
done
[ -x "$bin" ] || die "no shoal binary at $bin: run make build, or name one with --bin FILE"
[ -z "$key" ] || [ -f "$key" ] || die "no key file $key"

install -D -m 0755 "$bin" "$root/usr/local/bin/shoal"
cfg="$root/etc/shoal/config.yaml"
if [ -e "$cfg" ]; then
	echo "kept $cfg"
else
	install -D -m 0644 "$here/config.yaml" "$cfg"
	echo "installed $cfg: edit it (p2p.bootstrap, labels, mirror.upstreams)"
fi

# The key's path is the shipped config's p2p.psk_file.
k="$root/etc/shoal/swarm.key"
if [ -n "$key" ]; then
	if [ -e "$k" ] && ! cmp -s "$key" "$k"; then
		die "$k holds another key: every node needs the same one; remove it first to replace it"
	fi
	if [ "$key" -ef "$k" ]; then
		chmod 0600 "$k"
	else
		install -m 0600 "$key" "$k"
	fi
	echo "installed the swarm key $k"
elif [ -e "$k" ]; then
	chmod 0600 "$k"
	echo "kept the swarm key $k"
else
	"$root/usr/local/bin/shoal" keygen "$k"
	echo "made the swarm key $k: copy it to every other node and run install.sh --key FILE there"
fi

install -D -m 0644 "$here/shoal.service" "$root/etc/systemd/system/shoal.service"
install -D -m 0644 "$here/shoal-keeper.service" "$root/etc/systemd/system/shoal-keeper.service"
if [ "$start" = 1 ]; then
	systemctl daemon-reload
	systemctl enable --now shoal-keeper shoal
	echo "started: journalctl -u shoal shows its log, shoal status its state"
fi
