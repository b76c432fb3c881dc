package mirror

import (
	"testing"

	"github.com/shoal-project/shoal/internal/testenv"
)

// TestConformancePull runs the pull workflow of the OCI distribution-spec
// conformance suite against the mirror, on an image seeded in a real
// upstream: the anonymous registry without credentials, and the htpasswd
// registry with them (the suite answers the mirror's challenge).
func TestConformancePull(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the conformance suite")
	}
	t.Parallel()
	bin := testenv.ConformanceBinary(t)
	for _, tc := range []struct {
		name    string
		private bool
	}{
		{"public upstream, anonymous", false},
		{"private upstream, with credentials", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var reg *testenv.Registry
			if tc.private {
				reg = testenv.StartRegistry(t, testenv.WithBasicAuth(alice, alicePass))
			} else {
				reg = testenv.StartRegistry(t)
			}
			img := testenv.RandomImage(t, 2, 4096)
			pushImage(t, reg, "conformance/pull:v1", img)
			r := startMirror(t, nil, nil, nil, func(c *Config) {
				c.Upstreams = []Upstream{{Host: reg.Host, PlainHTTP: true, Default: true}}
			})
			d, _ := img.Digest()
			env := map[string]string{
				"OCI_ROOT_URL":               r.srv.URL,
				"OCI_NAMESPACE":              "conformance/pull",
				"OCI_TEST_PULL":              "1",
				"OCI_TAG_NAME":               "v1",
				"OCI_MANIFEST_DIGEST":        d.String(),
				"OCI_BLOB_DIGEST":            layerDigests(t, img)[0].Digest.String(),
				"OCI_HIDE_SKIPPED_WORKFLOWS": "1",
			}
			if tc.private {
				env["OCI_USERNAME"], env["OCI_PASSWORD"] = alice, alicePass
			}
			res := testenv.RunConformance(t, bin, env)
			t.Logf("conformance pull workflow (%s, %s): ran %d of %d specs: %d passed, %d failed, %d pending, %d skipped",
				testenv.ConformanceVersion, tc.name, res.Ran, res.Total, res.Passed, res.Failed, res.Pending, res.Skipped)
			if res.Failed != 0 || res.Passed == 0 || res.Passed != res.Ran {
				t.Errorf("conformance pull workflow failed:\n%s", res.Output)
			}
			if tc.private {
				// Without credentials the same run fails: the mirror
				// gives nothing private away.
				delete(env, "OCI_USERNAME")
				delete(env, "OCI_PASSWORD")
				anon := testenv.RunConformance(t, bin, env)
				t.Logf("the same without credentials: %d passed, %d failed", anon.Passed, anon.Failed)
				if anon.Failed == 0 {
					t.Errorf("the private run passed without credentials:\n%s", anon.Output)
				}
			}
		})
	}
}
