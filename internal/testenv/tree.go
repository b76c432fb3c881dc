package testenv

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"
)

// TreeEntry is what tree comparisons look at for one path: the kind
// ("dir", "file", "symlink", "char", "block", "fifo"), permission bits,
// owner, symlink target, content hash, xattrs and device numbers. Hard links
// show as the file they name.
type TreeEntry struct {
	Kind     string
	Mode     uint32
	UID, GID uint32
	Link     string
	SHA256   string
	Xattrs   string // "name=value,..." sorted
	Dev      [2]uint32
}

// Tree maps clean relative paths to entries.
type Tree map[string]TreeEntry

const paxXattr = "SCHILY.xattr."

// ExtractTree flattens img with go-containerregistry's mutate.Extract — code
// none of Shoal's authors wrote, so it serves as an oracle — and returns the
// tree it describes.
func ExtractTree(tb testing.TB, img v1.Image) Tree {
	tb.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	out := Tree{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			tb.Fatalf("extract: %v", err)
		}
		p := strings.TrimPrefix(h.Name, "/")
		if p == "." || p == "" {
			continue
		}
		if _, seen := out[p]; seen {
			continue // Extract writes upper layers first: the first header wins
		}
		e := TreeEntry{Mode: uint32(h.Mode) & 0o7777, UID: uint32(h.Uid), GID: uint32(h.Gid)}
		var xs []string
		for k, v := range h.PAXRecords {
			if name, ok := strings.CutPrefix(k, paxXattr); ok {
				xs = append(xs, name+"="+v)
			}
		}
		slices.Sort(xs)
		e.Xattrs = strings.Join(xs, ",")
		switch h.Typeflag {
		case tar.TypeDir:
			e.Kind = "dir"
		case tar.TypeReg:
			e.Kind = "file"
			sum := sha256.New()
			if _, err := io.Copy(sum, tr); err != nil {
				tb.Fatalf("extract %s: %v", p, err)
			}
			e.SHA256 = hex.EncodeToString(sum.Sum(nil))
		case tar.TypeSymlink:
			e.Kind, e.Link = "symlink", h.Linkname
		case tar.TypeLink:
			target, ok := out[strings.TrimPrefix(h.Linkname, "/")]
			if !ok {
				tb.Fatalf("extract: hard link %s to unseen %s", p, h.Linkname)
			}
			e = target
		case tar.TypeChar, tar.TypeBlock:
			e.Kind = "char"
			if h.Typeflag == tar.TypeBlock {
				e.Kind = "block"
			}
			e.Dev = [2]uint32{uint32(h.Devmajor), uint32(h.Devminor)}
		case tar.TypeFifo:
			e.Kind = "fifo"
		}
		out[p] = e
	}
	return out
}

// WalkTree describes the tree mounted or unpacked at dir, reading every
// file's contents, every symlink and every xattr through the file system.
func WalkTree(tb testing.TB, dir string) Tree {
	tb.Helper()
	out := Tree{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		e := TreeEntry{Mode: uint32(fi.Mode().Perm()), UID: st.Uid, GID: st.Gid}
		if fi.Mode()&fs.ModeSetuid != 0 {
			e.Mode |= 0o4000
		}
		if fi.Mode()&fs.ModeSetgid != 0 {
			e.Mode |= 0o2000
		}
		if fi.Mode()&fs.ModeSticky != 0 {
			e.Mode |= 0o1000
		}
		switch {
		case fi.IsDir():
			e.Kind = "dir"
		case fi.Mode().IsRegular():
			e.Kind = "file"
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			e.SHA256 = hex.EncodeToString(h.Sum(nil))
		case fi.Mode()&fs.ModeSymlink != 0:
			e.Kind = "symlink"
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case fi.Mode()&fs.ModeCharDevice != 0:
			e.Kind, e.Dev = "char", [2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)}
		case fi.Mode()&fs.ModeDevice != 0:
			e.Kind, e.Dev = "block", [2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)}
		case fi.Mode()&fs.ModeNamedPipe != 0:
			e.Kind = "fifo"
		}
		if e.Kind != "symlink" {
			e.Xattrs = xattrs(p)
		}
		out[filepath.ToSlash(rel)] = e
		return nil
	})
	if err != nil {
		tb.Fatalf("walk %s: %v", dir, err)
	}
	return out
}

func xattrs(p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return ""
	}
	var xs []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		val := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, val)
		if err != nil {
			continue
		}
		xs = append(xs, name+"="+string(val[:m]))
	}
	slices.Sort(xs)
	return strings.Join(xs, ",")
}

// CompareTrees reports every difference between want (the oracle) and got.
// Directories only got has are allowed: Shoal makes parents a layer never
// listed, which Extract leaves implicit.
func CompareTrees(tb testing.TB, want, got Tree) {
	tb.Helper()
	bad := 0
	for p, w := range want {
		g, ok := got[p]
		switch {
		case !ok:
			tb.Errorf("%s: missing", p)
		case g != w:
			tb.Errorf("%s: got %+v, want %+v", p, g, w)
		default:
			continue
		}
		if bad++; bad > 50 {
			tb.Fatalf("too many differences")
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok && g.Kind != "dir" {
			tb.Errorf("%s: unexpected (%+v)", p, g)
		}
	}
}
