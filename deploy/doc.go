// Package deploy holds the files that install Shoal's daemon on machines,
// and the tests that keep them working: they are not code, so nothing else
// would notice a typo in them before an operator does.
//
//   - systemd/: a unit (shoal.service), the daemon's config file with
//     every key, commented (config.yaml), and install.sh, which installs
//     them with the swarm's private-network key (made on the first node,
//     copied to the others).
//   - kubernetes/: a namespace, RBAC for reading the node's zone label,
//     the daemon's config as a ConfigMap, and a privileged DaemonSet that
//     mounts the swarm's key from a Secret made at install (never
//     shipped) and probes the daemon through its API socket.
//   - containerd/: containerd's config (the proxy snapshotter, CRI) and
//     hosts.toml files that send pulls through the daemon's registry
//     mirror.
//   - Dockerfile: the daemon's image for the DaemonSet (not built by the
//     tests: the test machines have no image builder).
//
// The tests decode every Kubernetes manifest strictly into the Kubernetes
// API types (an unknown field or kind fails), the daemon configs with the
// daemon's own strict loader, and the TOML strictly into the containerd
// schema subset used; they hand the unit to systemd-analyze and the
// containerd config to containerd itself; they run install.sh into a
// directory; and they check that the pieces agree (paths, ports, sockets,
// flags, names, the Secret and the key file) and that the defaults are
// the secure ones: metrics and the status page on loopback, a private
// swarm. There is no Helm chart: its
// templates could only be checked by rendering them with Helm, a large
// dependency for a handful of values an operator edits in place.
package deploy
