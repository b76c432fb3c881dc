#!/usr/bin/env bash
# deps.sh installs what Shoal's tests, benchmarks and demo need on a fresh
# Debian machine, and does nothing when everything is already there:
#   - Debian packages: docker-registry (the real registry for integration
#     tests), debootstrap (the Debian image), fuse3, iproute2;
#   - Go modules (go mod download);
#   - Go tools at pinned versions, built from the Go module proxy into
#     $(go env GOPATH)/bin: crictl (the CRI test) and helm (the chart test);
#   - the cached Debian root filesystem tarball (scripts/debian-rootfs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3) # the demo formats its numbers with it
command -v containerd >/dev/null || need+=(containerd) # the snapshotter's tests run the real containerd
command -v runc >/dev/null || need+=(runc)
command -v chromium >/dev/null || need+=(chromium) # the daemon's status page test loads the page headless
command -v systemd-analyze >/dev/null || need+=(systemd) # deploy's test verifies the systemd unit
if ((${#need[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "deps: missing ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
		exit 1
	fi
	echo "deps: installing ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package starts a registry on :5000 as a service; tests start
# their own on free loopback ports and need no other.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
	systemctl stop docker-registry || true
fi
go mod download
# Pinned tools; the tests check the versions too (internal/testenv.CrictlVersion,
# deploy's helmVersion). About 1 and 3 minutes to build on 2 cores, once.
gobin="$(go env GOPATH)/bin"
install_tool() { # name version package: go install'd binaries carry their module's version
	if ! go version -m "$gobin/$1" 2>/dev/null | grep -qP "^\tmod\t\S+\t$2\t"; then
		echo "deps: go install $3@$2" >&2
		GOBIN="$gobin" go install "$3@$2"
	fi
}
install_tool crictl v1.37.0 sigs.k8s.io/cri-tools/cmd/crictl
install_tool helm v3.21.4 helm.sh/helm/v3/cmd/helm
if [[ $(id -u) -eq 0 ]]; then
	scripts/debian-rootfs.sh >/dev/null
else
	echo "deps: not root: the Debian image tarball is built by the first test that needs it, or skipped" >&2
fi
