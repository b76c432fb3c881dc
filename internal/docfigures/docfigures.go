// Package docfigures checks that the figures README.md and docs/ quote from
// results files (bench/results, simulation/results) are what those files
// hold.
//
// A quoted figure carries a reference in an HTML comment right after it
// (after its unit, if any), which Markdown does not render:
//
//	p99 14.1 s<!-- src bench/results/chaos-rollout.json .shoal.p99_ready_s --> against
//
// The reference names the file (relative to the repository root), a path
// into its JSON, and optional operations applied in order. The figure is
// the number just before the comment; up to 8 characters of unit may sit
// between them ("s", "×", "%", " MB", "/s"). It matches when the value,
// rounded to as many decimals as the figure is written with, equals the
// figure: "14.1" holds for 14.098, "14" for 13.6, "1.00" for 1.
//
// Paths: ".key" selects a field (`["a.b"]` one whose name holds a dot or
// a bracket), "[2]" an array element, "[nodes=1000]" or
// "[strategy=lazy-swarm,nodes=1000]" the one element of an array of objects
// whose fields have those values (exactly one must). Operations: "*N" and
// "/N" scale (N a Go float: 100, 1e6, 1048576); "min", "max" and "median"
// reduce an array of numbers; "-PATH" and "/PATH" (PATH starting with a dot)
// subtract or divide by another value of the same file. So a percentage is
// "*100", megabytes "/1e6", a range "… min" and "… max", and a difference
// ".a -.b".
package docfigures

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Figure is one quoted figure and its reference.
type Figure struct {
	Doc    string // document, relative to the root
	Line   int    // 1-based
	Quoted string // the figure as written, e.g. "−10.1"
	File   string // results file, relative to the root
	Path   string // JSON path into File
	Ops    []string
}

func (f Figure) String() string {
	ref := strings.TrimSpace(f.File + " " + f.Path + " " + strings.Join(f.Ops, " "))
	return fmt.Sprintf("%s:%d: %q (%s)", f.Doc, f.Line, f.Quoted, ref)
}

// refRE finds a reference; numRE the figure that ends right before it (with
// its unit). The sign is ASCII '-' or U+2212; commas group thousands.
var (
	refRE = regexp.MustCompile(`<!--\s*src\s+(.*?)\s*-->`)
	numRE = regexp.MustCompile(`([−-]?[0-9][0-9,]*(?:\.[0-9]+)?)([^0-9<>|]{0,8})$`)
)

// Parse returns the figures of one document. A reference with no figure
// before it, or with no file and path, is an error: a reference that checks
// nothing must not pass.
func Parse(doc string, text []byte) ([]Figure, error) {
	var out []Figure
	for i, line := range strings.Split(string(text), "\n") {
		for _, m := range refRE.FindAllStringSubmatchIndex(line, -1) {
			fields := strings.Fields(line[m[2]:m[3]])
			if len(fields) < 2 {
				return nil, fmt.Errorf("%s:%d: reference %q: want FILE PATH [OPS]", doc, i+1, line[m[0]:m[1]])
			}
			before := strings.TrimRight(line[:m[0]], " ")
			// A figure may be followed by an earlier reference's end: only
			// the text after the previous comment counts.
			if j := strings.LastIndex(before, "-->"); j >= 0 {
				before = before[j+3:]
			}
			n := numRE.FindStringSubmatch(before)
			if n == nil {
				return nil, fmt.Errorf("%s:%d: reference %q follows no figure", doc, i+1, line[m[0]:m[1]])
			}
			q := n[1]
			// "0.52-0.61": the hyphen is a range, not a sign.
			if strings.HasPrefix(q, "-") {
				if k := len(before) - len(n[0]); k > 0 && before[k-1] >= '0' && before[k-1] <= '9' {
					q = q[1:]
				}
			}
			out = append(out, Figure{Doc: doc, Line: i + 1, Quoted: q, File: fields[0], Path: fields[1], Ops: fields[2:]})
		}
	}
	return out, nil
}

// ParseQuoted returns the figure's value and its number of decimals.
func ParseQuoted(q string) (float64, int, error) {
	s := strings.ReplaceAll(strings.ReplaceAll(q, "−", "-"), ",", "")
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("figure %q: %w", q, err)
	}
	dec := 0
	if i := strings.IndexByte(s, '.'); i >= 0 {
		dec = len(s) - i - 1
	}
	return v, dec, nil
}

// Matches reports whether the quoted figure is value rounded to the
// figure's decimals. Half a unit in the last place either way passes, so
// both ways of rounding a tie do.
func Matches(quoted string, value float64) (bool, error) {
	q, dec, err := ParseQuoted(quoted)
	if err != nil {
		return false, err
	}
	half := 0.5 * math.Pow10(-dec)
	return math.Abs(q-value) <= half*(1+1e-9)+1e-12, nil
}

// Check returns one error per figure that does not match its file (or
// whose file or path is not there). root is the repository root.
func Check(root string, figs []Figure) []error {
	cache := map[string]any{}
	var errs []error
	for _, f := range figs {
		doc, ok := cache[f.File]
		if !ok {
			b, err := os.ReadFile(filepath.Join(root, f.File))
			if err != nil {
				errs = append(errs, fmt.Errorf("%v: %w", f, err))
				continue
			}
			if err := json.Unmarshal(b, &doc); err != nil {
				errs = append(errs, fmt.Errorf("%v: %s: %w", f, f.File, err))
				continue
			}
			cache[f.File] = doc
		}
		v, err := Eval(doc, f.Path, f.Ops)
		if err != nil {
			errs = append(errs, fmt.Errorf("%v: %w", f, err))
			continue
		}
		ok, err = Matches(f.Quoted, v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%v: %w", f, err))
			continue
		}
		if !ok {
			errs = append(errs, fmt.Errorf("%v: the file holds %s", f, strconv.FormatFloat(v, 'g', 8, 64)))
		}
	}
	return errs
}

// Eval applies path and then ops to a decoded JSON document and returns a
// number.
func Eval(doc any, path string, ops []string) (float64, error) {
	cur, err := Select(doc, path)
	if err != nil {
		return 0, err
	}
	for _, op := range ops {
		switch {
		case op == "min" || op == "max" || op == "median":
			xs, err := numbers(cur)
			if err != nil {
				return 0, fmt.Errorf("%s: %w", op, err)
			}
			if len(xs) == 0 {
				return 0, fmt.Errorf("%s of an empty array", op)
			}
			slices.Sort(xs)
			switch op {
			case "min":
				cur = xs[0]
			case "max":
				cur = xs[len(xs)-1]
			default:
				m := xs[len(xs)/2]
				if len(xs)%2 == 0 {
					m = (xs[len(xs)/2-1] + m) / 2
				}
				cur = m
			}
		case len(op) > 1 && (op[0] == '*' || op[0] == '/' || op[0] == '-'):
			x, ok := cur.(float64)
			if !ok {
				return 0, fmt.Errorf("%s applied to %T, not a number", op, cur)
			}
			var y float64
			if op[1] == '.' {
				other, err := Select(doc, op[1:])
				if err != nil {
					return 0, err
				}
				if y, ok = other.(float64); !ok {
					return 0, fmt.Errorf("%s is %T, not a number", op[1:], other)
				}
			} else if y, err = strconv.ParseFloat(op[1:], 64); err != nil {
				return 0, fmt.Errorf("operation %q: %w", op, err)
			}
			switch op[0] {
			case '*':
				cur = x * y
			case '/':
				cur = x / y
			default:
				cur = x - y
			}
		default:
			return 0, fmt.Errorf("unknown operation %q", op)
		}
	}
	x, ok := cur.(float64)
	if !ok {
		return 0, fmt.Errorf("%s is %T, not a number", path, cur)
	}
	return x, nil
}

func numbers(v any) ([]float64, error) {
	arr, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%T is not an array", v)
	}
	xs := make([]float64, len(arr))
	for i, e := range arr {
		if xs[i], ok = e.(float64); !ok {
			return nil, fmt.Errorf("element %d is %T, not a number", i, e)
		}
	}
	return xs, nil
}

// Select follows a path (".a.b[2][k=v].c") into a decoded JSON document.
func Select(doc any, path string) (any, error) {
	cur := doc
	rest := path
	for rest != "" {
		switch rest[0] {
		case '.':
			end := strings.IndexAny(rest[1:], ".[")
			if end < 0 {
				end = len(rest) - 1
			}
			key := rest[1 : 1+end]
			rest = rest[1+end:]
			obj, ok := cur.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("path %s: .%s of %T, not an object", path, key, cur)
			}
			if cur, ok = obj[key]; !ok {
				return nil, fmt.Errorf("path %s: no field %q", path, key)
			}
		case '[':
			end := strings.IndexByte(rest, ']')
			if end < 0 {
				return nil, fmt.Errorf("path %s: unclosed [", path)
			}
			sel := rest[1:end]
			rest = rest[end+1:]
			if key, err := strconv.Unquote(sel); err == nil {
				obj, ok := cur.(map[string]any)
				if !ok {
					return nil, fmt.Errorf("path %s: [%s] of %T, not an object", path, sel, cur)
				}
				if cur, ok = obj[key]; !ok {
					return nil, fmt.Errorf("path %s: no field %q", path, key)
				}
				continue
			}
			arr, ok := cur.([]any)
			if !ok {
				return nil, fmt.Errorf("path %s: [%s] of %T, not an array", path, sel, cur)
			}
			if i, err := strconv.Atoi(sel); err == nil {
				if i < 0 || i >= len(arr) {
					return nil, fmt.Errorf("path %s: index %d of %d elements", path, i, len(arr))
				}
				cur = arr[i]
				continue
			}
			var found []any
			for _, e := range arr {
				if matchAll(e, sel) {
					found = append(found, e)
				}
			}
			if len(found) != 1 {
				return nil, fmt.Errorf("path %s: [%s] matches %d elements, want 1", path, sel, len(found))
			}
			cur = found[0]
		default:
			return nil, fmt.Errorf("path %s: expected . or [ at %q", path, rest)
		}
	}
	return cur, nil
}

// matchAll reports whether object e has every k=v of sel (comma-separated),
// comparing v with the field's JSON text (strings unquoted).
func matchAll(e any, sel string) bool {
	obj, ok := e.(map[string]any)
	if !ok {
		return false
	}
	for _, kv := range strings.Split(sel, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return false
		}
		f, ok := obj[k]
		if !ok {
			return false
		}
		var s string
		switch x := f.(type) {
		case string:
			s = x
		case float64:
			s = strconv.FormatFloat(x, 'f', -1, 64)
		default:
			b, _ := json.Marshal(x)
			s = string(b)
		}
		if s != v {
			return false
		}
	}
	return true
}
