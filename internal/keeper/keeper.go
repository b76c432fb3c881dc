// Package keeper holds the FUSE connections of a node's lazy mounts on the
// daemon's behalf, so that the mounts outlive the daemon: when it is
// killed, crashes or is upgraded, the kernel keeps each connection (and
// the requests on it) while some process holds its descriptor, and the
// next daemon takes the descriptors back and serves on (lazyfs.Attach).
//
// The keeper is a small process of its own (`shoal keeper`), meant to be
// started once and left alone: it never reads a connection, so it has no
// reason to change when the daemon does. It listens on a unix socket
// (SOCK_SEQPACKET) and answers only peers with its own user ID. Every
// request is one message: a JSON header and, for put, the connection's
// descriptor (SCM_RIGHTS). The header names an entry (its key) and may
// carry the daemon's state for it, opaque to the keeper:
//
//   - put: keep a connection, with its state (replacing any under the key);
//   - state: replace an entry's state;
//   - drop: close an entry's connection and forget it;
//   - take: send every entry, each with a duplicate of its connection.
//
// The keeper forgets entries whose connection the kernel has ended (the
// mount was unmounted or aborted), so what it holds is bounded by the
// node's live mounts and by MaxEntries. On SIGTERM it closes everything:
// mounts whose daemon is gone then fail with ENOTCONN instead of waiting.
package keeper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Limits of the protocol.
const (
	MaxEntries  = 4096     // connections held at once
	MaxState    = 32 << 10 // bytes of state per entry
	maxMessage  = 64 << 10 // bytes of one message's JSON
	ioTimeout   = 10 * time.Second
	pruneEvery  = 10 * time.Second
	maxKeyBytes = 256
)

// Entry is one connection the keeper holds.
type Entry struct {
	Key   string
	State []byte
	Conn  *os.File // nil in the keeper's own listing
}

type request struct {
	Op    string `json:"op"` // put, state, drop, take
	Key   string `json:"key,omitempty"`
	State []byte `json:"state,omitempty"`
}

type reply struct {
	Error string `json:"error,omitempty"`
	// For take: one reply per entry (Key, State, with its descriptor),
	// then one with End set.
	Key   string `json:"key,omitempty"`
	State []byte `json:"state,omitempty"`
	End   bool   `json:"end,omitempty"`
}

// Server is the keeper.
type Server struct {
	ln  *net.UnixListener
	log *slog.Logger

	mu      sync.Mutex
	entries map[string]*held
}

type held struct {
	state []byte
	fd    int
}

// Listen makes the keeper's socket at path, mode 0600, replacing a stale
// one but refusing to take a live keeper's.
func Listen(path string, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unixpacket", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("keeper: another keeper is serving %s", path)
	}
	_ = os.Remove(path)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("keeper: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return &Server{ln: ln, log: log.With("component", "keeper"), entries: map[string]*held{}}, nil
}

// Serve answers requests until ctx is done, then closes every connection
// it holds and its socket.
func (s *Server) Serve(ctx context.Context) error {
	go func() {
		<-ctx.Done()
		s.ln.Close()
	}()
	go s.pruneLoop(ctx)
	defer s.closeAll()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("keeper: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			if err := s.serveConn(c); err != nil {
				s.log.Warn("client", "err", err)
			}
		}()
	}
}

// Entries lists what the keeper holds, without the connections.
func (s *Server) Entries() []Entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Entry, 0, len(s.entries))
	for k, h := range s.entries {
		out = append(out, Entry{Key: k, State: h.state})
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Key < out[b].Key })
	return out
}

func (s *Server) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, h := range s.entries {
		unix.Close(h.fd)
		delete(s.entries, k)
	}
	_ = os.Remove(s.ln.Addr().String())
}

// serveConn answers one client's requests until it hangs up.
func (s *Server) serveConn(c *net.UnixConn) error {
	if err := checkPeer(c); err != nil {
		return err
	}
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		_ = c.SetReadDeadline(time.Now().Add(time.Minute))
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return nil // hung up, or idle
		}
		fds, ferr := receivedFDs(oob[:oobn])
		var req request
		if err := json.Unmarshal(buf[:n], &req); err != nil {
			closeFDs(fds)
			return fmt.Errorf("bad request: %w", err)
		}
		if ferr != nil {
			closeFDs(fds)
			if err := send(c, reply{Error: ferr.Error()}, -1); err != nil {
				return err
			}
			continue
		}
		if err := s.handle(c, req, fds); err != nil {
			return err
		}
	}
}

// handle answers one request. It owns fds: put keeps the first (the
// connection), and everything else received is closed.
func (s *Server) handle(c *net.UnixConn, req request, fds []int) error {
	var conn = -1
	if req.Op == "put" && len(fds) == 1 && isFUSE(fds[0]) {
		conn, fds = fds[0], nil
	}
	closeFDs(fds)
	fail := func(format string, args ...any) error {
		if conn >= 0 {
			unix.Close(conn)
		}
		return send(c, reply{Error: fmt.Sprintf(format, args...)}, -1)
	}
	if req.Op != "take" && (req.Key == "" || len(req.Key) > maxKeyBytes) {
		return fail("%s: key of %d bytes: want 1 to %d", req.Op, len(req.Key), maxKeyBytes)
	}
	if len(req.State) > MaxState {
		return fail("%s %s: state of %d bytes: want at most %d", req.Op, req.Key, len(req.State), MaxState)
	}
	switch req.Op {
	case "put":
		if conn < 0 {
			return fail("put %s: want exactly one /dev/fuse descriptor", req.Key)
		}
		s.mu.Lock()
		old, ok := s.entries[req.Key]
		if !ok && len(s.entries) >= MaxEntries {
			s.mu.Unlock()
			return fail("put %s: the keeper holds %d connections already", req.Key, MaxEntries)
		}
		s.entries[req.Key] = &held{state: req.State, fd: conn}
		s.mu.Unlock()
		if ok {
			unix.Close(old.fd)
		}
		s.log.Info("holding", "key", req.Key)
	case "state":
		s.mu.Lock()
		h, ok := s.entries[req.Key]
		if ok {
			h.state = req.State
		}
		s.mu.Unlock()
		if !ok {
			return fail("state %s: no such entry", req.Key)
		}
	case "drop":
		s.mu.Lock()
		h, ok := s.entries[req.Key]
		delete(s.entries, req.Key)
		s.mu.Unlock()
		if ok {
			unix.Close(h.fd)
			s.log.Info("dropped", "key", req.Key)
		}
	case "take":
		return s.sendAll(c)
	default:
		return fail("unknown op %q", req.Op)
	}
	return send(c, reply{}, -1)
}

// sendAll sends every entry with a duplicate of its connection. The keeper
// keeps its own: the taker may die before it serves them.
func (s *Server) sendAll(c *net.UnixConn) error {
	s.mu.Lock()
	type out struct {
		key   string
		state []byte
		fd    int
	}
	var all []out
	for k, h := range s.entries {
		fd, err := unix.FcntlInt(uintptr(h.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			continue
		}
		all = append(all, out{k, h.state, fd})
	}
	s.mu.Unlock()
	defer func() {
		for _, o := range all {
			unix.Close(o.fd)
		}
	}()
	for _, o := range all {
		if err := send(c, reply{Key: o.key, State: o.state}, o.fd); err != nil {
			return err
		}
	}
	return send(c, reply{End: true}, -1)
}

// pruneLoop forgets connections the kernel has ended: poll reports POLLERR
// on a FUSE device whose connection is aborted or unmounted.
func (s *Server) pruneLoop(ctx context.Context) {
	t := time.NewTicker(pruneEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.prune()
		}
	}
}

func (s *Server) prune() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, h := range s.entries {
		p := []unix.PollFd{{Fd: int32(h.fd)}}
		if n, err := unix.Poll(p, 0); err == nil && n > 0 && p[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			unix.Close(h.fd)
			delete(s.entries, k)
			s.log.Info("connection ended; forgotten", "key", k)
		}
	}
}

// checkPeer admits only processes of the keeper's own user.
func checkPeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("refused a client with uid %d (pid %d)", cred.Uid, cred.Pid)
	}
	return nil
}

// isFUSE reports whether fd is open on /dev/fuse.
func isFUSE(fd int) bool {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR {
		return false
	}
	var dev unix.Stat_t
	return unix.Stat("/dev/fuse", &dev) == nil && dev.Rdev == st.Rdev
}

func receivedFDs(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			closeFDs(fds)
			return nil, fmt.Errorf("control message: %w", err)
		}
		fds = append(fds, got...)
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd)
	}
	return fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// send writes one message, with fd attached unless it is negative.
func send(c *net.UnixConn, v any, fd int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	_ = c.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("keeper: send: %w", err)
	}
	return nil
}

// Client talks to a keeper. Each call is one short connection: the
// daemon calls it rarely (a mount, an unmount, a change of backing files),
// and a keeper that restarted in between is then found again.
type Client struct {
	Path string
}

func (k Client) dial(ctx context.Context) (*net.UnixConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", k.Path)
	if err != nil {
		return nil, fmt.Errorf("keeper %s: %w", k.Path, err)
	}
	uc := c.(*net.UnixConn)
	if dl, ok := ctx.Deadline(); ok {
		_ = uc.SetDeadline(dl)
	} else {
		_ = uc.SetDeadline(time.Now().Add(ioTimeout))
	}
	return uc, nil
}

// call sends one request (with fd unless negative) and reads its reply.
func (k Client) call(ctx context.Context, req request, fd int) error {
	c, err := k.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("keeper %s: %s: %w", k.Path, req.Op, err)
	}
	r, _, err := readReply(c)
	if err != nil {
		return fmt.Errorf("keeper %s: %s: %w", k.Path, req.Op, err)
	}
	if r.Error != "" {
		return fmt.Errorf("keeper %s: %s", k.Path, r.Error)
	}
	return nil
}

func readReply(c *net.UnixConn) (reply, *os.File, error) {
	var r reply
	buf := make([]byte, maxMessage+MaxState*2)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return r, nil, err
	}
	if n == 0 {
		return r, nil, errors.New("keeper hung up")
	}
	fds, err := receivedFDs(oob[:oobn])
	if err != nil {
		return r, nil, err
	}
	if err := json.Unmarshal(buf[:n], &r); err != nil {
		closeFDs(fds)
		return r, nil, fmt.Errorf("bad reply: %w", err)
	}
	var f *os.File
	if len(fds) > 0 {
		f = os.NewFile(uintptr(fds[0]), "/dev/fuse")
		closeFDs(fds[1:])
	}
	return r, f, nil
}

// Put has the keeper hold conn (a duplicate of it: conn stays the
// caller's) under key, with state.
func (k Client) Put(ctx context.Context, key string, state []byte, conn *os.File) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cerr = k.call(ctx, request{Op: "put", Key: key, State: state}, int(fd))
	}); err != nil {
		return err
	}
	return cerr
}

// SetState replaces the state of key's entry.
func (k Client) SetState(ctx context.Context, key string, state []byte) error {
	return k.call(ctx, request{Op: "state", Key: key, State: state}, -1)
}

// Drop has the keeper close key's connection and forget it.
func (k Client) Drop(ctx context.Context, key string) error {
	return k.call(ctx, request{Op: "drop", Key: key}, -1)
}

// Take returns every entry the keeper holds, each with its own duplicate
// of the connection; the keeper keeps holding them.
func (k Client) Take(ctx context.Context) ([]Entry, error) {
	c, err := k.dial(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	b, _ := json.Marshal(request{Op: "take"})
	if _, err := c.Write(b); err != nil {
		return nil, fmt.Errorf("keeper %s: take: %w", k.Path, err)
	}
	var out []Entry
	fail := func(err error) ([]Entry, error) {
		for _, e := range out {
			e.Conn.Close()
		}
		return nil, fmt.Errorf("keeper %s: take: %w", k.Path, err)
	}
	for len(out) <= MaxEntries {
		r, f, err := readReply(c)
		if err != nil {
			return fail(err)
		}
		if r.Error != "" {
			return fail(errors.New(r.Error))
		}
		if r.End {
			return out, nil
		}
		if f == nil {
			return fail(fmt.Errorf("entry %s came without its connection", r.Key))
		}
		out = append(out, Entry{Key: r.Key, State: r.State, Conn: f})
	}
	return fail(errors.New("more entries than a keeper holds"))
}
