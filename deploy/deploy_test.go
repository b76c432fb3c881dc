package deploy

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/multiformats/go-multiaddr"
	"github.com/pelletier/go-toml/v2"
	"gopkg.in/yaml.v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8syaml "sigs.k8s.io/yaml"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/p2p"
)

// kinds are the Kubernetes objects the manifests may hold, by
// apiVersion/kind; any other fails the test.
var kinds = map[string]func() any{
	"v1/Namespace":      func() any { return new(corev1.Namespace) },
	"v1/ServiceAccount": func() any { return new(corev1.ServiceAccount) },
	"v1/ConfigMap":      func() any { return new(corev1.ConfigMap) },
	"v1/Secret":         func() any { return new(corev1.Secret) },
	"apps/v1/DaemonSet": func() any { return new(appsv1.DaemonSet) },
	"rbac.authorization.k8s.io/v1/ClusterRole":        func() any { return new(rbacv1.ClusterRole) },
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": func() any { return new(rbacv1.ClusterRoleBinding) },
}

// manifests holds every object of deploy/kubernetes, decoded.
type manifests struct {
	namespaces []*corev1.Namespace
	accounts   []*corev1.ServiceAccount
	configMaps []*corev1.ConfigMap
	secrets    []*corev1.Secret
	daemonSets []*appsv1.DaemonSet
	roles      []*rbacv1.ClusterRole
	bindings   []*rbacv1.ClusterRoleBinding
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// loadManifests decodes every YAML document of every file in dir strictly:
// an unknown field, a duplicate key or an unknown kind is an error.
func loadManifests(t *testing.T, dir string) manifests {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s: %v", dir, err)
	}
	var m manifests
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		m.decode(t, filepath.Base(f), b)
	}
	return m
}

// decode adds every YAML document of data (from where) to m, strictly.
func (m *manifests) decode(t *testing.T, where string, data []byte) {
	t.Helper()
	for i, doc := range docSep.Split(string(data), -1) {
		obj, err := decodeManifest([]byte(doc))
		if err != nil {
			t.Errorf("%s, document %d: %v", where, i+1, err)
			continue
		}
		switch o := obj.(type) {
		case nil: // only comments
		case *corev1.Namespace:
			m.namespaces = append(m.namespaces, o)
		case *corev1.ServiceAccount:
			m.accounts = append(m.accounts, o)
		case *corev1.ConfigMap:
			m.configMaps = append(m.configMaps, o)
		case *corev1.Secret:
			m.secrets = append(m.secrets, o)
		case *appsv1.DaemonSet:
			m.daemonSets = append(m.daemonSets, o)
		case *rbacv1.ClusterRole:
			m.roles = append(m.roles, o)
		case *rbacv1.ClusterRoleBinding:
			m.bindings = append(m.bindings, o)
		}
	}
}

func decodeManifest(doc []byte) (any, error) {
	j, err := k8syaml.YAMLToJSON(doc)
	if err != nil {
		return nil, err
	}
	if string(bytes.TrimSpace(j)) == "null" {
		return nil, nil
	}
	var tm metav1.TypeMeta
	if err := k8syaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	newObj, ok := kinds[tm.APIVersion+"/"+tm.Kind]
	if !ok {
		return nil, fmt.Errorf("unknown kind %q of apiVersion %q", tm.Kind, tm.APIVersion)
	}
	obj := newObj()
	if err := k8syaml.UnmarshalStrict(doc, obj); err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj, nil
}

func TestDecodeIsStrict(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ name, doc, want string }{
		{"typo in a field", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndatta:\n  a: b\n", "datta"},
		{"typo deep down", "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\nspec:\n  template:\n    spec:\n      hostNetwrok: true\n", "hostNetwrok"},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n", "unknown kind"},
		{"wrong type", "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\nspec:\n  template:\n    spec:\n      hostNetwork: yes please\n", "hostNetwork"},
		{"duplicate key", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  name: y\n", "name"},
	} {
		if _, err := decodeManifest([]byte(c.doc)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %q", c.name, err, c.want)
		}
	}
}

// loadConfig reads a daemon config with the daemon's own strict loader.
func loadConfig(t *testing.T, name string, data []byte) daemon.Config {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := daemon.LoadConfig(p)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return c
}

func TestKubernetes(t *testing.T) {
	t.Parallel()
	m := loadManifests(t, "kubernetes")
	if len(m.namespaces) != 1 {
		t.Fatalf("want one namespace, have %d", len(m.namespaces))
	}
	checkManifests(t, m, m.namespaces[0].Name, true)
}

// checkManifests checks the objects that install the daemon in namespace
// ns (deploy/kubernetes, or the chart rendered) and returns the daemon
// set, its container's flags and its config. documented says the swarm
// key's Secret is the one docs/deploy.md makes.
func checkManifests(t *testing.T, m manifests, ns string, documented bool) (*appsv1.DaemonSet, map[string]string, daemon.Config) {
	t.Helper()
	if len(m.daemonSets) != 1 || len(m.configMaps) != 1 || len(m.accounts) != 1 {
		t.Fatalf("want one daemon set, config map and service account; have %d, %d, %d",
			len(m.daemonSets), len(m.configMaps), len(m.accounts))
	}
	ds, cm, sa := m.daemonSets[0], m.configMaps[0], m.accounts[0]
	for _, o := range []metav1.Object{ds, cm, sa} {
		if o.GetNamespace() != ns {
			t.Errorf("%s is in namespace %q, want %q", o.GetName(), o.GetNamespace(), ns)
		}
	}
	ps := ds.Spec.Template.Spec
	if ds.Spec.Selector == nil || len(ds.Spec.Selector.MatchLabels) == 0 {
		t.Fatal("the daemon set has no selector")
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels", k, v)
		}
	}
	if !ps.HostNetwork {
		t.Error("the daemon set is not in the host network (p2p port, mirror on 127.0.0.1 for containerd)")
	}
	if ps.ServiceAccountName != sa.Name {
		t.Errorf("pods run as service account %q, the manifests define %q", ps.ServiceAccountName, sa.Name)
	}
	// The service account may read nodes, for --kube-node.
	var canGetNodes bool
	for _, b := range m.bindings {
		for _, s := range b.Subjects {
			if s.Kind != "ServiceAccount" || s.Name != sa.Name || s.Namespace != ns {
				continue
			}
			for _, r := range m.roles {
				if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != r.Name {
					continue
				}
				for _, rule := range r.Rules {
					canGetNodes = canGetNodes || slices.Contains(rule.APIGroups, "") &&
						slices.Contains(rule.Resources, "nodes") && slices.Contains(rule.Verbs, "get")
				}
			}
		}
	}
	if !canGetNodes {
		t.Errorf("service account %s cannot get nodes: --kube-node would fail", sa.Name)
	}

	// Two containers: the daemon and the keeper that holds its mounts
	// across its restarts, on a socket the config names.
	var c, kc corev1.Container
	for _, x := range ps.Containers {
		if len(x.Args) > 0 && x.Args[0] == "keeper" {
			kc = x
		} else {
			c = x
		}
	}
	if len(ps.Containers) != 2 || kc.Name == "" || c.Name == "" {
		t.Fatalf("want a daemon and a keeper container, have %d containers", len(ps.Containers))
	}
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the daemon container is not privileged (FUSE mounts, Bidirectional propagation)")
	}
	if len(c.Args) == 0 || c.Args[0] != "daemon" {
		t.Fatalf("container args %q do not run `shoal daemon`", c.Args)
	}
	args := flagArgs(t, c.Args[1:])
	checkFlags(t, "daemon set", "runDaemon", args)

	// --kube-node gets the node's name from the downward API.
	if args["kube-node"] != "$(NODE_NAME)" {
		t.Errorf("--kube-node=%q, want $(NODE_NAME)", args["kube-node"])
	}
	var nodeName bool
	for _, e := range c.Env {
		nodeName = nodeName || e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
	}
	if !nodeName {
		t.Error("no NODE_NAME from spec.nodeName in the container's environment")
	}

	// Volumes: by name, and where the container mounts them.
	vols := map[string]corev1.Volume{}
	for _, v := range ps.Volumes {
		vols[v.Name] = v
	}
	mountOf := func(hostPath string) (corev1.VolumeMount, *corev1.HostPathVolumeSource) {
		for _, vm := range c.VolumeMounts {
			if hp := vols[vm.Name].HostPath; hp != nil && hp.Path == hostPath {
				return vm, hp
			}
		}
		t.Errorf("the container does not mount host path %s", hostPath)
		return corev1.VolumeMount{}, nil
	}
	if vm, hp := mountOf("/dev/fuse"); hp != nil && (vm.MountPath != "/dev/fuse" || hp.Type == nil || *hp.Type != corev1.HostPathCharDev) {
		t.Errorf("/dev/fuse: mounted at %s, type %q; want /dev/fuse, CharDevice", vm.MountPath, deref(hp.Type))
	}
	mountOf("/run/containerd")

	// The config: from the config map, strictly valid, agreeing with the
	// manifest.
	cfgPath := args["config"]
	var cfgData string
	for _, vm := range c.VolumeMounts {
		if v := vols[vm.Name]; v.ConfigMap != nil && path.Dir(cfgPath) == vm.MountPath {
			if v.ConfigMap.Name != cm.Name {
				t.Errorf("volume %s is config map %q, the manifests define %q", v.Name, v.ConfigMap.Name, cm.Name)
			}
			cfgData = cm.Data[path.Base(cfgPath)]
		}
	}
	if cfgData == "" {
		t.Fatalf("--config=%s is not a key of config map %s mounted in the container", cfgPath, cm.Name)
	}
	cfg := loadConfig(t, "config map "+cm.Name, []byte(cfgData))
	checkKeeper(t, cfg.KeeperSocket, c, kc, vols)
	if vm, hp := mountOf(cfg.StateDir); hp != nil && (vm.MountPath != cfg.StateDir ||
		vm.MountPropagation == nil || *vm.MountPropagation != corev1.MountPropagationBidirectional) {
		t.Errorf("state dir %s: mounted at %s with propagation %v, want the same path, Bidirectional (mounts must reach containerd)",
			cfg.StateDir, vm.MountPath, deref(vm.MountPropagation))
	}
	// Ports: the container's agree with the config's. Metrics are on
	// loopback (checkDeployConfig): a container port for them would
	// advertise what only the node itself can reach.
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if len(cfg.P2P.Listen) == 0 || multiaddrPort(t, cfg.P2P.Listen[0]) != ports["p2p"] {
		t.Errorf("p2p listen %q, container port p2p %d", cfg.P2P.Listen, ports["p2p"])
	}
	if p, ok := ports["metrics"]; ok {
		t.Errorf("container port metrics %d: metrics_addr %q is loopback, not reachable on the node's address", p, cfg.MetricsAddr)
	}
	checkProbes(t, c, cfg)
	checkSwarmKeySecret(t, ns, c, vols, cfg, documented)
	checkDeployConfig(t, "config map", cfg)
	return ds, args, cfg
}

// checkProbes: both probes run `shoal status` on the daemon's API socket,
// with the image's binary. In the host network an HTTP probe would dial
// the node's IP, and the status page listens on loopback only.
func checkProbes(t *testing.T, c corev1.Container, cfg daemon.Config) {
	t.Helper()
	dockerfile, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ENTRYPOINT \["([^"]+)"\]`).FindSubmatch(dockerfile)
	if m == nil {
		t.Fatal("Dockerfile: no ENTRYPOINT [\"<binary>\"]")
	}
	bin := string(m[1])
	sock := cfg.Socket
	if sock == "" {
		sock = daemon.SocketPath(cfg.StateDir)
	}
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		if p == nil || p.Exec == nil || len(p.Exec.Command) < 2 || p.Exec.Command[0] != bin || p.Exec.Command[1] != "status" {
			t.Errorf("%s probe %+v does not run %s status", name, p, bin)
			continue
		}
		args := flagArgs(t, p.Exec.Command[2:])
		checkFlags(t, name+" probe", "runStatus", args)
		if args["socket"] != sock {
			t.Errorf("%s probe asks socket %q, the daemon serves %q", name, args["socket"], sock)
		}
		if p.TimeoutSeconds < 2 {
			t.Errorf("%s probe times out after %d s: too short for a process start on a busy node", name, p.TimeoutSeconds)
		}
	}
}

// checkSwarmKeySecret: the config's p2p.psk_file is a key of a Secret the
// container mounts read-only, readable by its owner alone, and (if
// documented) docs/deploy.md makes that Secret, in the manifests'
// namespace, with that key.
func checkSwarmKeySecret(t *testing.T, ns string, c corev1.Container, vols map[string]corev1.Volume, cfg daemon.Config, documented bool) {
	t.Helper()
	if cfg.P2P.PSKFile == "" {
		return // checkDeployConfig says so
	}
	dir, key := path.Split(cfg.P2P.PSKFile)
	var secret *corev1.SecretVolumeSource
	for _, vm := range c.VolumeMounts {
		if v := vols[vm.Name]; v.Secret != nil && vm.MountPath == path.Clean(dir) {
			secret = v.Secret
			if !vm.ReadOnly || vm.SubPath != "" {
				t.Errorf("the key's Secret is mounted with readOnly %v, subPath %q: want read-only, whole", vm.ReadOnly, vm.SubPath)
			}
		}
	}
	if secret == nil {
		t.Fatalf("p2p.psk_file %s is not in a Secret the container mounts", cfg.P2P.PSKFile)
	}
	if secret.DefaultMode == nil || *secret.DefaultMode&0o077 != 0 {
		t.Errorf("Secret %s mounted with mode %o: others than root could read the key", secret.SecretName, deref(secret.DefaultMode))
	}
	if secret.Optional != nil && *secret.Optional {
		t.Errorf("Secret %s is optional: without it the daemon must not start", secret.SecretName)
	}
	for _, it := range secret.Items {
		if it.Path == key {
			key = it.Key
		}
	}
	if !documented {
		return
	}
	doc, err := os.ReadFile("../docs/deploy.md")
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(doc), "\\\n", " ")
	cmds := regexp.MustCompile(`kubectl -n (\S+) create secret generic (\S+)\s+--from-file=([^=\s]+)=`).FindAllStringSubmatch(text, -1)
	if len(cmds) == 0 {
		t.Error("docs/deploy.md shows no `kubectl -n NS create secret generic NAME --from-file=KEY=...`")
	}
	for _, m := range cmds {
		if m[1] != ns || m[2] != secret.SecretName || m[3] != key {
			t.Errorf("docs/deploy.md makes Secret %s/%s with key %s; the daemon set reads %s/%s, key %s", m[1], m[2], m[3], ns, secret.SecretName, key)
		}
	}
}

func deref[T any](p *T) (v T) {
	if p != nil {
		v = *p
	}
	return v
}

func multiaddrPort(t *testing.T, s string) int32 {
	t.Helper()
	ma, err := multiaddr.NewMultiaddr(s)
	if err != nil {
		t.Errorf("p2p listen %q: %v", s, err)
		return 0
	}
	p, err := ma.ValueForProtocol(multiaddr.P_TCP)
	if err != nil {
		t.Errorf("p2p listen %q: %v", s, err)
	}
	n, _ := strconv.Atoi(p)
	return int32(n)
}

// checkDeployConfig checks a daemon config against the containerd files:
// the snapshotter's socket is the proxy plugin's address, the mirror is
// the hosts.toml files' host, and each hosts.toml registry is an upstream.
func checkDeployConfig(t *testing.T, name string, cfg daemon.Config) {
	t.Helper()
	cc := loadContainerdConfig(t)
	// Secure defaults: nothing unauthenticated beyond loopback, and a
	// private swarm.
	if host, _, err := net.SplitHostPort(cfg.MetricsAddr); cfg.MetricsAddr != "" && (err != nil || !isLoopback(host)) {
		t.Errorf("%s: metrics_addr %q is not on loopback: nobody authenticates on the status page and metrics", name, cfg.MetricsAddr)
	}
	if cfg.P2P.PSKFile == "" && !cfg.P2P.Disabled {
		t.Errorf("%s: no p2p.psk_file: any host that reaches the p2p port could join the swarm", name)
	}
	sock := cfg.Snapshotter.Socket
	if sock == "" {
		sock = daemon.SnapshotterSocketPath(cfg.StateDir)
	}
	if cfg.Snapshotter.Disabled || cc.ProxyPlugins["shoal"].Address != sock {
		t.Errorf("%s: snapshotter socket %s (disabled %v), containerd's proxy plugin dials %s",
			name, sock, cfg.Snapshotter.Disabled, cc.ProxyPlugins["shoal"].Address)
	}
	upstreams := map[string]bool{}
	for _, u := range cfg.Mirror.Upstreams {
		upstreams[u.Host] = true
	}
	for registry, h := range loadHosts(t) {
		if !upstreams[registry] {
			t.Errorf("%s: containerd sends %s pulls to the mirror, which does not list it in mirror.upstreams", name, registry)
		}
		for host := range h.Host {
			if u, err := url.Parse(host); err != nil || u.Host != cfg.Mirror.Listen {
				t.Errorf("%s: hosts.toml of %s names mirror %s, the daemon's listens on %q", name, registry, host, cfg.Mirror.Listen)
			}
		}
	}
}

func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return host == "localhost" || ip != nil && ip.IsLoopback()
}

func TestSystemdConfig(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("systemd/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := loadConfig(t, "systemd/config.yaml", b)
	checkDeployConfig(t, "systemd/config.yaml", cfg)
	// The reference config names every key the daemon knows: a key added
	// to daemon.Config must be documented here.
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	yamlKeys(doc.Content[0], "", have)
	for _, k := range configKeys(reflect.TypeFor[daemon.Config](), "") {
		if !have[k] {
			t.Errorf("systemd/config.yaml does not show daemon config key %s: add it, set and commented", k)
		}
	}
}

// configKeys lists the YAML keys of a config struct as dotted paths ("[]"
// for the elements of a list).
func configKeys(typ reflect.Type, prefix string) []string {
	var out []string
	for f := range typ.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		key := prefix + name
		out = append(out, key)
		switch ft := f.Type; {
		case ft.Kind() == reflect.Struct:
			out = append(out, configKeys(ft, key+".")...)
		case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
			out = append(out, configKeys(ft.Elem(), key+"[].")...)
		}
	}
	return out
}

// yamlKeys collects the key paths of a YAML mapping, as configKeys names
// them.
func yamlKeys(n *yaml.Node, prefix string, into map[string]bool) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			key := prefix + n.Content[i].Value
			into[key] = true
			yamlKeys(n.Content[i+1], key+".", into)
		}
	case yaml.SequenceNode:
		for _, e := range n.Content {
			yamlKeys(e, strings.TrimSuffix(prefix, ".")+"[].", into)
		}
	}
}

func TestConfigKeysSeeTypos(t *testing.T) {
	t.Parallel()
	var doc yaml.Node
	_ = yaml.Unmarshal([]byte("state_dir: x\nmirror:\n  upstreams:\n    - host: a\n      endpiont: b\n"), &doc)
	have := map[string]bool{}
	yamlKeys(doc.Content[0], "", have)
	want := map[string]bool{"state_dir": true, "mirror": true, "mirror.upstreams": true, "mirror.upstreams[].host": true, "mirror.upstreams[].endpiont": true}
	if !reflect.DeepEqual(have, want) {
		t.Errorf("yamlKeys = %v", have)
	}
	keys := configKeys(reflect.TypeFor[daemon.Config](), "")
	for _, k := range []string{"state_dir", "p2p.listen", "mirror.upstreams[].endpoint", "snapshotter.socket"} {
		if !slices.Contains(keys, k) {
			t.Errorf("configKeys lacks %s: %v", k, keys)
		}
	}
}

// containerdConfig is the part of containerd's config.toml (version 2) the
// deploy snippet uses; decoding into it strictly catches a misspelt key.
type containerdConfig struct {
	Version      int `toml:"version"`
	ProxyPlugins map[string]struct {
		Type    string `toml:"type"`
		Address string `toml:"address"`
	} `toml:"proxy_plugins"`
	Plugins struct {
		CRI struct {
			Containerd struct {
				Snapshotter                string `toml:"snapshotter"`
				DisableSnapshotAnnotations *bool  `toml:"disable_snapshot_annotations"`
			} `toml:"containerd"`
			Registry struct {
				ConfigPath string `toml:"config_path"`
			} `toml:"registry"`
		} `toml:"io.containerd.grpc.v1.cri"`
	} `toml:"plugins"`
}

// hostsFile is containerd's hosts.toml, the fields the snippets use.
type hostsFile struct {
	Server string `toml:"server"`
	Host   map[string]struct {
		Capabilities []string `toml:"capabilities"`
	} `toml:"host"`
}

func decodeTOMLStrict(t *testing.T, file string, v any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func loadContainerdConfig(t *testing.T) containerdConfig {
	t.Helper()
	var c containerdConfig
	decodeTOMLStrict(t, "containerd/config.toml", &c)
	return c
}

// loadHosts reads containerd/certs.d/<registry>/hosts.toml, by registry.
func loadHosts(t *testing.T) map[string]hostsFile {
	t.Helper()
	files, err := filepath.Glob("containerd/certs.d/*/hosts.toml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no hosts.toml files: %v", err)
	}
	out := map[string]hostsFile{}
	for _, f := range files {
		var h hostsFile
		decodeTOMLStrict(t, f, &h)
		out[filepath.Base(filepath.Dir(f))] = h
	}
	return out
}

func TestContainerd(t *testing.T) {
	t.Parallel()
	c := loadContainerdConfig(t)
	p, ok := c.ProxyPlugins["shoal"]
	if c.Version != 2 || !ok || p.Type != "snapshot" {
		t.Errorf("config.toml: version %d, proxy plugin shoal %+v: want version 2, a snapshot plugin", c.Version, p)
	}
	cri := c.Plugins.CRI
	if cri.Containerd.Snapshotter != "shoal" || cri.Containerd.DisableSnapshotAnnotations == nil || *cri.Containerd.DisableSnapshotAnnotations {
		t.Errorf("config.toml: CRI must use snapshotter shoal with snapshot annotations on: %+v", cri.Containerd)
	}
	if cri.Registry.ConfigPath != "/etc/containerd/certs.d" {
		t.Errorf("config.toml: registry config_path %q", cri.Registry.ConfigPath)
	}
	for registry, h := range loadHosts(t) {
		if u, err := url.Parse(h.Server); err != nil || u.Scheme != "https" || u.Host == "" {
			t.Errorf("hosts.toml of %s: server %q is not an https URL", registry, h.Server)
		}
		if len(h.Host) != 1 {
			t.Errorf("hosts.toml of %s: want the mirror as the one host, have %d", registry, len(h.Host))
		}
		for host, hc := range h.Host {
			// The mirror serves pulls, not pushes.
			if caps := slices.Sorted(slices.Values(hc.Capabilities)); !slices.Equal(caps, []string{"pull", "resolve"}) {
				t.Errorf("hosts.toml of %s: %s has capabilities %v, want pull and resolve", registry, host, hc.Capabilities)
			}
		}
	}
	var bad struct {
		Host map[string]struct {
			Capabilities []string `toml:"capabilities"`
		} `toml:"host"`
	}
	dec := toml.NewDecoder(strings.NewReader("[host.\"http://x\"]\n  capabilties = [\"pull\"]\n"))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&bad); err == nil {
		t.Error("a misspelt hosts.toml key decoded without error")
	}

	// containerd itself reads the snippet: `containerd config dump`
	// merges it into its defaults, so the values must come out there.
	bin, err := exec.LookPath("containerd")
	if err != nil {
		testenv.SkipOrFatal(t, "containerd not installed (apt-get install containerd): %v", err)
	}
	out, err := exec.CommandContext(t.Context(), bin, "--config", "containerd/config.toml", "config", "dump").CombinedOutput()
	if err != nil {
		t.Fatalf("containerd config dump: %v\n%s", err, out)
	}
	var dump containerdConfig
	if err := toml.Unmarshal(out, &dump); err != nil {
		t.Fatalf("containerd config dump: %v", err)
	}
	if !reflect.DeepEqual(dump.ProxyPlugins, c.ProxyPlugins) || dump.Plugins.CRI.Containerd.Snapshotter != "shoal" ||
		dump.Plugins.CRI.Registry.ConfigPath != cri.Registry.ConfigPath {
		t.Errorf("containerd read the snippet as %+v", dump)
	}
}

// mountNamespaceOptions give a systemd unit a mount namespace of its own,
// which keeps the daemon's mounts from the host (systemd.exec(5)).
var mountNamespaceOptions = []string{
	"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ReadOnlyPaths",
	"ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
	"ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
	"ProtectProc", "ProcSubset", "MountFlags", "RootDirectory", "RootImage",
}

func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("systemd/shoal.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			unit[k] = append(unit[k], v)
		}
	}
	for _, k := range mountNamespaceOptions {
		if _, ok := unit[k]; ok {
			t.Errorf("%s= gives the unit a mount namespace: the daemon's mounts would not reach the host", k)
		}
	}
	if got := unit["DeviceAllow"]; unit["DevicePolicy"] != nil && !slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, "/dev/fuse") }) {
		t.Errorf("DevicePolicy without DeviceAllow=/dev/fuse: %v", got)
	}
	exec0 := strings.Fields(strings.Join(unit["ExecStart"], ""))
	if len(exec0) < 2 || exec0[0] != "/usr/local/bin/shoal" || exec0[1] != "daemon" {
		t.Fatalf("ExecStart %q does not run /usr/local/bin/shoal daemon", exec0)
	}
	args := flagArgs(t, exec0[2:])
	checkFlags(t, "systemd unit", "runDaemon", args)
	cfgData, err := os.ReadFile("systemd/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := loadConfig(t, "systemd/config.yaml", cfgData)
	if want := "/etc/" + strings.Join(unit["ConfigurationDirectory"], "") + "/config.yaml"; args["config"] != want {
		t.Errorf("--config %s, want %s (ConfigurationDirectory)", args["config"], want)
	}
	if want := "/var/lib/" + strings.Join(unit["StateDirectory"], ""); cfg.StateDir != want {
		t.Errorf("state_dir %s, the unit's StateDirectory is %s", cfg.StateDir, want)
	}
	if dir := "/etc/" + strings.Join(unit["ConfigurationDirectory"], ""); path.Dir(cfg.P2P.PSKFile) != dir {
		t.Errorf("p2p.psk_file %q is not in the unit's ConfigurationDirectory %s, beside the config", cfg.P2P.PSKFile, dir)
	}

	// systemd's own check: unknown keys, bad values. It wants ExecStart's
	// binary to exist, so it checks a copy that runs /bin/true.
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		testenv.SkipOrFatal(t, "systemd-analyze not installed (apt-get install systemd): %v", err)
	}
	dir := t.TempDir()
	copyPath := filepath.Join(dir, "shoal.service")
	if err := os.WriteFile(copyPath, bytes.ReplaceAll(b, []byte("/usr/local/bin/shoal "), []byte("/bin/true ")), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), sa, "verify", copyPath)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// flagArgs parses "--name=value" and "--name value" arguments.
func flagArgs(t *testing.T, args []string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			t.Errorf("argument %q is not a flag", a)
			continue
		}
		name, val, ok := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !ok && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			val = args[i+1]
			i++
		}
		out[name] = val
	}
	return out
}

// checkFlags checks that every flag is one the command run by function fn
// of cmd/shoal (runDaemon, runStatus) defines, as read from its source: a
// misspelt flag would stop the command.
func checkFlags(t *testing.T, where, fn string, args map[string]string) {
	t.Helper()
	known := commandFlags(t, fn)
	for name := range args {
		if !known[name] {
			t.Errorf("%s: %s has no flag --%s (it has %s)", where, fn, name, strings.Join(slices.Sorted(maps.Keys(known)), ", "))
		}
	}
}

// commandFlags reads the flag names fn and newFlags define in cmd/shoal:
// the first string argument of fs.String, fs.Bool, fs.Var, ...
func commandFlags(t *testing.T, fn string) map[string]bool {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob("../cmd/shoal/*.go")
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || (fd.Name.Name != fn && fd.Name.Name != "newFlags") {
				continue
			}
			ast.Inspect(fd, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok || !isFlagSet(sel.X) {
					return true
				}
				for _, a := range call.Args {
					if lit, ok := a.(*ast.BasicLit); ok && lit.Kind == token.STRING {
						if s, err := strconv.Unquote(lit.Value); err == nil {
							known[s] = true
						}
						break
					}
				}
				return true
			})
		}
	}
	if len(known) < 2 || !known["log-level"] {
		t.Fatalf("found no flags of %s in cmd/shoal (have %v): has the code moved?", fn, known)
	}
	return known
}

func isFlagSet(e ast.Expr) bool {
	id, ok := e.(*ast.Ident)
	return ok && id.Name == "fs"
}

// TestSystemdInstall runs systemd/install.sh into a directory, with the
// real binary: the first node gets a new key (mode 0600, one the daemon
// reads) where the config's p2p.psk_file says, a second run keeps it, and
// a second node given that file holds the same key and refuses another.
func TestSystemdInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/shoal")
	}
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "shoal")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "../cmd/shoal").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	install := func(root string, args ...string) error {
		t.Helper()
		out, err := exec.CommandContext(t.Context(), "bash", append([]string{"systemd/install.sh", "--bin", bin, "--root", root}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("install.sh %s: %w\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	// key reads the swarm key as the installed daemon would, checks its
	// mode and returns its bytes.
	key := func(root string) []byte {
		t.Helper()
		cfg, err := daemon.LoadConfig(filepath.Join(root, "etc/shoal/config.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(root, cfg.P2P.PSKFile)
		st, err := os.Stat(f)
		if err != nil {
			t.Fatalf("p2p.psk_file: %v", err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("p2p.psk_file %s has mode %v, want 0600", cfg.P2P.PSKFile, st.Mode().Perm())
		}
		if _, err := p2p.LoadPSK(f); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(f)
		return b
	}
	first, second := t.TempDir(), t.TempDir()
	if err := install(first); err != nil {
		t.Fatal(err)
	}
	k := key(first)
	for _, f := range []string{"usr/local/bin/shoal", "etc/systemd/system/shoal.service"} {
		if _, err := os.Stat(filepath.Join(first, f)); err != nil {
			t.Error(err)
		}
	}
	if err := install(first); err != nil || !bytes.Equal(key(first), k) {
		t.Errorf("a second run changed the key (%v)", err)
	}
	keyFile := filepath.Join(first, "etc/shoal/swarm.key")
	if err := install(second, "--key", keyFile); err != nil || !bytes.Equal(key(second), k) {
		t.Errorf("the second node does not hold the first node's key (%v)", err)
	}
	other := filepath.Join(t.TempDir(), "other.key")
	if out, err := exec.CommandContext(t.Context(), bin, "keygen", other).CombinedOutput(); err != nil {
		t.Fatalf("keygen: %v\n%s", err, out)
	}
	if err := install(second, "--key", other); err == nil || !bytes.Equal(key(second), k) {
		t.Errorf("install.sh --key with another key over an installed one: %v; want an error and the key kept", err)
	}
}

// checkKeeper checks that the keeper listens on the daemon's keeper_socket,
// through a volume both containers mount at the same place.
func checkKeeper(t *testing.T, sock string, daemon, keeper corev1.Container, vols map[string]corev1.Volume) {
	t.Helper()
	if sock == "" {
		t.Error("the config has no keeper_socket: mounts would die with the daemon")
		return
	}
	if got := flagArgs(t, keeper.Args[1:])["socket"]; got != sock {
		t.Errorf("the keeper listens on %q, the daemon's keeper_socket is %q", got, sock)
	}
	volAt := func(c corev1.Container) string {
		for _, vm := range c.VolumeMounts {
			if vm.MountPath == path.Dir(sock) {
				return vm.Name
			}
		}
		return ""
	}
	if a, b := volAt(daemon), volAt(keeper); a == "" || a != b || vols[a].HostPath != nil && vols[a].EmptyDir != nil {
		t.Errorf("keeper socket directory %s: daemon mounts volume %q, keeper %q; want the same", path.Dir(sock), a, b)
	}
}
