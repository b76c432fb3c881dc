// Package netlab is a small lab of hosts in Linux network namespaces, for tests
// that need a real network between shoal daemons and a registry: separate
// addresses, a shared layer-2 segment, and links shaped with tc tbf.
//
// # Topology
//
// A [Lab] is one Ethernet segment. [New] creates a "switch" namespace that
// holds a Linux bridge and nothing else: no address, no route. Each
// [Lab.AddHost] creates one more namespace (the host) with lo up and a veth
// pair: eth0 inside the host, the other end inside the switch namespace as a
// port of the bridge.
//
//	 switch namespace shoalnl-ID                host namespaces
//	┌─────────────────────────────┐           ┌───────────────────────┐
//	│ bridge nlIDbr               │── nlIDh0 ─┤ eth0 198.18.0.2/16    │ shoalnl-ID-a
//	│ (no address, no route)      │── nlIDh1 ─┤ eth0 198.18.0.3/16    │ shoalnl-ID-b
//	│                             │── nlIDh2 ─┤ eth0 198.18.0.4/16    │ shoalnl-ID-registry
//	└─────────────────────────────┘           └───────────────────────┘
//
// Nothing is created in the host's own (root) namespace, so a lab cannot touch
// the machine's real network, and two labs (say two test binaries that go test
// runs in parallel) are separate segments even though both use the same
// addresses.
//
// # The address rule
//
// A test may talk only to loopback and to lab hosts, whose addresses come from
// the benchmarking range 198.18.0.0/15 (RFC 2544). Hosts get 198.18.0.2,
// 198.18.0.3, … in order of creation, continuing in 198.18.1.0/24 and so on
// after 198.18.0.254 (no host address ends in .0 or .255); every host is on the
// one on-link subnet 198.18.0.0/16. There is no default route, no NAT and no
// forwarding (net.ipv4.ip_forward is 0 in every lab namespace), and IPv6 is
// disabled in them so not even link-local traffic appears; a packet to any
// other address fails with "network unreachable" before it is sent.
// [Host.DialContext] and [Host.HTTPClient] refuse addresses outside the range
// and loopback, and commands run with [Host.Command] get an environment
// without proxy variables.
//
// # Shaping
//
// [WithRate] puts a tbf qdisc on both ends of a host's veth pair: on eth0 in
// the host (what the host sends) and on the bridge port in the switch (what it
// receives). Each direction is capped separately, and only on that host's
// link, so a registry behind a 50 Mbit/s link serves at most about 6 MB/s in
// total while hosts without a rate talk to each other at memory speed.
// [Host.SetRate] changes or removes the cap while the lab runs. Latency, loss
// and jitter are not offered: they need the netem qdisc, which this kernel
// does not have.
//
// # Processes
//
// [Host.Command] runs a program inside a host's network namespace with
// nsenter(1), which switches only the network namespace: the program shares
// the test's file system and mounts, so a daemon's FUSE mount made inside a
// lab host is visible to the test (ip netns exec would hide it in a private
// mount namespace). Such commands get their own process group, are killed
// with SIGKILL if the test binary dies, and are killed when the lab closes.
// [Host.StartRegistry] runs Debian's docker-registry on a host's address.
//
// # Cleanup
//
// [New] registers [Lab.Close] with the test's Cleanup, so everything goes away
// when the test ends, whether it passed, failed or panicked: Close kills every
// process left in the lab's namespaces (whoever started it), then deletes the
// namespaces, which destroys the veths and the bridge with them. A test binary
// that is killed outright, or ended by go test's -timeout (which runs no
// Cleanup), cannot clean up: the commands it started die with it (their
// parent-death signal), but its namespaces stay in /run/netns, and so may
// processes those commands left behind. Each lab holds a lock (a flock under /run/shoal-netlab) for as long as it
// lives, so [CleanupStale] can tell such leftovers from the labs of test
// binaries still running, and removes only the former. [New] calls it first.
//
// [Host.TxBytes] and [Host.RxBytes] read the counters of a host's eth0, so a
// test can measure, for example, how many bytes the registry host sent. They
// are the counters /sys/class/net/eth0/statistics shows inside the host, read
// from /proc/thread-self/net/dev on a thread in the host's namespace (the
// test's /sys is mounted for its own namespace).
//
// Everything needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ip(8), tc(8) and
// nsenter(1). Without them [New] skips the test, or fails it when the CI
// environment variable is set.
package netlab
