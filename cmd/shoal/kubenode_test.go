package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestKubeNodeLabels reads a Node the way the daemon does in a pod: over
// TLS checked against the service account's CA, with its bearer token.
// There is no API server on the test machine, so an HTTPS server answers
// as one does (a Node object, or a Status on errors).
func TestKubeNodeLabels(t *testing.T) {
	t.Parallel()
	const token = "secret-token"
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.Header.Get("Authorization") != "Bearer "+token {
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}`)
			return
		}
		name, ok := strings.CutPrefix(r.URL.Path, "/api/v1/nodes/")
		if !ok || name != "worker-1" {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","message":"nodes %q not found","reason":"NotFound","code":404}`, name)
			return
		}
		_ = json.NewEncoder(w).Encode(corev1.Node{
			TypeMeta: metav1.TypeMeta{Kind: "Node", APIVersion: "v1"},
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
				"kubernetes.io/hostname": name, zoneLabel: "eu-west-1a", "example.com/rack": "r7",
			}},
		})
	}))
	t.Cleanup(srv.Close)
	sa := func(tok string, ca []byte) string {
		dir := t.TempDir()
		_ = os.WriteFile(filepath.Join(dir, "token"), []byte(tok+"\n"), 0o600)
		_ = os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o644)
		return dir
	}
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	good := sa(token, ca)

	got, err := getNodeLabels(t.Context(), srv.URL, good, "worker-1")
	if err != nil {
		t.Fatal(err)
	}
	if l := daemonLabels(got, "example.com/rack"); len(l) != 2 || l["zone"] != "eu-west-1a" || l["rack"] != "r7" {
		t.Errorf("labels with a rack label: %v", l)
	}
	if l := daemonLabels(got, ""); len(l) != 1 || l["zone"] != "eu-west-1a" {
		t.Errorf("labels without a rack label: %v", l)
	}
	if l := daemonLabels(map[string]string{}, "example.com/rack"); len(l) != 0 {
		t.Errorf("a node without labels gave %v", l)
	}

	// Every httptest server has the same certificate: make another.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other"}, IsCA: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true}
	otherCA, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, saDir, node, want string
	}{
		{"unknown node", good, "worker-9", `nodes "worker-9" not found`},
		{"wrong token", sa("nope", ca), "worker-1", "401 Unauthorized: Unauthorized"},
		{"untrusted server", sa(token, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: otherCA})), "worker-1", "certificate"},
		{"no CA", sa(token, []byte("junk")), "worker-1", "no certificate"},
		{"no service account", filepath.Join(t.TempDir(), "none"), "worker-1", "service account"},
	} {
		if _, err := getNodeLabels(t.Context(), srv.URL, c.saDir, c.node); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
}

// TestDaemonKubeNodeOutsidePod: --kube-node outside a pod stops the daemon
// before it starts, saying why.
func TestDaemonKubeNodeOutsidePod(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	var stderr strings.Builder
	err := runDaemon(t.Context(), []string{"--state-dir", t.TempDir(), "--no-p2p", "--kube-node=worker-1"}, io.Discard, &stderr)
	if err == nil || !strings.Contains(err.Error(), "not in a Kubernetes pod") {
		t.Errorf("runDaemon --kube-node outside a pod: %v", err)
	}
}
