// The Shoal status page: polls api/status once a second and redraws.
// Plain DOM and hand-written SVG: no libraries, nothing loaded from
// elsewhere. Text from the daemon goes in through textContent only.
"use strict";

const SOURCES = [
  { key: "cache", name: "cache", color: "#2e9b57" },
  { key: "peers", name: "peers", color: "#2f6fd0" },
  { key: "registry", name: "registry", color: "#e07b1a" },
];
const SVGNS = "http://www.w3.org/2000/svg";
const UNITS = ["B", "kB", "MB", "GB", "TB", "PB"];

// fmtBytes: decimal units, three significant digits ("600 kB", "1.25 MB").
function fmtBytes(n) {
  if (!isFinite(n) || n < 0) n = 0;
  if (n < 1000) return Math.round(n) + " B";
  let i = 0;
  while (n >= 1000 && i < UNITS.length - 1) { n /= 1000; i++; }
  const s = n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
  return s + " " + UNITS[i];
}
function fmtRate(n) { return fmtBytes(n) + "/s"; }
function fmtPct(part, all) { return all > 0 ? (100 * part / all).toFixed(1) + " %" : "–"; }
function fmtDuration(s) {
  s = Math.max(0, Math.floor(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function shortID(id) { return id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id; }

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function setValue(id, bytes, text) {
  const e = document.getElementById(id);
  e.textContent = text;
  e.dataset.value = String(bytes);
}

// niceStep rounds max/ticks up to 1, 2 or 5 times a power of ten.
function niceStep(max, ticks) {
  const raw = max / ticks;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

// lineChart draws lines over time into an SVG with a 0-based y axis,
// minute ticks on x and a legend. series: [{name, color, points: [[tMs, v]]}].
// opts: {fmt, extra: [{value, label, cls}]} for horizontal marker lines.
function lineChart(root, series, opts) {
  const W = +root.viewBox.baseVal.width, H = +root.viewBox.baseVal.height;
  const L = 78, R = 12, T = 26, B = 24;
  root.replaceChildren();
  const all = series.flatMap(s => s.points);
  if (all.length < 2) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "collecting samples…"));
    return;
  }
  const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0]));
  let vmax = Math.max(...all.map(p => p[1]), ...(opts.extra || []).map(x => x.value), 0);
  if (vmax <= 0) vmax = 1;
  const step = Math.max(1, niceStep(vmax, 4)); // bytes: whole numbers
  vmax = Math.ceil(vmax / step) * step;
  const x = t => L + (W - L - R) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = v => T + (H - T - B) * (1 - v / vmax);
  for (let v = 0; v <= vmax + step / 2; v += step) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, opts.fmt(v)));
  }
  // x: seconds or minutes before now, whichever gives a few ticks.
  const spanS = (t1 - t0) / 1000;
  const tick = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600].find(s => spanS / s <= 6) || 600;
  for (let ago = 0; ago <= spanS; ago += tick) {
    const tx = x(t1 - ago * 1000);
    root.append(svg("line", { x1: tx, x2: tx, y1: T, y2: H - B, class: "grid" }));
    const label = ago === 0 ? "now" : ago < 60 ? "−" + ago + " s" : "−" + ago / 60 + " min";
    root.append(svg("text", { x: tx, y: H - 6, "text-anchor": "middle" }, label));
  }
  for (const m of opts.extra || []) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(m.value), y2: y(m.value), class: m.cls }));
    root.append(svg("text", { x: W - R - 4, y: y(m.value) - 4, "text-anchor": "end" }, m.label));
  }
  for (const s of series) {
    if (s.points.length < 2) continue;
    const d = s.points.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
    root.append(svg("path", { d, class: "line " + s.name, stroke: s.color, "data-points": s.points.length }));
  }
  const lg = svg("g", { class: "legend" });
  let lx = L;
  for (const s of series) {
    lg.append(svg("rect", { x: lx, y: 6, width: 12, height: 12, fill: s.color, rx: 2 }));
    const label = s.name + (s.last !== undefined ? " " + s.last : "");
    lg.append(svg("text", { x: lx + 16, y: 16 }, label));
    lx += 24 + label.length * 7;
  }
  root.append(lg);
}

// rates turns cumulative samples into per-second rates between samples.
function rates(samples, key) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = (samples[i].t - samples[i - 1].t) / 1000;
    if (dt > 0) out.push([samples[i].t, Math.max(0, samples[i][key] - samples[i - 1][key]) / dt]);
  }
  return out;
}

function render(st) {
  const sw = st.swarm;
  document.getElementById("peer-id").textContent = st.peer_id || "(swarm off)";
  const meta = document.getElementById("meta");
  meta.replaceChildren(el("span", {}, "state " + st.state_dir));
  for (const [k, v] of Object.entries(st.labels || {})) meta.append(el("span", {}, k + "=" + v));
  document.getElementById("updated").textContent = "updated " + new Date(st.time).toLocaleTimeString();

  const b = st.bytes, total = b.cache + b.peers + b.registry;
  for (const s of SOURCES) {
    setValue("bytes-" + s.key, b[s.key], fmtBytes(b[s.key]));
    document.getElementById("share-" + s.key).textContent = fmtPct(b[s.key], total) + " of bytes served";
  }
  const c = st.cache;
  setValue("cache-used", c.Bytes, fmtBytes(c.Bytes));
  document.getElementById("cache-quota").textContent =
    (c.Quota > 0 ? "of " + fmtBytes(c.Quota) + " quota (" + fmtPct(c.Bytes, c.Quota) + ")" : "no quota") + " · " + c.Blocks + " blocks";
  setValue("uploaded", sw ? sw.bytes_uploaded : 0, sw ? fmtBytes(sw.bytes_uploaded) : "swarm off");
  document.getElementById("uploads-active").textContent = sw ? sw.active_uploads + " uploading now · " + sw.blocks_served + " blocks served" : "";
  document.getElementById("peer-count").textContent = sw ? String(sw.peers) : "–";
  document.getElementById("peer-sub").textContent = sw ? "connected · " + st.peers.length + " in image swarms" : "swarm off";
  document.getElementById("mount-count").textContent = String(st.mounts.length);
  document.getElementById("mount-sub").textContent = st.mounts.length ? fmtBytes(st.mounts.reduce((a, m) => a + m.fs.read_bytes, 0)) + " read" : "";

  const ser = st.series;
  const now = { t: st.time, cache: b.cache, peers: b.peers, registry: b.registry, cache_used: c.Bytes, uploaded: sw ? sw.bytes_uploaded : 0 };
  const pts = ser.length && ser[ser.length - 1].t < now.t ? ser.concat([now]) : ser;
  lineChart(document.getElementById("chart-rate"), SOURCES.map(s => {
    const r = rates(pts, s.key);
    return { name: s.name, color: s.color, points: r, last: r.length ? fmtRate(r[r.length - 1][1]) : undefined };
  }), { fmt: fmtRate });
  lineChart(document.getElementById("chart-total"), SOURCES.map(s => (
    { name: s.name, color: s.color, points: pts.map(p => [p.t, p[s.key]]), last: fmtBytes(b[s.key]) }
  )), { fmt: fmtBytes });
  lineChart(document.getElementById("chart-cache"),
    [{ name: "used", color: "#2e9b57", points: pts.map(p => [p.t, p.cache_used]), last: fmtBytes(c.Bytes) }],
    { fmt: fmtBytes, extra: c.Quota > 0 ? [{ value: c.Quota, label: "quota " + fmtBytes(c.Quota), cls: "quota" }] : [] });
  const up = rates(pts, "uploaded");
  lineChart(document.getElementById("chart-upload"),
    [{ name: "uploaded", color: "#8a4fc8", points: up, last: up.length ? fmtRate(up[up.length - 1][1]) : undefined }],
    { fmt: fmtRate });

  const cap = c.Quota > 0 ? c.Quota : Math.max(c.Bytes, 1);
  document.getElementById("cache-bar-used").style.width = (100 * Math.min(c.Bytes, cap) / cap) + "%";
  document.getElementById("cache-bar-pinned").style.width = (100 * Math.min(c.PinnedBytes, cap) / cap) + "%";
  document.getElementById("cache-caption").textContent =
    fmtBytes(c.Bytes) + (c.Quota > 0 ? " of " + fmtBytes(c.Quota) : ", no quota") + " · pinned " + fmtBytes(c.PinnedBytes);

  renderImages(st.mounts);
  renderPeers(st.peers, !!sw);
  renderPulls(st.mirror_pulls || []);
}

function renderPulls(pulls) {
  const body = document.querySelector("#pulls tbody");
  body.replaceChildren();
  if (!pulls.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "no blob pulled with other nodes lately")));
  for (const p of pulls) {
    const got = p.from_peers + p.from_upstream;
    const mix = el("div", { class: "mix" });
    for (const [cls, v] of [["peers", p.from_peers], ["registry", p.from_upstream]]) {
      if (v <= 0) continue;
      const seg = el("div", { class: cls, title: cls + " " + fmtBytes(v) });
      seg.style.width = (100 * v / got) + "%";
      mix.append(seg);
    }
    const mixLabel = el("div", { class: "mixlabel" }, "peers " + fmtBytes(p.from_peers) + " · upstream " + fmtBytes(p.from_upstream));
    const state = p.error ? "failed: " + p.error : p.ended ? "done in " + fmtDuration((p.ended - p.started) / 1000) : "in progress";
    body.append(el("tr", {},
      el("td", { class: "ref", title: p.digest || "private" }, p.digest ? shortID(p.digest) : "(private)"),
      el("td", { class: "num" }, fmtBytes(p.size)),
      el("td", { class: "num" }, p.done + " / " + p.ranges),
      el("td", {}, mix, mixLabel),
      el("td", { class: p.error ? "bad" : "" }, state)));
  }
}

function renderImages(mounts) {
  const body = document.querySelector("#images tbody");
  body.replaceChildren();
  if (!mounts.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "no images mounted")));
  for (const m of mounts) {
    const f = m.fetch, got = f.bytes_from_cache + f.bytes_from_peers + f.bytes_from_registry;
    const mix = el("div", { class: "mix" });
    for (const [cls, v] of [["cache", f.bytes_from_cache], ["peers", f.bytes_from_peers], ["registry", f.bytes_from_registry]]) {
      if (v <= 0) continue;
      // Through the CSSOM: the page's CSP forbids style attributes.
      const seg = el("div", { class: cls, title: cls + " " + fmtBytes(v) });
      seg.style.width = (100 * v / got) + "%";
      mix.append(seg);
    }
    const mixLabel = el("div", { class: "mixlabel" },
      "cache " + fmtBytes(f.bytes_from_cache) + " · peers " + fmtBytes(f.bytes_from_peers) + " · registry " + fmtBytes(f.bytes_from_registry));
    const tr = el("tr", { "data-ref": m.source },
      el("td", { class: "ref", title: m.ref }, m.source),
      el("td", { class: "ref" }, m.private ? "(hidden)" : m.dir),
      el("td", { class: "num" }, fmtBytes(m.image_bytes)),
      el("td", { class: "num", "data-value": m.fs.read_bytes }, fmtBytes(m.fs.read_bytes)),
      el("td", {}, mix, mixLabel),
      el("td", { class: "num", "data-value": f.bytes_from_registry }, fmtBytes(f.bytes_from_registry)),
      el("td", { class: "num" }, fmtDuration(m.up_seconds)));
    body.append(tr);
  }
}

function renderPeers(peers, swarmOn) {
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  if (!peers.length) {
    body.append(el("tr", {}, el("td", { colspan: 8, class: "empty" }, swarmOn ? "no peers for the mounted images yet" : "the swarm is off: registry only")));
  }
  for (const p of peers) {
    const state = p.avoided ? "avoided (bad blocks)" : p.busy ? "busy" : "ok";
    body.append(el("tr", { "data-peer": p.id },
      el("td", { class: "ref", title: p.id }, shortID(p.id)),
      el("td", {}, p.zone || "–"),
      el("td", {}, p.rack || "–"),
      el("td", { class: "num" }, p.latency_ms > 0 ? p.latency_ms.toFixed(1) + " ms" : "–"),
      el("td", { class: "num" }, String(p.blocks_received)),
      el("td", { class: "num", "data-value": p.bytes_sent }, fmtBytes(p.bytes_sent)),
      el("td", { class: "num" }, String(p.in_flight)),
      el("td", { class: p.avoided ? "bad" : "" }, state)));
  }
}

async function poll() {
  try {
    const r = await fetch("api/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    document.body.dataset.state = "live";
  } catch (e) {
    document.getElementById("updated").textContent = "daemon unreachable: " + e.message;
    document.body.dataset.state = "error";
  }
  setTimeout(poll, 1000);
}
poll();
