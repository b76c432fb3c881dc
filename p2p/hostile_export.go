//go:build shoal_hostile

package p2p

import (
	"context"

	"github.com/libp2p/go-libp2p/core/crypto"
)

// SetHostile makes the node a byzantine member (hostile.go): mode is one
// of coming-liar, corrupt, busy, silent. Only in binaries built with
// -tags shoal_hostile, for the chaos rollout.
func (n *Node) SetHostile(mode string) error { return n.setHostile(hostility(mode)) }

// GrindIdentity returns a key whose peer ID ranks in image's origin group
// ahead of all but about one in rank of the IDs there may be. Only in
// binaries built with -tags shoal_hostile.
func GrindIdentity(ctx context.Context, image string, rank int) (crypto.PrivKey, error) {
	return grindIdentity(ctx, image, rank)
}
