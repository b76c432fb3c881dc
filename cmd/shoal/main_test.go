package main

import (
	"archive/tar"
	"bytes"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/shoal-project/shoal/sandbox"
)

// asShoalEnv makes the test binary run as `shoal` with its arguments.
const asShoalEnv = "SHOAL_TEST_AS_SHOAL"

func TestMain(m *testing.M) {
	sandbox.Init() // `shoal run` re-executes the test binary as the sandbox's init
	if os.Getenv(asShoalEnv) != "" {
		// A daemon in a process of its own (TestRestartKeepsMounts).
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func TestConvertCommand(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Name: "hello", Mode: 0o644, Size: 5, Typeflag: tar.TypeReg})
	_, _ = tw.Write([]byte("hello"))
	_ = tw.Close()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(host+"/app:v1", name.Insecure)
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name       string
		args       []string
		code       int
		stdoutLast string // prefix of stdout's last line
		stderr     string
	}{
		{"converts and prints the ref last", []string{"convert", "--plain-http", host + "/app:v1"}, 0, host + "/app:v1-shoal@sha256:", ""},
		{"explicit destination", []string{"convert", "--plain-http", host + "/app:v1", host + "/other:x"}, 0, host + "/other:x@sha256:", ""},
		{"missing tag is one line", []string{"convert", "--plain-http", host + "/app:nope"}, 1, "", "not found"},
		{"no args", []string{"convert"}, 2, "", "usage: shoal convert"},
		{"bad block size", []string{"convert", "--block-size", "1000", host + "/app:v1"}, 1, "", "power of two"},
		{"unknown command", []string{"frobnicate"}, 2, "", "unknown command"},
		{"no command", nil, 2, "", "usage: shoal COMMAND"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var stdout, stderr bytes.Buffer
			code := run(tc.args, &stdout, &stderr)
			if code != tc.code {
				t.Fatalf("exit %d, want %d; stderr: %s", code, tc.code, stderr.String())
			}
			lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
			if tc.stdoutLast != "" && !strings.HasPrefix(lines[len(lines)-1], tc.stdoutLast) {
				t.Errorf("last line %q, want prefix %q", lines[len(lines)-1], tc.stdoutLast)
			}
			if !strings.Contains(stderr.String(), tc.stderr) {
				t.Errorf("stderr %q, want %q", stderr.String(), tc.stderr)
			}
			if tc.code == 1 && strings.Count(strings.TrimSpace(stderr.String()), "\n") > 0 {
				t.Errorf("error is not one line: %q", stderr.String())
			}
		})
	}
}
