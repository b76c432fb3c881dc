#!/usr/bin/env bash
# debian-rootfs.sh builds the root filesystem tarball that shoal's integration
# tests and benchmarks turn into an OCI image (internal/testenv), and prints its
# path on stdout.
#
# The tarball is a Debian bookworm made with
#   debootstrap --variant=minbase --include=python3 bookworm DIR MIRROR
# tarred with numeric owners, xattrs, hard links, symlinks and device nodes as
# debootstrap made them. It takes minutes, so it is built once into a cache
# directory and reused: CI runs this script before the tests, and a test that finds
# no tarball runs it itself. Concurrent callers are serialised with flock, and the
# tarball appears by an atomic rename, so nobody ever reads half of one.
#
# If debootstrap fails (no mirror reachable), the script falls back to a tarball
# assembled from this host's own files (its Debian /usr/bin, shared libraries and
# python3), under a different name so that nobody mistakes it for the real one.
# SHOAL_ROOTFS_FALLBACK=0 turns the fallback off.
#
# Environment:
#   SHOAL_TESTDATA         cache directory (default $HOME/.cache/shoal-testdata)
#   SHOAL_DEBIAN_MIRROR    mirror (default http://deb.debian.org/debian)
#   SHOAL_ROOTFS_FALLBACK  0 to fail instead of assembling from host files
#
# Needs root (debootstrap does). Exit status: 0 with the path printed, non-zero
# with the reason on stderr.
set -euo pipefail
export LC_ALL=C # byte order for sort, so parents precede children

cache="${SHOAL_TESTDATA:-${HOME:?HOME or SHOAL_TESTDATA must be set}/.cache/shoal-testdata}"
mirror="${SHOAL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fallback="${SHOAL_ROOTFS_FALLBACK:-1}"
debian_name=debian-bookworm-minbase-python3.tar
host_name=host-assembled-python3.tar

log() { printf 'debian-rootfs: %s\n' "$*" >&2; }

# tar_tree DIR OUT [PATH...]: a deterministic tar of PATHs (default: all of DIR).
# atime and ctime are dropped and the extended-header names do not carry the pid,
# so the same tree gives the same bytes.
tar_tree() {
	local dir=$1 out=$2
	shift 2
	[ $# -gt 0 ] || set -- .
	tar --create --file "$out" --directory "$dir" \
		--format=pax --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' \
		--numeric-owner --xattrs --xattrs-include='*' \
		--sort=name --one-file-system "$@"
}

mkdir -p "$cache"
exec 9>"$cache/.rootfs.lock"
if ! flock --timeout 3600 9; then
	log "timed out waiting for $cache/.rootfs.lock"
	exit 1
fi

if [ -s "$cache/$debian_name" ]; then
	echo "$cache/$debian_name"
	exit 0
fi

# unmount_under DIR: undo mounts debootstrap made inside DIR and left behind
# when it was killed; rm must never walk into a mounted proc or sys.
unmount_under() {
	local m
	awk -v p="$1/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r | while IFS= read -r m; do
		umount -l "$m" || true
	done
}
# Builds that were killed outright left their directories; we hold the lock,
# so nobody else is using them.
for old in "$cache"/.build.*; do
	[ -d "$old" ] || continue
	unmount_under "$old"
	rm -rf --one-file-system "$old"
done

if [ "$(id -u)" -ne 0 ]; then
	log "debootstrap needs root; run: sudo $0 (or as root with SHOAL_TESTDATA=$cache)"
	exit 2
fi
command -v debootstrap >/dev/null || { log "debootstrap not installed (apt-get install debootstrap)"; exit 2; }

tmp=$(mktemp -d "$cache/.build.XXXXXX")
cleanup() {
	unmount_under "$tmp"
	rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT
trap 'exit 143' TERM INT # exit through the EXIT trap

start=$(date +%s)
log "debootstrap --variant=minbase --include=python3 bookworm from $mirror (takes minutes)"
if debootstrap --variant=minbase --include=python3 bookworm "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1; then
	# Downloaded packages and apt lists are a cache, not part of the system; an
	# image build would drop them too.
	rm -f "$tmp"/rootfs/var/cache/apt/archives/*.deb
	rm -rf "$tmp"/rootfs/var/lib/apt/lists/*
	tar_tree "$tmp/rootfs" "$tmp/out.tar"
	mv -f "$tmp/out.tar" "$cache/$debian_name"
	secs=$(( $(date +%s) - start ))
	printf 'kind=debootstrap\nsuite=bookworm\nvariant=minbase\ninclude=python3\nmirror=%s\nseconds=%s\nbuilt=%s\n' \
		"$mirror" "$secs" "$(date -u +%FT%TZ)" >"$cache/$debian_name.info"
	log "built $cache/$debian_name in ${secs}s ($(stat -c %s "$cache/$debian_name") bytes)"
	echo "$cache/$debian_name"
	exit 0
fi

log "debootstrap failed; last lines of its log:"
tail -n 15 "$tmp/debootstrap.log" >&2 || true
if [ "$fallback" = 0 ]; then
	exit 1
fi
if [ -s "$cache/$host_name" ]; then
	log "using the host-assembled fallback $cache/$host_name (NOT a debootstrap image)"
	echo "$cache/$host_name"
	exit 0
fi

# The fallback: this host's own files, chosen the way debootstrap's minbase
# chooses packages: the host's installed Essential and Priority:required
# packages plus python3 and what it depends on, file by file as dpkg lists
# them, plus the few files debootstrap itself writes (hostname, device nodes).
# Honest about what it is: copies of the host's files, not a fresh install.
log "falling back to a root filesystem assembled from host files (dpkg's file lists)"
command -v dpkg-query >/dev/null || { log "no dpkg-query: not a Debian host, no fallback"; exit 1; }
pkgs=$(
	{
		dpkg-query -W -f='${Package} ${Essential} ${Priority}\n' | awk '$2 == "yes" || $3 == "required" {print $1}'
		apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
			--no-breaks --no-replaces --no-enhances python3 | grep -E '^[a-z0-9]'
	} | sort -u
)
# On a merged-/usr host dpkg still lists /bin/..., /lib/...; name each file by
# its real path so that none is archived twice.
merged() {
	if [ -L /bin ]; then
		sed -E 's#^(bin|sbin|lib|lib32|lib64|libx32)/#usr/\1/#'
	else
		cat
	fi
}
{
	# shellcheck disable=SC2086 # one argument per package
	dpkg-query -L $pkgs 2>/dev/null | grep '^/' | sed 's#^/##' | merged
	printf '%s\n' bin sbin lib lib64 dev dev/null dev/zero dev/full dev/random dev/urandom dev/tty \
		dev/console dev/ptmx etc/hostname etc/motd etc/passwd etc/group etc/shadow etc/gshadow \
		etc/nsswitch.conf etc/ld.so.cache usr/local usr/local/bin usr/local/share tmp root var/tmp
} | grep -vE '^(proc|sys|run)(/|$)' | sort -u | while IFS= read -r p; do
	if [ -n "$p" ] && { [ -e "/$p" ] || [ -L "/$p" ]; }; then
		printf '%s\n' "$p"
	fi
done >"$tmp/files"
tar_tree / "$tmp/out.tar" --no-recursion --verbatim-files-from --files-from="$tmp/files"
mv -f "$tmp/out.tar" "$cache/$host_name"
printf 'kind=host-assembled\npackages=%s\nbuilt=%s\n' "$(tr '\n' ' ' <<<"$pkgs")" "$(date -u +%FT%TZ)" >"$cache/$host_name.info"
log "built $cache/$host_name ($(stat -c %s "$cache/$host_name") bytes, $(wc -l <"$tmp/files") entries; NOT a debootstrap image)"
echo "$cache/$host_name"
