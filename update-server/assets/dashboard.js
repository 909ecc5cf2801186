// twinroot rollout dashboard: a small script over the JSON API, charts drawn as SVG.
// No build step, no dependencies. The token lives in sessionStorage and goes out as a bearer.
"use strict";

// Open pages re-read their JSON when the server's event stream says something changed; while the
// stream is down they poll instead.
const POLL_MS = 3000;
const RECONNECT_MS = 5000;
const COLORS = ["#2f5fb3", "#2a8a4a", "#c98a12", "#8e44ad", "#16a2b8", "#d35400", "#7f8c8d", "#c0392b"];
const STATUS_COLORS = {
  granted: "#7f8c8d", downloading: "#16a2b8", downloaded: "#2f5fb3", installed: "#8e44ad",
  complete: "#2a8a4a", deferred: "#c98a12", error: "#c8352c", rolled_back: "#7b1d17", idle: "#b9c2cc",
};
const STATUS_LABELS = {
  granted: "granted (checking)", downloading: "downloading", downloaded: "downloaded",
  installed: "installed (rebooting)", complete: "healthy", error: "failed", rolled_back: "rolled back",
  deferred: "deferred", idle: "idle",
};

const main = document.getElementById("main");
let role = null;
let timer = null;
let rendering = false;
let renderAgain = false;
let live = false;
let retry = null;

function token() { return sessionStorage.getItem("twinroot-token"); }

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let v; try { v = JSON.parse(text); } catch (_) { v = { error: text }; }
  if (r.status === 401) { sessionStorage.removeItem("twinroot-token"); role = null; }
  if (!r.ok) throw new Error((v && v.error) || ("HTTP " + r.status));
  return v;
}

function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function pct(x) { return x == null ? "–" : (Math.round(x * 10) / 10).toFixed(1) + "%"; }
function when(t) { return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z"; }
function hash() { return location.hash || "#/"; }
function route() {
  const h = hash().slice(1);
  const [path, qs] = h.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(qs || "") };
}

// ---- confirmation ----------------------------------------------------------------------------

function confirmAction(text, withReason) {
  const d = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-reason-label").hidden = !withReason;
  document.getElementById("confirm-reason").value = "";
  return new Promise(resolve => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok" ? (document.getElementById("confirm-reason").value || null) ?? "" : false), { once: true });
    d.returnValue = "";
    d.showModal();
  });
}

// ---- SVG charts ------------------------------------------------------------------------------

const W = 560, H = 200, PL = 40, PR = 10, PT = 10, PB = 22;

function axisLabel(t, step) {
  const d = new Date(t * 1000).toISOString();
  return step >= 86400 ? d.slice(5, 10) : d.slice(11, 16);
}

function frame(buckets, step, ymax, yfmt) {
  let s = "";
  const ticks = ymax <= 5 && Number.isInteger(ymax) ? Math.max(1, ymax) : (ymax % 4 === 0 && ymax % 5 !== 0 ? 4 : 5);
  for (let i = 0; i <= ticks; i++) {
    const y = PT + (H - PT - PB) * (1 - i / ticks);
    s += `<line x1="${PL}" x2="${W - PR}" y1="${y}" y2="${y}" stroke="#eceff2"/>`;
    s += `<text x="${PL - 4}" y="${y + 3}" text-anchor="end">${esc(yfmt(ymax * i / ticks))}</text>`;
  }
  const n = buckets.length, every = Math.max(1, Math.ceil(n / 8));
  for (let i = 0; i < n; i += every) {
    s += `<text x="${xAt(i, n) + bw(n) / 2}" y="${H - 6}" text-anchor="middle">${esc(axisLabel(buckets[i], step))}</text>`;
  }
  return s;
}
function bw(n) { return (W - PL - PR) / Math.max(n, 1); }
function xAt(i, n) { return PL + i * bw(n); }
function yAt(v, ymax) { return PT + (H - PT - PB) * (1 - (ymax ? v / ymax : 0)); }
function nice(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v))), f = v / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}
function legend(items) {
  return `<div class="legend">${items.map(([c, l]) => `<span><i style="background:${c}"></i>${esc(l)}</span>`).join("")}</div>`;
}
function svg(id, body, title) {
  return `<svg id="${id}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">${body}</svg>`;
}

// The frame of a stacked chart: its scale fits the highest total of a bucket.
function stackFrame(buckets, step, lines) {
  const tot = buckets.map((_, i) => lines.reduce((a, l) => a + l[1][i], 0));
  const ymax = nice(Math.max(1, ...tot));
  return { ymax, body: frame(buckets, step, ymax, v => Math.round(v)) };
}

// Stacked areas: lines = [[name, values, color]].
function stackedArea(id, title, buckets, step, lines) {
  const n = buckets.length;
  let { ymax, body } = stackFrame(buckets, step, lines);
  const base = new Array(n).fill(0);
  for (const [name, vals, color] of lines) {
    const top = base.map((b, i) => b + vals[i]);
    const pts = [];
    for (let i = 0; i < n; i++) pts.push(`${xAt(i, n) + bw(n) / 2},${yAt(top[i], ymax)}`);
    for (let i = n - 1; i >= 0; i--) pts.push(`${xAt(i, n) + bw(n) / 2},${yAt(base[i], ymax)}`);
    body += `<polygon points="${pts.join(" ")}" fill="${color}" fill-opacity="0.75" data-series="${esc(name)}"><title>${esc(name)}</title></polygon>`;
    for (let i = 0; i < n; i++) base[i] = top[i];
  }
  return svg(id, body, title) + legend(lines.map(([n, , c]) => [c, n]));
}

// Stacked bars per bucket.
function stackedBars(id, title, buckets, step, lines) {
  const n = buckets.length;
  let { ymax, body } = stackFrame(buckets, step, lines);
  const base = new Array(n).fill(0);
  for (const [name, vals, color] of lines) {
    for (let i = 0; i < n; i++) {
      if (!vals[i]) continue;
      const y0 = yAt(base[i], ymax), y1 = yAt(base[i] + vals[i], ymax);
      body += `<rect x="${xAt(i, n) + 1}" y="${y1}" width="${Math.max(1, bw(n) - 2)}" height="${y0 - y1}" fill="${color}" data-series="${esc(name)}" data-bucket="${buckets[i]}" data-value="${vals[i]}"><title>${esc(name)}: ${vals[i]}</title></rect>`;
      base[i] += vals[i];
    }
  }
  return svg(id, body, title) + legend(lines.map(([n, , c]) => [c, n]));
}

// Lines on a 0-100% scale; a line may be dashed; null values break it.
function percentLines(id, title, buckets, step, lines, ymaxIn) {
  const n = buckets.length;
  const ymax = ymaxIn || 100;
  let body = frame(buckets, step, ymax, v => Math.round(v) + "%");
  for (const [name, vals, color, dashed] of lines) {
    let d = "", pen = false;
    for (let i = 0; i < n; i++) {
      if (vals[i] == null) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${xAt(i, n) + bw(n) / 2},${yAt(Math.min(vals[i], ymax), ymax)} `;
      pen = true;
    }
    body += `<path d="${d}" fill="none" stroke="${color}" stroke-width="2" ${dashed ? 'stroke-dasharray="5 4"' : ""} data-series="${esc(name)}"><title>${esc(name)}</title></path>`;
  }
  return svg(id, body, title) + legend(lines.map(([n, , c]) => [c, n]));
}

// ---- pages -----------------------------------------------------------------------------------

function stateBadge(c) {
  if (c.auto_halted) return `<span class="state halted" id="state">halted</span>`;
  if (c.paused) return `<span class="state paused" id="state">paused</span>`;
  return `<span class="state rolling" id="state">rolling</span>`;
}

function versionBar(hosts, release) {
  const total = Object.values(hosts).reduce((a, b) => a + b, 0) || 1;
  const names = Object.keys(hosts).sort();
  return `<div class="bar">${names.map((v, i) => `<span title="${esc(v)}: ${hosts[v]}" style="width:${hosts[v] * 100 / total}%;background:${v === release ? "#2a8a4a" : COLORS[(i + 2) % COLORS.length]}"></span>`).join("")}</div>` +
    `<div class="legend">${names.map((v, i) => `<span><i style="background:${v === release ? "#2a8a4a" : COLORS[(i + 2) % COLORS.length]}"></i>${esc(v || "unknown")}: ${hosts[v]}</span>`).join("")}</div>`;
}

async function overviewPage() {
  const o = await api("GET", "/api/v1/dashboard/overview");
  const cards = o.channels.map(c => `
    <div class="card channel" data-channel="${esc(c.name)}">
      <h1><a href="#/channel/${encodeURIComponent(c.name)}">${esc(c.name)}</a> ${stateBadge(c)}</h1>
      <div class="muted">release ${c.release ? `<a href="#/release/${encodeURIComponent(c.release)}">${esc(c.release)}</a>` : "none"}${c.pause_reason ? " · " + esc(c.pause_reason) : ""}</div>
      <div class="figures">
        <div class="figure"><div class="n">${pct(c.current_percent)}</div><div class="l">rollout target</div></div>
        <div class="figure"><div class="n">${c.updated_hosts} / ${c.total_hosts}</div><div class="l">hosts updated</div></div>
        <div class="figure"><div class="n">${c.failures}</div><div class="l">failures (${pct(c.failure_percent)}${c.halt_threshold_percent != null ? ", halt at " + pct(c.halt_threshold_percent) : ""})</div></div>
      </div>
      ${versionBar(c.hosts, c.release)}
    </div>`).join("");
  return `<h1>Fleet</h1><div class="cards">${cards}</div>`;
}

// Reboot slots in use at the coordinator: "in use / total", or why they are not known.
function slotsFigure(r) {
  let n = "–", l = "reboot slots: no coordinator configured (serve --coordinator URL)", cls = "muted";
  if (r && r.state === "known") {
    n = `${r.in_use} / ${r.total}`;
    l = "reboot slots in use" + (r.groups.length > 1 ? " (" + r.groups.map(g => `${esc(g.group)} ${g.in_use}/${g.slots}`).join(", ") + ")" : "");
    cls = "";
  } else if (r && r.state === "unavailable") {
    n = "?";
    l = `reboot slots: coordinator unavailable (${esc(r.error)})`;
    cls = "error";
  }
  return `<div class="figure" id="slots" data-state="${esc(r ? r.state : "")}"><div class="n" id="fig-slots">${n}</div><div class="l ${cls}" id="slots-note">${l}</div></div>`;
}

async function channelPage(name, query) {
  const range = query.get("range") || "day";
  const v = await api("GET", `/api/v1/series/${encodeURIComponent(name)}?range=${encodeURIComponent(range)}`);
  const s = v.series;
  const versions = Object.keys(s.versions).sort();
  const vlines = versions.map((k, i) => [k || "unknown", s.versions[k], k === s.release ? "#2a8a4a" : COLORS[(i + 2) % COLORS.length]]);
  const statuses = Object.keys(s.statuses).sort((a, b) => Object.keys(STATUS_COLORS).indexOf(a) - Object.keys(STATUS_COLORS).indexOf(b));
  const slines = statuses.map(k => [STATUS_LABELS[k] || k, s.statuses[k], STATUS_COLORS[k] || "#999"]);
  const threshold = s.halt_threshold_percent;
  const flines = [["failure share (release, all reports)", s.failure_percent, "#c8352c", false]];
  if (threshold != null) flines.push([`auto-halt threshold ${pct(threshold)}`, s.buckets.map(() => threshold), "#7b1d17", true]);
  const fmax = nice(Math.max(threshold || 0, ...s.failure_percent.filter(x => x != null), 10) * 1.2);
  const ranges = ["hour", "day", "week", "30d"].map(r => `<button data-range="${r}" class="${r === range ? "on" : ""}" onclick="location.hash='#/channel/${encodeURIComponent(name)}?range=${r}'">${r === "hour" ? "last hour" : r === "day" ? "last day" : r === "week" ? "last week" : "30 days"}</button>`).join("");
  let admin = "";
  if (role === "admin") {
    admin = v.paused
      ? `<button id="resume" class="primary">Resume rollout</button>`
      : `<button id="pause" class="danger">Pause rollout</button>`;
  }
  const activity = v.activity.map(a => `<li data-kind="${esc(a.kind)}"><time>${when(a.at)}</time><b>${esc(a.kind.replace("rollout_", ""))}</b> ${esc(a.message)}</li>`).join("") || `<li class="muted">no activity in this range</li>`;
  const html = `
    <h1>${esc(name)} ${stateBadge(v)} <span class="muted" style="font-size:14px">release ${v.release ? `<a href="#/release/${encodeURIComponent(v.release)}">${esc(v.release)}</a>` : "none"}</span></h1>
    ${v.pause_reason ? `<p id="pause-reason" class="${v.auto_halted ? "error" : "muted"}">${esc(v.pause_reason)}</p>` : ""}
    <div class="figures">
      <div class="figure"><div class="n" id="fig-updated">${v.updated_hosts} / ${v.total_hosts}</div><div class="l">hosts on the release</div></div>
      <div class="figure"><div class="n" id="fig-actual">${pct(v.total_hosts ? v.updated_hosts * 100 / v.total_hosts : 0)}</div><div class="l">actual share updated</div></div>
      <div class="figure"><div class="n" id="fig-target">${pct(v.current_percent)}</div><div class="l">target of the ramp</div></div>
      <div class="figure"><div class="n" id="fig-failure">${pct(v.halt_failure_percent)}</div><div class="l">failures ${v.halt_failures} of ${v.halt_reports} reports</div></div>
      ${slotsFigure(v.reboot_slots)}
      <div class="figure"><div class="n" id="fig-threshold">${threshold == null ? "none" : pct(threshold)}</div><div class="l">auto-halt threshold${v.halt_min_reports != null ? ` (min ${v.halt_min_reports} reports)` : ""}</div></div>
    </div>
    <div class="toolbar"><span class="ranges">${ranges}</span><span style="flex:1"></span>${admin}</div>
    ${versionBar(v.hosts, v.release)}
    <div class="charts">
      <div class="card"><h2>Hosts per version</h2>${stackedArea("chart-versions", "hosts per version", s.buckets, s.step, vlines)}</div>
      <div class="card"><h2>Status reports per ${s.step === 60 ? "minute" : s.step === 3600 ? "hour" : "day"}</h2>${stackedBars("chart-statuses", "status over time", s.buckets, s.step, slines)}</div>
      <div class="card"><h2>Ramp target vs actual share updated</h2>${percentLines("chart-ramp", "ramp", s.buckets, s.step, [["target %", s.target_percent, "#2f5fb3", true], ["actual % on " + (s.release || "release"), s.actual_percent, "#2a8a4a", false]])}</div>
      <div class="card"><h2>Failure share vs automatic halt</h2>${percentLines("chart-failures", "failures", s.buckets, s.step, flines, fmax)}</div>
    </div>
    <div class="card"><h2>Activity</h2><ul class="feed" id="activity">${activity}</ul></div>
    <p class="muted">Updated ${when(s.to)} · <span id="live-mode">${live ? "live" : `refreshes every ${POLL_MS / 1000} s`}</span></p>`;
  const after = () => {
    const p = document.getElementById("pause"), r = document.getElementById("resume");
    if (p) p.onclick = async () => {
      const reason = await confirmAction(`Pause the rollout of ${v.release || "the release"} on ${name}? No further host will be granted it until it is resumed.`, true);
      if (reason === false) return;
      await act(() => api("POST", `/api/v1/rollouts/${encodeURIComponent(name)}/pause`, reason ? { reason } : {}));
    };
    if (r) r.onclick = async () => {
      if (await confirmAction(`Resume the rollout on ${name}? Failure counting starts afresh.`, false) === false) return;
      await act(() => api("POST", `/api/v1/rollouts/${encodeURIComponent(name)}/resume`, {}));
    };
  };
  return [html, after];
}

async function act(f) {
  try { await f(); } catch (e) { alert(e.message); }
  await render();
}

async function releasePage(version) {
  const [r, channels] = await Promise.all([
    api("GET", `/api/v1/dashboard/releases/${encodeURIComponent(version)}`),
    api("GET", "/api/v1/channels"),
  ]);
  const rel = r.release;
  const promos = r.promotions.map(p => `<tr><td>${when(p.at)}</td><td><a href="#/channel/${encodeURIComponent(p.channel)}">${esc(p.channel)}</a></td><td>${p.forced ? "forced" : ""}</td></tr>`).join("") || `<tr><td colspan="3" class="muted">never promoted</td></tr>`;
  const hosts = Object.entries(r.hosts_per_channel).map(([c, n]) => `${esc(c)}: ${n}`).join(", ") || "none";
  let admin = "";
  if (role === "admin") {
    admin = `<div class="toolbar">Promote to <select id="promote-channel">${channels.map(c => `<option>${esc(c.name)}</option>`).join("")}</select>
      <label><input type="checkbox" id="promote-force"> force (skip order)</label>
      <button id="promote" class="primary">Promote</button></div>`;
  }
  const html = `<h1>Release ${esc(rel.version)}</h1>
    <div class="figures">
      <div class="figure"><div class="n">${esc(rel.channels.join(", ") || "none")}</div><div class="l">serving channels</div></div>
      <div class="figure"><div class="n">${(rel.size / 1048576).toFixed(1)} MiB</div><div class="l">size</div></div>
      <div class="figure"><div class="n">${hosts}</div><div class="l">hosts on it</div></div>
    </div>
    <p class="muted">sha256 ${esc(rel.sha256)} · uploaded ${when(rel.uploaded_at)}</p>
    ${admin}
    <div class="card"><h2>Promotion history</h2><table><tr><th>when</th><th>channel</th><th></th></tr>${promos}</table></div>
    <div class="card"><h2>Activity</h2><ul class="feed">${r.activity.map(a => `<li><time>${when(a.at)}</time>${esc(a.message)}</li>`).join("")}</ul></div>`;
  const after = () => {
    const b = document.getElementById("promote");
    if (b) b.onclick = async () => {
      const ch = document.getElementById("promote-channel").value;
      const force = document.getElementById("promote-force").checked;
      if (await confirmAction(`Promote ${rel.version} to ${ch}${force ? " (forced)" : ""}?`, false) === false) return;
      await act(() => api("POST", `/api/v1/releases/${encodeURIComponent(rel.version)}/promote`, { channel: ch, force }));
    };
  };
  return [html, after];
}

async function hostPage(id) {
  const [found, hist] = await Promise.all([
    api("GET", `/api/v1/dashboard/instances?q=${encodeURIComponent(id)}&limit=5`),
    api("GET", `/api/v1/instances/${encodeURIComponent(id)}/history`),
  ]);
  const h = found.rows.find(r => r.machine_id === id);
  const rows = hist.slice().reverse().map(e => `<tr><td>${when(e.at)}</td><td>${esc(STATUS_LABELS[e.status] || e.status)}</td><td>${esc(e.version)}</td><td>${esc(e.target_version)}</td><td>${e.event_type ?? ""}</td><td>${e.event_result ?? ""}</td><td>${e.error_code ?? ""}</td></tr>`).join("");
  return `<h1>Host ${esc(id)}</h1>
    ${h ? `<div class="figures">
      <div class="figure"><div class="n">${esc(h.version)}</div><div class="l">version</div></div>
      <div class="figure"><div class="n">${esc(STATUS_LABELS[h.status] || h.status)}</div><div class="l">status</div></div>
      <div class="figure"><div class="n"><a href="#/channel/${encodeURIComponent(h.channel)}">${esc(h.channel)}</a>${h.group ? " / " + esc(h.group) : ""}</div><div class="l">channel / group</div></div>
      <div class="figure"><div class="n">${when(h.last_seen)}</div><div class="l">last seen</div></div></div>` : `<p class="error">no such host</p>`}
    <div class="card"><h2>Event history</h2><table><tr><th>when</th><th>status</th><th>version</th><th>target</th><th>event</th><th>result</th><th>error</th></tr>${rows}</table></div>`;
}

async function instancesPage(query) {
  const p = new URLSearchParams();
  for (const k of ["q", "channel", "version", "status", "offset"]) if (query.get(k)) p.set(k, query.get(k));
  p.set("limit", "100");
  const r = await api("GET", "/api/v1/dashboard/instances?" + p);
  const val = k => esc(query.get(k) || "");
  const rows = r.rows.map(i => `<tr><td><a href="#/host/${encodeURIComponent(i.machine_id)}">${esc(i.machine_id)}</a></td><td>${esc(i.channel)}${i.group ? " / " + esc(i.group) : ""}</td><td>${esc(i.version)}</td><td>${esc(STATUS_LABELS[i.status] || i.status)}</td><td>${esc(i.target_version)}</td><td>${i.error_code ?? ""}</td><td>${when(i.last_seen)}</td></tr>`).join("");
  const off = Number(query.get("offset") || 0);
  const page = d => { const q = new URLSearchParams(query); q.set("offset", String(Math.max(0, off + d))); return "#/instances?" + q; };
  const html = `<h1>Instances <span class="muted" id="instances-total">${r.total}${r.total_capped ? "+" : ""}</span></h1>
    <form class="toolbar" id="filters">
      <input name="q" placeholder="machine id contains…" value="${val("q")}">
      <input name="channel" placeholder="channel" value="${val("channel")}" size="8">
      <input name="version" placeholder="version" value="${val("version")}" size="8">
      <select name="status"><option value="">any status</option>${Object.keys(STATUS_LABELS).map(s => `<option value="${s}" ${query.get("status") === s ? "selected" : ""}>${esc(STATUS_LABELS[s])}</option>`).join("")}</select>
      <button class="primary">Search</button>
    </form>
    <table><tr><th>machine id</th><th>channel</th><th>version</th><th>status</th><th>target</th><th>error</th><th>last seen</th></tr>${rows}</table>
    <p>${off > 0 ? `<a href="${page(-100)}">← previous</a> ` : ""}${off + 100 < r.total ? `<a href="${page(100)}">next →</a>` : ""}</p>`;
  const after = () => {
    document.getElementById("filters").onsubmit = e => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [k, v] of new FormData(e.target)) if (v) q.set(k, v);
      location.hash = "#/instances?" + q;
    };
  };
  return [html, after, true];
}

function loginPage(err) {
  main.innerHTML = `<div class="card login"><h1>Log in</h1>
    <p class="muted">Paste a viewer or admin token (<code>update-server token create</code>). It is kept in this browser tab only.</p>
    <form id="login"><input id="token" type="password" autocomplete="off" placeholder="trt_…"><button class="primary">Log in</button></form>
    ${err ? `<p class="error">${esc(err)}</p>` : ""}</div>`;
  document.getElementById("login").onsubmit = async e => {
    e.preventDefault();
    sessionStorage.setItem("twinroot-token", document.getElementById("token").value.trim());
    try { await whoami(); render(); if (retry) listen(); } catch (x) { sessionStorage.removeItem("twinroot-token"); loginPage(x.message); }
  };
}

async function whoami() {
  const w = await api("GET", "/api/v1/dashboard/whoami");
  role = w.role;
  document.getElementById("who").textContent = role;
  document.getElementById("logout").hidden = false;
}

let formPage = false;

async function render() {
  if (rendering) { renderAgain = true; return; }
  if (!token()) { loginPage(); return; }
  if (document.getElementById("confirm").open) return;
  rendering = true;
  try {
    if (!role) await whoami();
    const { parts, query } = route();
    let out;
    if (parts[0] === "channel" && parts[1]) out = await channelPage(parts[1], query);
    else if (parts[0] === "release" && parts[1]) out = await releasePage(parts[1]);
    else if (parts[0] === "host" && parts[1]) out = [await hostPage(parts[1])];
    else if (parts[0] === "instances") out = await instancesPage(query);
    else out = [await overviewPage()];
    if (!Array.isArray(out)) out = [out];
    // Do not wipe a filter form the user is typing in.
    if (out[2] && formPage && document.activeElement && document.activeElement.form) return;
    formPage = !!out[2];
    main.innerHTML = out[0];
    if (out[1]) out[1]();
    main.dataset.loaded = hash();
  } catch (e) {
    if (!token()) loginPage(e.message);
    else main.innerHTML = `<p class="error" id="load-error">${esc(e.message)}</p>`;
  } finally {
    rendering = false;
    if (renderAgain) { renderAgain = false; render(); }
  }
}

// ---- live updates ------------------------------------------------------------------------------

// The event stream (GET /api/v1/dashboard/events) read with fetch, which can send the bearer token
// (EventSource cannot). Each "change" event re-renders the page from fresh JSON.
function setLive(on) {
  live = on;
  document.body.dataset.live = on ? "sse" : "polling";
  const m = document.getElementById("live-mode");
  if (m) m.textContent = on ? "live" : `refreshes every ${POLL_MS / 1000} s`;
}

async function listen() {
  clearTimeout(retry);
  retry = null;
  try {
    if (!token()) throw new Error("not logged in");
    const r = await fetch("/api/v1/dashboard/events", { headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" } });
    if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
    setLive(true);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const name = (block.match(/^event: ?(.*)$/m) || [])[1];
        if (name === "change") {
          document.body.dataset.liveEvents = String(Number(document.body.dataset.liveEvents || 0) + 1);
          render();
        }
      }
    }
  } catch (_) {
    // Fall through: poll until the stream is back.
  }
  setLive(false);
  retry = setTimeout(listen, RECONNECT_MS);
}

document.getElementById("logout").onclick = () => {
  sessionStorage.removeItem("twinroot-token");
  role = null;
  document.getElementById("who").textContent = "";
  document.getElementById("logout").hidden = true;
  loginPage();
};
window.addEventListener("hashchange", () => { main.dataset.loaded = ""; render(); });
render();
listen();
timer = setInterval(() => { if (!live) render(); }, POLL_MS);
