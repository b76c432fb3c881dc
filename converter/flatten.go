package converter

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/shoal-project/shoal/flat"
)

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	xattrPAXPrefix = "SCHILY.xattr."
)

// ErrUnsafe is wrapped by errors about entries that would escape the image
// root or otherwise cannot be represented safely.
var ErrUnsafe = errors.New("unsafe layer entry")

// ErrTooLarge is wrapped when a layer exceeds the decompression limits.
var ErrTooLarge = errors.New("layer exceeds decompression limits")

// inode is the content of a regular file, shared by its hard links.
type inode struct {
	off, size int64 // position in the spool
}

// node is one entry of the tree being flattened.
type node struct {
	typ      flat.Type
	mode     uint32
	uid, gid uint32
	mtimeSec int64
	mtimeNs  uint32
	linkname string // symlinks only
	devMajor uint32
	devMinor uint32
	xattrs   []flat.Xattr
	ino      *inode           // regular files
	children map[string]*node // directories
	layer    int              // the layer that last wrote this node
}

// tree applies layers in order, spooling regular file contents to a temp file.
type tree struct {
	root  *node
	spool *os.File
	end   int64 // bytes written to the spool
	log   *slog.Logger
	limit limits
	total int64 // uncompressed tar bytes read over all layers
	count int   // entries seen over all layers
}

type limits struct {
	maxBytes   int64 // uncompressed bytes over all layers
	maxRatio   int64 // uncompressed ÷ compressed, per layer ...
	ratioFloor int64 // ... once a layer is bigger than this
	maxEntries int
}

func newTree(spool *os.File, lim limits, log *slog.Logger) *tree {
	return &tree{
		root:  &node{typ: flat.TypeDir, mode: 0o755, children: map[string]*node{}},
		spool: spool,
		log:   log,
		limit: lim,
	}
}

// countingReader counts bytes and stops a layer that inflates past the limits.
type countingReader struct {
	r          io.Reader
	n          int64
	t          *tree
	compressed int64
	layer      string
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	c.t.total += int64(n)
	if c.t.total > c.t.limit.maxBytes {
		return n, fmt.Errorf("%w: more than %d uncompressed bytes in the image (possible decompression bomb; raise --max-image-bytes if this is real)", ErrTooLarge, c.t.limit.maxBytes)
	}
	if c.compressed > 0 && c.n > c.t.limit.ratioFloor && c.n/c.compressed > c.t.limit.maxRatio {
		return n, fmt.Errorf("%w: layer %s inflates more than %dx (%d compressed bytes gave over %d; possible decompression bomb)", ErrTooLarge, c.layer, c.t.limit.maxRatio, c.compressed, c.n)
	}
	return n, err
}

// apply reads one uncompressed layer tar and applies it to the tree.
func (t *tree) apply(layer int, name string, r io.Reader, compressedSize int64) error {
	cr := &countingReader{r: r, t: t, compressed: compressedSize, layer: name}
	tr := tar.NewReader(cr)
	var opaque []*node
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("layer %s: read tar: %w", name, err)
		}
		t.count++
		if t.count > t.limit.maxEntries {
			return fmt.Errorf("%w: more than %d entries", ErrTooLarge, t.limit.maxEntries)
		}
		if err := t.entry(layer, hdr, tr, &opaque); err != nil {
			return fmt.Errorf("layer %s: %w", name, err)
		}
	}
	// Drain so a verifying reader below sees EOF and checks the digest.
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return fmt.Errorf("layer %s: %w", name, err)
	}
	// Opaque markers hide only lower layers, whatever their position in the tar.
	for _, dir := range opaque {
		pruneLower(dir, layer)
	}
	return nil
}

// pruneLower removes from dir's subtree everything lower layers wrote,
// keeping what layer wrote. A lower directory that still holds entries of
// this layer stays, as the parent they need.
func pruneLower(dir *node, layer int) {
	for k, c := range dir.children {
		if c.typ == flat.TypeDir {
			pruneLower(c, layer)
			if c.layer != layer && len(c.children) == 0 {
				delete(dir.children, k)
			}
		} else if c.layer != layer {
			delete(dir.children, k)
		}
	}
}

// cleanName turns a tar entry name into a clean relative path ("" for the
// root). Leading slashes are dropped (a layer is always relative to the image
// root); a name that climbs out of the root with ".." is an error. Backslashes
// are ordinary characters on Linux and stay as they are.
func cleanName(name string) (string, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: NUL in name %q", ErrUnsafe, name)
	}
	rel := path.Clean(strings.TrimLeft(name, "/"))
	if rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("%w: entry %q climbs out of the image root", ErrUnsafe, name)
	}
	if rel == "." {
		return "", nil
	}
	return rel, nil
}

func (t *tree) entry(layer int, hdr *tar.Header, body io.Reader, opaque *[]*node) error {
	p, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	if strings.HasPrefix(hdr.Name, "/") {
		t.log.Warn("absolute path in layer made relative", "entry", hdr.Name)
	}
	dirName, base := path.Split(p)
	dirName = strings.TrimSuffix(dirName, "/")
	if base == opaqueMarker {
		if d := t.dir(dirName, layer, true); d != nil {
			*opaque = append(*opaque, d)
		}
		return nil
	}
	if target, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
		// Whiteouts hide lower layers only: an entry this layer wrote stays,
		// wherever the whiteout stands in the tar.
		if d := t.dir(dirName, layer, false); d != nil {
			if c, ok := d.children[target]; ok && c.layer != layer {
				delete(d.children, target)
			}
		}
		return nil
	}
	for _, c := range strings.Split(p, "/") {
		if len(c) > flat.MaxNameLen {
			return fmt.Errorf("%w: name longer than %d bytes in %q", ErrUnsafe, flat.MaxNameLen, hdr.Name)
		}
	}
	if len(p) > flat.MaxPathLen {
		return fmt.Errorf("%w: path longer than %d bytes: %q", ErrUnsafe, flat.MaxPathLen, hdr.Name)
	}

	n := &node{
		mode:     uint32(hdr.Mode) & 0o7777,
		uid:      uint32(hdr.Uid),
		gid:      uint32(hdr.Gid),
		mtimeSec: hdr.ModTime.Unix(),
		mtimeNs:  uint32(hdr.ModTime.Nanosecond()),
		layer:    layer,
	}
	if hdr.Uid < 0 || hdr.Gid < 0 || int64(hdr.Uid) > 1<<32-1 || int64(hdr.Gid) > 1<<32-1 {
		return fmt.Errorf("%w: owner %d:%d of %q out of range", ErrUnsafe, hdr.Uid, hdr.Gid, hdr.Name)
	}
	if n.xattrs, err = xattrsOf(hdr); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		n.typ = flat.TypeDir
	case tar.TypeReg, tar.TypeCont, tar.TypeGNUSparse: // the reader reports the old TypeRegA as TypeReg
		n.typ = flat.TypeReg
		ino, err := t.store(body, hdr.Size)
		if err != nil {
			return fmt.Errorf("%q: %w", hdr.Name, err)
		}
		n.ino = ino
	case tar.TypeSymlink:
		if hdr.Linkname == "" || len(hdr.Linkname) > flat.MaxLinkLen || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return fmt.Errorf("%w: bad symlink target for %q", ErrUnsafe, hdr.Name)
		}
		if escapes(p, hdr.Linkname) {
			t.log.Warn("dropped symlink whose relative target leaves the image root", "entry", hdr.Name, "target", hdr.Linkname)
			return nil
		}
		n.typ = flat.TypeSymlink
		n.linkname = hdr.Linkname
	case tar.TypeLink:
		target, err := cleanName(hdr.Linkname)
		if err != nil || target == "" {
			t.log.Warn("dropped hard link whose target leaves the image root", "entry", hdr.Name, "target", hdr.Linkname)
			return nil
		}
		src := t.lookup(target)
		if src == nil || src.typ == flat.TypeDir {
			return fmt.Errorf("%w: hard link %q to missing or directory target %q", ErrUnsafe, hdr.Name, hdr.Linkname)
		}
		// A hard link is a second name for the same inode: it shares the
		// target's contents and metadata.
		cp := *src
		cp.layer = layer
		n = &cp
	case tar.TypeChar, tar.TypeBlock:
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 1<<32-1 || hdr.Devminor > 1<<32-1 {
			return fmt.Errorf("%w: device numbers %d,%d of %q out of range", ErrUnsafe, hdr.Devmajor, hdr.Devminor, hdr.Name)
		}
		n.typ, n.devMajor, n.devMinor = flat.TypeChar, uint32(hdr.Devmajor), uint32(hdr.Devminor)
		if hdr.Typeflag == tar.TypeBlock {
			n.typ = flat.TypeBlock
		}
	case tar.TypeFifo:
		n.typ = flat.TypeFIFO
	case tar.TypeXGlobalHeader:
		return nil
	default:
		t.log.Warn("skipped tar entry of unsupported type", "entry", hdr.Name, "type", string(hdr.Typeflag))
		return nil
	}
	if p == "" {
		if n.typ != flat.TypeDir {
			return fmt.Errorf("%w: image root %q is not a directory", ErrUnsafe, hdr.Name)
		}
		t.root.replaceMeta(n)
		return nil
	}
	parent := t.dir(dirName, layer, true)
	if old, ok := parent.children[base]; ok && old.typ == flat.TypeDir && n.typ == flat.TypeDir {
		old.replaceMeta(n) // a directory in an upper layer keeps the lower one's contents
		return nil
	}
	if n.typ == flat.TypeDir {
		n.children = map[string]*node{}
	}
	parent.children[base] = n
	return nil
}

func (n *node) replaceMeta(from *node) {
	n.mode, n.uid, n.gid = from.mode, from.uid, from.gid
	n.mtimeSec, n.mtimeNs, n.xattrs, n.layer = from.mtimeSec, from.mtimeNs, from.xattrs, from.layer
}

// maxLinkHops bounds symlink resolution in parent paths (Linux's limit).
const maxLinkHops = 40

// dir returns the directory at p, creating missing ones (mode 0755, owned by
// root, stamped with layer) when create is set. A symlink on the way is
// followed inside the image root, as containerd resolves parent paths when
// it applies a layer; any other non-directory on the way is replaced by a
// directory.
func (t *tree) dir(p string, layer int, create bool) *node {
	hops := 0
	var walk func(p string) *node
	walk = func(p string) *node {
		d := t.root
		cur := ""
		rest := p
		for rest != "" {
			c, r, _ := strings.Cut(rest, "/")
			rest = r
			next, ok := d.children[c]
			if ok && next.typ == flat.TypeSymlink && hops < maxLinkHops {
				hops++
				target := next.linkname
				if !path.IsAbs(target) {
					target = path.Join("/", cur, target)
				}
				resolved := strings.TrimPrefix(path.Clean("/"+target), "/") // clamped to the root
				if rest != "" {
					resolved = strings.TrimPrefix(resolved+"/"+rest, "/")
				}
				return walk(resolved)
			}
			if !ok || next.typ != flat.TypeDir {
				if !create {
					return nil
				}
				next = &node{typ: flat.TypeDir, mode: 0o755, children: map[string]*node{}, layer: layer}
				d.children[c] = next
			}
			d = next
			if cur == "" {
				cur = c
			} else {
				cur += "/" + c
			}
		}
		return d
	}
	return walk(p)
}

func (t *tree) lookup(p string) *node {
	d := t.root
	for c := range strings.SplitSeq(p, "/") {
		if d.typ != flat.TypeDir {
			return nil
		}
		next, ok := d.children[c]
		if !ok {
			return nil
		}
		d = next
	}
	return d
}

// store copies a regular file's contents into the spool.
func (t *tree) store(r io.Reader, size int64) (*inode, error) {
	if size < 0 {
		return nil, fmt.Errorf("%w: negative size", ErrUnsafe)
	}
	// Sparse tar entries expand to zeros the compressed stream never held,
	// so the spooled bytes count against the image limit too.
	if size > t.limit.maxBytes-t.end {
		return nil, fmt.Errorf("%w: file of %d bytes exceeds the image limit of %d uncompressed bytes (possible decompression bomb)", ErrTooLarge, size, t.limit.maxBytes)
	}
	ino := &inode{off: t.end, size: size}
	if size == 0 {
		return ino, nil
	}
	w := io.NewOffsetWriter(t.spool, t.end)
	n, err := io.CopyN(w, r, size)
	t.end += n
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("spool contents: %w", err)
	}
	return ino, nil
}

// escapes reports whether a relative symlink target, resolved from the
// link's directory, climbs out of the image root.
func escapes(name, target string) bool {
	if path.IsAbs(target) {
		return false
	}
	rel := path.Clean(path.Join(path.Dir(name), target))
	return rel == ".." || strings.HasPrefix(rel, "../")
}

func xattrsOf(hdr *tar.Header) ([]flat.Xattr, error) {
	var out []flat.Xattr
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, xattrPAXPrefix)
		if !ok {
			continue
		}
		if name == "" || len(name) > flat.MaxNameLen || len(v) > flat.MaxXattrLen {
			return nil, fmt.Errorf("%w: bad xattr %q on %q", ErrUnsafe, name, hdr.Name)
		}
		out = append(out, flat.Xattr{Name: name, Value: []byte(v)})
	}
	if len(out) > flat.MaxXattrs {
		return nil, fmt.Errorf("%w: %d xattrs on %q", ErrUnsafe, len(out), hdr.Name)
	}
	slices.SortFunc(out, func(a, b flat.Xattr) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
