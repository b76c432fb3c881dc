// Package seeder fills a node's block cache with an image ahead of, and
// behind, the application: the start-up working set first (in the order a
// recorded trace gives), then the rest of the image at low priority under a
// bandwidth cap, so that a node that ran a container once ends up holding the
// whole image and can serve it to its peers.
package seeder
