package daemon

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
)

// The status page, /api/status and /metrics are served on a TCP port where
// nobody authenticates, while the unix socket's API is for root alone. So
// what the TCP port shows of an image whose repository is private
// (node.Image.Private) is a label, "private image" and a short tag, never
// its reference: not the repository, the tag, the digests, the directory
// it is mounted on, its working directory or error texts (which name the
// repository). Images are told apart by the tag, an HMAC of the reference
// under a key each daemon draws at start: it cannot be reversed by
// hashing guessed names and differs from node to node, so it cannot link
// pages either. The metrics carry no image labels at all. Environments,
// which can hold credentials, are left out for every image.

// publicNames hides the references of private images from the daemon's
// unauthenticated views.
type publicNames struct {
	key [32]byte
}

func newPublicNames() *publicNames {
	p := &publicNames{}
	_, _ = rand.Read(p.key[:]) // never fails (crypto/rand)
	return p
}

// tag is the short, keyed, one-way name of ref.
func (p *publicNames) tag(ref string) string {
	mac := hmac.New(sha256.New, p.key[:])
	mac.Write([]byte(ref))
	return hex.EncodeToString(mac.Sum(nil)[:4])
}

// errHidden stands for an error text of an image whose reference is hidden.
const errHidden = "failed (the daemon's socket API, shoal status, has the error)"

// mount is m as the unauthenticated views show it.
func (p *publicNames) mount(m MountInfo) MountInfo {
	m.Env = nil
	if !m.Private {
		return m
	}
	label := "private image " + p.tag(m.Ref)
	m.Source, m.Ref = label, label
	m.Dir, m.RunDir, m.WorkingDir = "", "", ""
	m.Trace = nil
	if m.Seeding != nil && m.Seeding.Err != "" {
		s := *m.Seeding
		s.Err = errHidden
		m.Seeding = &s
	}
	return m
}

// job is j as the unauthenticated views show it: a job's image is hidden
// until it has been resolved and found public.
func (p *publicNames) job(j Job) Job {
	if j.resolved && !j.Private {
		return j
	}
	if j.Private {
		j.Ref = "private image " + p.tag(j.Ref)
	} else {
		j.Ref = "image " + p.tag(j.Ref) + " (not resolved)"
	}
	if j.Error != "" {
		j.Error = errHidden
	}
	if j.Progress.Err != "" {
		j.Progress.Err = errHidden
	}
	return j
}
