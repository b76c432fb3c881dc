// Package testenv provides the real test rigs that shoal's integration tests and
// benchmarks share: a real OCI registry and a real Debian image.
//
//   - [StartRegistry] runs Debian's docker-registry binary (CNCF distribution v2)
//     on a free 127.0.0.1 port with its storage in the test's temporary
//     directory, and stops it when the test ends. [Registry.Stop] and
//     [Registry.Restart] simulate an outage. [Registry.Proxy] puts a
//     [CountingProxy] in front of it that counts the response-body bytes the
//     registry serves, which is how tests measure origin load.
//   - [DebianTarball] is a Debian bookworm root filesystem made by debootstrap
//     (minbase plus python3), built once into a cache directory by
//     scripts/debian-rootfs.sh and reused by every test binary after that.
//   - [DebianImage] and [PushDebianImage] turn that tarball into a deterministic
//     three-layer OCI image whose top layer exercises whiteouts, an opaque
//     directory, an overwrite, a symlink and a hard link, so that converters and
//     mounts meet the cases real images contain.
//
// Missing tools are a skip on a developer's machine and a failure in CI (the CI
// environment variable set), where the setup must have installed them.
//
// Everything listens on loopback only. Unit tests that need only a registry
// protocol should use go-containerregistry's in-memory registry instead; this
// package is for tests that want the real thing.
package testenv
