package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/shoal-project/shoal/node"
)

// Client talks to a daemon over its unix socket.
type Client struct {
	socket string
	hc     *http.Client
}

// ErrNoDaemon means no daemon answers on the socket.
var ErrNoDaemon = errors.New("no shoal daemon running")

// Dial returns a client for the daemon on socket, or ErrNoDaemon when the
// socket is absent or nobody answers (a stale socket a crash left).
func Dial(ctx context.Context, socket string) (*Client, error) {
	if _, err := os.Stat(socket); err != nil {
		return nil, ErrNoDaemon
	}
	c := &Client{socket: socket, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := c.Status(ctx); err != nil {
		return nil, fmt.Errorf("%w (socket %s: %v)", ErrNoDaemon, socket, err)
	}
	return c, nil
}

// Mount asks the daemon to mount an image.
func (c *Client) Mount(ctx context.Context, req MountRequest) (MountInfo, error) {
	var mi MountInfo
	return mi, c.do(ctx, http.MethodPost, "/v1/mounts", req, &mi)
}

// Unmount asks the daemon to unmount, returning the mount's final counters.
func (c *Client) Unmount(ctx context.Context, req UnmountRequest) (MountInfo, error) {
	var mi MountInfo
	return mi, c.do(ctx, http.MethodPost, "/v1/unmount", req, &mi)
}

// Status returns the daemon's state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body bytes.Buffer
	if in != nil {
		if err := json.NewEncoder(&body).Encode(in); err != nil {
			return err
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://shoal"+path, &body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var ae apiError
		if json.NewDecoder(resp.Body).Decode(&ae) == nil && ae.Error != "" {
			return errors.New(ae.Error)
		}
		return fmt.Errorf("daemon: HTTP %d", resp.StatusCode)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Prefetch asks the daemon to fill its cache with the image ref. With wait,
// it calls report with each progress line and returns the final progress;
// without, the daemon runs the prefetch as a background job and Prefetch
// returns at once.
func (c *Client) Prefetch(ctx context.Context, ref string, wait bool, report func(node.Progress)) (node.Progress, error) {
	body, err := json.Marshal(PrefetchRequest{Ref: ref, Background: !wait})
	if err != nil {
		return node.Progress{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://shoal/v1/prefetch", bytes.NewReader(body))
	if err != nil {
		return node.Progress{}, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return node.Progress{}, fmt.Errorf("daemon: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var ae apiError
		if json.NewDecoder(resp.Body).Decode(&ae) == nil && ae.Error != "" {
			return node.Progress{}, errors.New(ae.Error)
		}
		return node.Progress{}, fmt.Errorf("daemon: HTTP %d", resp.StatusCode)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev PrefetchEvent
		if err := dec.Decode(&ev); err != nil {
			return node.Progress{}, fmt.Errorf("daemon: prefetch stream: %w", err)
		}
		if ev.Final {
			if ev.Error != "" {
				return ev.Progress, errors.New(ev.Error)
			}
			return ev.Progress, nil
		}
		if report != nil {
			report(ev.Progress)
		}
	}
}
