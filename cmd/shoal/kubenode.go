package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// In a Kubernetes pod, a node's zone is a label of the Node object, which
// the downward API does not expose to the pods on it. The daemon reads it
// itself, once at start, with the pod's service account (RBAC: get nodes;
// deploy/kubernetes/rbac.yaml): one GET, no client library.

// zoneLabel is the well-known label Kubernetes nodes carry their zone in.
const zoneLabel = "topology.kubernetes.io/zone"

// serviceAccountDir is where Kubernetes mounts a pod's service account.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// kubeNodeLabels returns the daemon labels (zone, rack) of Kubernetes node
// nodeName: zone from topology.kubernetes.io/zone, rack from rackLabel
// ("" for none; Kubernetes has no well-known rack label). It must run in a
// pod: the API server is KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT.
func kubeNodeLabels(ctx context.Context, nodeName, rackLabel string) (map[string]string, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, errors.New("--kube-node: not in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT are not set)")
	}
	node, err := getNodeLabels(ctx, "https://"+net.JoinHostPort(host, port), serviceAccountDir, nodeName)
	if err != nil {
		return nil, err
	}
	return daemonLabels(node, rackLabel), nil
}

// daemonLabels picks the daemon's labels from a node's.
func daemonLabels(node map[string]string, rackLabel string) map[string]string {
	out := map[string]string{}
	if z := node[zoneLabel]; z != "" {
		out["zone"] = z
	}
	if r := node[rackLabel]; rackLabel != "" && r != "" {
		out["rack"] = r
	}
	return out
}

// getNodeLabels reads the labels of node from the API server at apiURL
// with the service account in saDir (token, ca.crt).
func getNodeLabels(ctx context.Context, apiURL, saDir, node string) (map[string]string, error) {
	token, err := os.ReadFile(filepath.Join(saDir, "token"))
	if err != nil {
		return nil, fmt.Errorf("kubernetes service account: %w", err)
	}
	ca, err := os.ReadFile(filepath.Join(saDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("kubernetes service account: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("kubernetes service account: no certificate in %s", filepath.Join(saDir, "ca.crt"))
	}
	hc := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
	}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, apiURL+"/api/v1/nodes/"+url.PathEscape(node), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	req.Header.Set("Accept", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: get node %s: %w", node, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// The API server explains itself in a Status object's message.
		var st struct {
			Message string `json:"message"`
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if json.Unmarshal(b, &st) != nil || st.Message == "" {
			st.Message = strings.TrimSpace(string(b))
		}
		return nil, fmt.Errorf("kubernetes: get node %s: %s: %s", node, resp.Status, st.Message)
	}
	var n struct {
		Metadata struct {
			Labels map[string]string `json:"labels"`
		} `json:"metadata"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&n); err != nil {
		return nil, fmt.Errorf("kubernetes: get node %s: %w", node, err)
	}
	return n.Metadata.Labels, nil
}
