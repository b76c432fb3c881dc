// Package cri lets the Shoal snapshotter act with the credentials a
// Kubernetes pull carries.
//
// The kubelet sends a pod's image pull secrets with each PullImage call of
// the CRI image service. containerd's CRI plugin uses them to pull, and
// prepares the image's snapshots during that call, but the labels it
// passes to a remote snapshotter (containerd.io/snapshot/cri.image-ref and
// friends) carry no credentials. A remote snapshotter that reads the
// image's flat form itself must therefore either use the node's own
// credentials — lending them to every pod on the node, whatever its
// secrets — or learn the pull's.
//
// Proxy is a CRI image service to put between the kubelet and containerd
// (the kubelet's imageServiceEndpoint; crictl's --image-endpoint). It
// forwards every call unchanged; on PullImage it first records the
// request's credentials for the image's repository in Credentials,
// replacing what an earlier pull of that repository left, anonymous
// included. Credentials.Keychain is what the daemon's snapshotter reads
// the registry with when CRI is on: the credentials of the latest pull of
// the repository, or none — never the node's. stargz-snapshotter's "CRI
// keychain" works the same way.
//
// What this does not change: containerd still pulls (and resolves the tag)
// with the request's credentials, so a pod whose credentials the registry
// refuses fails in containerd before the snapshotter is asked anything.
// The registry mirror receives the credentials from containerd itself.
//
// Limits. Credentials are kept in memory only, per repository, for
// DefaultTTL after the pull and for at most DefaultMaxRepositories
// repositories: a flat snapshot that must be mounted again after the
// daemon restarted is mounted with the credentials of a pull since, or
// anonymously. Concurrent pulls of one repository with different
// credentials share the latest; a pull whose credentials do not reach the
// flat form falls back to containerd's ordinary unpack.
package cri
