package simulation

import (
	"bytes"
	"fmt"
	"html"
	"math"
	"slices"
	"strconv"
)

// The plots are hand-written SVG: three kinds of line chart do not need a
// plotting library, and the files stay small, diffable and deterministic.

// series is one line of a chart.
type series struct {
	name   string
	color  string
	xs, ys []float64
}

// chart is a line chart with optional log axes and horizontal goal lines.
type chart struct {
	title, xLabel, yLabel string
	logX, logY            bool
	series                []series
	goals                 []goal
}

type goal struct {
	y     float64
	label string
}

var strategyColor = map[Strategy]string{
	FullPull:    "#7f7f7f",
	LazyNoPeers: "#d62728",
	Swarm:       "#1f77b4",
	SwarmSeeded: "#2ca02c",
}

const (
	plotW, plotH             = 800, 440
	marginL, marginR         = 80, 260
	marginT, marginB         = 50, 60
	innerW, innerH   float64 = plotW - marginL - marginR, plotH - marginT - marginB
)

func (c chart) svg() []byte {
	var xs, ys []float64
	for _, s := range c.series {
		for i := range s.xs {
			if c.ok(s.xs[i], s.ys[i]) {
				xs, ys = append(xs, s.xs[i]), append(ys, s.ys[i])
			}
		}
	}
	for _, g := range c.goals {
		ys = append(ys, g.y)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", plotW, plotH, plotW, plotH)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", plotW, plotH)
	fmt.Fprintf(&b, `<text x="%d" y="24" font-size="15" font-weight="bold">%s</text>`+"\n", marginL, html.EscapeString(c.title))
	if len(xs) == 0 {
		b.WriteString(`<text x="100" y="200">no data</text></svg>` + "\n")
		return b.Bytes()
	}
	xa := newAxis(slices.Min(xs), slices.Max(xs), c.logX, false)
	ya := newAxis(min(slices.Min(ys), 0), slices.Max(ys), c.logY, true)
	if c.logY {
		ya = newAxis(slices.Min(ys), slices.Max(ys), true, true)
	}
	px := func(x float64) float64 { return marginL + xa.pos(x)*innerW }
	py := func(y float64) float64 { return marginT + (1-ya.pos(y))*innerH }
	// Grid and ticks.
	for _, t := range xa.ticks() {
		x := px(t)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", x, marginT, x, marginT+innerH)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x, marginT+innerH+18, num(t))
	}
	for _, t := range ya.ticks() {
		y := py(t)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>`+"\n", marginL, y, marginL+innerW, y)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", marginL-6, y+4, num(t))
	}
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.0f" height="%.0f" fill="none" stroke="#333"/>`+"\n", marginL, marginT, innerW, innerH)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", marginL+innerW/2, plotH-18, html.EscapeString(c.xLabel))
	fmt.Fprintf(&b, `<text x="18" y="%.1f" text-anchor="middle" transform="rotate(-90 18 %.1f)">%s</text>`+"\n", marginT+innerH/2, marginT+innerH/2, html.EscapeString(c.yLabel))
	for _, g := range c.goals {
		y := py(g.y)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#000" stroke-dasharray="6 4"/>`+"\n", marginL, y, marginL+innerW, y)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end" font-size="11">%s</text>`+"\n", marginL+innerW-4, y-4, html.EscapeString(g.label))
	}
	for i, s := range c.series {
		var pts []string
		for k := range s.xs {
			if c.ok(s.xs[k], s.ys[k]) {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(s.xs[k]), py(s.ys[k])))
			}
		}
		if len(pts) > 0 {
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", s.color, joinSpace(pts))
			if len(pts) < 12 {
				for _, p := range pts {
					var x, y float64
					fmt.Sscanf(p, "%f,%f", &x, &y)
					fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", x, y, s.color)
				}
			}
		}
		ly := marginT + 10 + 20*i
		lx := marginL + int(innerW) + 14
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/>`+"\n", lx, ly, lx+20, ly, s.color)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", lx+26, ly+4, html.EscapeString(s.name))
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// ok says whether a point can be drawn on the chart's axes.
func (c chart) ok(x, y float64) bool {
	return !math.IsNaN(x) && !math.IsNaN(y) && !math.IsInf(y, 0) && (!c.logX || x > 0) && (!c.logY || y > 0)
}

func joinSpace(ss []string) string {
	var b bytes.Buffer
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(s)
	}
	return b.String()
}

// axis maps values to [0, 1].
type axis struct {
	lo, hi float64
	log    bool
}

func newAxis(lo, hi float64, log, pad bool) axis {
	if log {
		lo, hi = math.Pow(10, math.Floor(math.Log10(lo))), math.Pow(10, math.Ceil(math.Log10(hi)))
		if hi <= lo {
			hi = lo * 10
		}
		return axis{lo: lo, hi: hi, log: true}
	}
	if hi <= lo {
		hi = lo + 1
	}
	if pad {
		step := niceStep((hi - lo) / 5)
		hi = math.Ceil(hi/step) * step
		lo = math.Floor(lo/step) * step
	}
	return axis{lo: lo, hi: hi}
}

func (a axis) pos(v float64) float64 {
	if a.log {
		return (math.Log10(v) - math.Log10(a.lo)) / (math.Log10(a.hi) - math.Log10(a.lo))
	}
	return (v - a.lo) / (a.hi - a.lo)
}

func (a axis) ticks() []float64 {
	var out []float64
	if a.log {
		for v := a.lo; v <= a.hi*1.0001; v *= 10 {
			out = append(out, v)
		}
		return out
	}
	step := niceStep((a.hi - a.lo) / 5)
	for v := math.Ceil(a.lo/step) * step; v <= a.hi+step*1e-9; v += step {
		out = append(out, v)
	}
	return out
}

// niceStep rounds a step up to 1, 2 or 5 times a power of ten.
func niceStep(x float64) float64 {
	if x <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case a >= 1e6:
		return strconv.FormatFloat(v/1e6, 'g', 3, 64) + "M"
	case a >= 1e4:
		return strconv.FormatFloat(v/1e3, 'g', 3, 64) + "k"
	default:
		return strconv.FormatFloat(v, 'g', 4, 64)
	}
}

// byStrategy groups a report's results.
func (rep *Report) byStrategy() ([]Strategy, map[Strategy][]*Result) {
	m := map[Strategy][]*Result{}
	var order []Strategy
	for _, r := range rep.Results {
		if _, ok := m[r.Strategy]; !ok {
			order = append(order, r.Strategy)
		}
		m[r.Strategy] = append(m[r.Strategy], r)
	}
	return order, m
}

func label(r *Result) string {
	if r.Strategy == SwarmSeeded {
		return fmt.Sprintf("%s (%d seeds)", r.Strategy, r.Seeds)
	}
	return string(r.Strategy)
}

func (rep *Report) egressPlot() []byte {
	order, m := rep.byStrategy()
	c := chart{title: "Registry egress ÷ unique bytes read", xLabel: "nodes", yLabel: "registry egress ÷ unique bytes (log)",
		logX: true, logY: true, goals: []goal{{1.2, "goal ≤ 1.2"}}}
	for _, s := range order {
		se := series{name: label(m[s][0]), color: strategyColor[s]}
		for _, r := range m[s] {
			se.xs, se.ys = append(se.xs, float64(r.Nodes)), append(se.ys, r.EgressPerUnique)
		}
		c.series = append(c.series, se)
	}
	return c.svg()
}

func (rep *Report) uploadPlot() []byte {
	order, m := rep.byStrategy()
	c := chart{title: "Busiest peer's upload ÷ mean upload", xLabel: "nodes", yLabel: "busiest ÷ mean", logX: true,
		goals: []goal{{4, "goal ≤ 4"}}}
	for _, r := range rep.Results {
		// Spread over decades: a log scale keeps the goal line readable.
		if r.BusiestPerMean > 40 {
			c.logY, c.yLabel = true, "busiest ÷ mean (log)"
		}
	}
	for _, s := range order {
		if s != Swarm && s != SwarmSeeded {
			continue
		}
		se := series{name: label(m[s][0]), color: strategyColor[s]}
		for _, r := range m[s] {
			se.xs, se.ys = append(se.xs, float64(r.Nodes)), append(se.ys, r.BusiestPerMean)
		}
		c.series = append(c.series, se)
	}
	return c.svg()
}

func (rep *Report) readyPlot(nodes int) []byte {
	c := chart{title: fmt.Sprintf("Time to ready, %d nodes (CDF)", nodes), xLabel: "seconds from the node's start (log)",
		yLabel: "fraction of nodes ready", logX: true}
	for _, r := range rep.Results {
		if r.Nodes != nodes || len(r.ReadyCDF) == 0 {
			continue
		}
		se := series{name: label(r), color: strategyColor[r.Strategy]}
		for p, x := range r.ReadyCDF {
			se.xs, se.ys = append(se.xs, x), append(se.ys, float64(p)/100)
		}
		c.series = append(c.series, se)
	}
	return c.svg()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
