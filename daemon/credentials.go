package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/docker/cli/cli/config"
	"github.com/docker/cli/cli/config/configfile"
	"github.com/docker/cli/cli/config/types"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/shoal-project/shoal/fetch"
)

// RegistryConfig is how the daemon reads registries: with whose
// credentials, and which repositories it treats as public.
type RegistryConfig struct {
	// DockerConfig is a directory holding a Docker config.json (auths,
	// credential helpers): the credentials the daemon reads images with.
	// Default: the Docker config of the user running the daemon
	// ($DOCKER_CONFIG, ~/.docker), as the docker CLI finds it.
	DockerConfig string `yaml:"docker_config"`
	// PublicRepositories are shared with every peer without a proof of
	// access, whatever their registry says: "registry/repository", with *
	// wildcards ("ghcr.io/org/*"). List only repositories anyone may read.
	PublicRepositories []string `yaml:"public_repositories"`
	// DetectPublic probes each repository once per 10 minutes with an
	// anonymous HEAD of the manifest it opens: a repository its registry
	// serves without credentials is public. Default true; off, only
	// PublicRepositories are public.
	DetectPublic *bool `yaml:"detect_public"`
}

// keychain returns the credentials the daemon reads registries with.
func (c RegistryConfig) keychain() (authn.Keychain, error) {
	if c.DockerConfig == "" {
		return authn.DefaultKeychain, nil
	}
	if _, err := os.Stat(filepath.Join(c.DockerConfig, config.ConfigFileName)); err != nil {
		return nil, fmt.Errorf("registry.docker_config: %w", err)
	}
	cf, err := config.Load(c.DockerConfig)
	if err != nil {
		return nil, fmt.Errorf("registry.docker_config %s: %w", c.DockerConfig, err)
	}
	return dockerConfigKeychain{cf}, nil
}

// visibility tells public repositories from private ones (fetch.Visibility).
func (c RegistryConfig) visibility() (*fetch.Visibility, error) {
	v, err := fetch.NewVisibility(c.PublicRepositories, c.DetectPublic == nil || *c.DetectPublic, 0)
	if err != nil {
		return nil, fmt.Errorf("registry.public_repositories: %w", err)
	}
	return v, nil
}

// dockerConfigKeychain resolves credentials from one Docker config file,
// as go-containerregistry's default keychain does from the user's.
type dockerConfigKeychain struct{ cf *configfile.ConfigFile }

func (k dockerConfigKeychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), target)
}

func (k dockerConfigKeychain) ResolveContext(_ context.Context, target authn.Resource) (authn.Authenticator, error) {
	var empty types.AuthConfig
	for _, key := range []string{target.String(), target.RegistryStr()} {
		if key == name.DefaultRegistry {
			key = authn.DefaultAuthKey
		}
		cfg, err := k.cf.GetAuthConfig(key)
		if err != nil {
			return nil, fmt.Errorf("credentials for %s: %w", key, err)
		}
		cfg.ServerAddress = ""
		if cfg != empty {
			return authn.FromConfig(authn.AuthConfig{
				Username:      cfg.Username,
				Password:      cfg.Password,
				Auth:          cfg.Auth,
				IdentityToken: cfg.IdentityToken,
				RegistryToken: cfg.RegistryToken,
			}), nil
		}
	}
	return authn.Anonymous, nil
}
