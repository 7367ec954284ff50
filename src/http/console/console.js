// callvault console (PROTOCOL 8): listings from the admin API, live changes from the
// /v1/events stream, and a player for stores that are still arriving.
//
// The admin token comes from the URL fragment (#token=..., which browsers never send to a
// server) or the form, and is kept in sessionStorage. It travels only in Authorization
// headers: EventSource cannot set headers, so the event stream is read with fetch().
//
// Player: the raw media (G.711 payload bytes) is fetched with the token and decoded here,
// 8-bit mu-law/A-law to float, then queued on a WebAudio clock as bytes arrive. That plays a
// store while it is still receiving (the raw download follows the live tail), needs no
// token in a URL (an <audio src> could not send the admin header) and no server-side
// transcoding.
//
// Shares: the share list (GET /v1/shares) and each share's index (GET /v1/index/{id}, the
// server and every announced peer with the bitfield of pieces it holds) are polled every
// 2 s (shares raise no events); each holder gets a row with its piece map.
"use strict";

const state = { calls: new Map(), registrations: new Map(), stores: new Map() };
let token = "";

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

async function api(method, path) {
  const r = await fetch(path, { method, headers: { Authorization: "Bearer " + token } });
  if (!r.ok && r.status !== 204) throw new Error(method + " " + path + ": " + r.status);
  return r.status === 204 ? null : r.json();
}

function setStatus(s) { document.getElementById("status").textContent = s; }

// ---------------------------------------------------------------------------------------
// Rendering

function legCell(l) {
  const rtp = l.rtp
    ? `rtp :${l.rtp.local_port} ⇄ ${l.rtp.remote || "?"} in ${l.rtp.packets_in} out ${l.rtp.packets_out}`
    : "no media";
  return el("td", {}, el("code", {}, l.call_id), el("br"), l.remote, el("br"),
    el("span", { class: "rtp", "data-in": l.rtp ? l.rtp.packets_in : 0 }, rtp));
}

function renderCalls() {
  const body = document.getElementById("calls");
  body.replaceChildren();
  for (const c of [...state.calls.values()].sort((a, b) => Number(b.id) - Number(a.id))) {
    const end = el("button", { class: "end", onclick: () => endCall(c.id) }, "End call");
    body.append(el("tr", { "data-call": c.id },
      el("td", {}, c.id), el("td", { class: "state" }, c.state),
      el("td", {}, c.from, " → ", c.to), legCell(c.legs.a), legCell(c.legs.b),
      el("td", {}, c.stores.join(" ")), el("td", {}, end)));
  }
}

function renderRegistrations() {
  const body = document.getElementById("registrations");
  body.replaceChildren();
  for (const r of state.registrations.values()) {
    body.append(el("tr", { "data-aor": r.aor },
      el("td", {}, r.aor), el("td", {}, el("code", {}, r.contact)),
      el("td", {}, r.transport + ":" + r.source), el("td", {}, r.expires_at)));
  }
}

function pct(n, of) { return of > 0 ? Math.min(100, (100 * n) / of) : 0; }

function renderStores() {
  const body = document.getElementById("stores");
  body.replaceChildren();
  const list = [...state.stores.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  for (const s of list.slice(0, 50)) {
    const full = s.declared_bytes || s.threshold_bytes || s.received_bytes || 1;
    const bar = el("div", { class: "bar", title: `${s.received_bytes} of ${full}` },
      el("div", { class: "received", style: `width:${pct(s.received_bytes, full).toFixed(2)}%` }));
    if (s.threshold_bytes != null) {
      bar.append(el("div", { class: "threshold", style: `left:${pct(s.threshold_bytes, full).toFixed(2)}%` }));
    }
    const playButton = el("button", { class: "play", onclick: () => play(s) }, "Play");
    body.append(el("tr", { "data-store": s.store_id },
      el("td", {}, el("code", {}, s.store_id)), el("td", { class: "state" }, s.state + (s.ready ? " (ready)" : "")),
      el("td", {}, s.sender, " → ", s.receiver), el("td", {}, bar),
      el("td", { class: "bytes" }, `${s.received_bytes} / ${s.threshold_bytes ?? "–"} / ${s.declared_bytes ?? "–"}`),
      el("td", {}, playButton)));
  }
}

// Piece i of a bitfield (base64, most significant bit first, PROTOCOL 5).
function bits(b64, n) {
  const raw = atob(b64 || "");
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = ((raw.charCodeAt(i >> 3) >> (7 - (i & 7))) & 1) === 1;
  return out;
}

// Most pieces drawn per holder; a bigger share shows its first ones and the count.
const MAX_CELLS = 4096;

function holderRow(h, pieces) {
  const have = bits(h.have, pieces);
  const held = [];
  have.forEach((x, i) => { if (x) held.push(i); });
  const map = el("div", { class: "pieces" });
  for (let i = 0; i < Math.min(pieces, MAX_CELLS); i++) {
    map.append(el("span", { class: have[i] ? "piece have" : "piece", title: "piece " + i }));
  }
  return el("tr", { "data-holder": h.peer_id, "data-have": held.join(",") },
    el("td", {}, el("code", {}, h.peer_id)), el("td", {}, h.class), el("td", {}, h.address),
    el("td", { class: "count" }, `${held.length} / ${pieces}`), el("td", {}, map));
}

function renderShares(list) {
  const box = document.getElementById("shares");
  box.replaceChildren();
  if (list.length === 0) box.append(el("p", { class: "muted" }, "no shares"));
  for (const { share, index, error } of list) {
    const head = el("h3", {}, `${share.owner} / ${share.name} `,
      el("span", { class: "muted" }, `${share.size} bytes, ${share.pieces} pieces of ${share.piece_size}`));
    const body = index
      ? el("table", { class: "holders" }, ...index.holders.map((h) => holderRow(h, index.pieces)))
      : el("p", { class: "muted" }, "index: " + error);
    box.append(el("div", { class: "share", "data-share": share.content_id }, head, body));
  }
}

async function pollShares() {
  for (;;) {
    try {
      const shares = await api("GET", "/v1/shares?limit=20");
      renderShares(await Promise.all(shares.map(async (share) => {
        try { return { share, index: await api("GET", "/v1/index/" + encodeURIComponent(share.content_id)) }; }
        catch (e) { return { share, error: e.message }; }
      })));
    } catch (e) {
      document.getElementById("shares").textContent = "Shares: " + e.message;
    }
    await new Promise((res) => setTimeout(res, 2000));
  }
}

function renderAll() { renderCalls(); renderRegistrations(); renderStores(); }

// ---------------------------------------------------------------------------------------
// Actions

async function endCall(id) {
  try { await api("DELETE", "/v1/calls/" + encodeURIComponent(id)); }
  catch (e) { setStatus(String(e)); }
}

// ---------------------------------------------------------------------------------------
// G.711 player

function ulaw(b) {
  b = ~b & 0xff;
  const t = (((b & 0x0f) << 3) + 0x84) << ((b & 0x70) >> 4);
  return ((b & 0x80) ? 0x84 - t : t - 0x84) / 32768;
}
function alaw(b) {
  b ^= 0x55;
  let t = (b & 0x0f) << 4;
  const seg = (b & 0x70) >> 4;
  if (seg === 0) t += 8; else if (seg === 1) t += 0x108; else t = (t + 0x108) << (seg - 1);
  return ((b & 0x80) ? t : -t) / 32768;
}

// State for tests and the status line: the clock, bytes decoded, seconds queued.
window.cvPlayer = { ctx: null, decoded: 0, queued: 0, store: null, done: false };

async function play(s) {
  const p = window.cvPlayer;
  if (!p.ctx) p.ctx = new AudioContext({ sampleRate: 8000 });
  await p.ctx.resume();
  Object.assign(p, { decoded: 0, queued: 0, store: s.store_id, done: false });
  const decode = /pcma|alaw/i.test(s.format || "") ? alaw : ulaw;
  const table = new Float32Array(256).map((_, i) => decode(i));
  let at = p.ctx.currentTime + 0.2;
  const r = await fetch(`/v1/stores/${encodeURIComponent(s.store_id)}/media?format=raw`,
    { headers: { Authorization: "Bearer " + token } });
  if (!r.ok) { document.getElementById("player").textContent = "Player: " + r.status; return; }
  const reader = r.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (p.store !== s.store_id) { reader.cancel(); return; } // another store was picked
    const buf = p.ctx.createBuffer(1, value.length, 8000);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < value.length; i++) ch[i] = table[value[i]];
    const src = p.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(p.ctx.destination);
    at = Math.max(at, p.ctx.currentTime + 0.05);
    src.start(at);
    at += buf.duration;
    p.decoded += value.length;
    p.queued = at;
    document.getElementById("player").textContent =
      `Player: ${s.store_id} ${p.decoded} bytes, at ${p.ctx.currentTime.toFixed(1)} s of ${at.toFixed(1)} s`;
  }
  p.done = true;
}

// ---------------------------------------------------------------------------------------
// Live events

function apply(name, v) {
  if (name === "call") {
    if (v.state === "ended") state.calls.delete(v.id); else state.calls.set(v.id, v);
    renderCalls();
  } else if (name === "registration") {
    const key = v.aor + " " + v.contact;
    if (v.expired) state.registrations.delete(key); else state.registrations.set(key, v);
    renderRegistrations();
  } else if (name === "store") {
    state.stores.set(v.store_id, v);
    renderStores();
  }
}

async function stream() {
  for (;;) {
    try {
      const r = await fetch("/v1/events", { headers: { Authorization: "Bearer " + token } });
      if (!r.ok) throw new Error("events: " + r.status);
      setStatus("live");
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let name = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (data) apply(name, JSON.parse(data));
        }
      }
    } catch (e) {
      setStatus("reconnecting (" + e.message + ")");
    }
    await new Promise((res) => setTimeout(res, 1000));
  }
}

async function start() {
  try {
    const [calls, regs, stores] = await Promise.all([
      api("GET", "/v1/calls"), api("GET", "/v1/registrations"), api("GET", "/v1/stores?limit=50"),
    ]);
    calls.forEach((c) => state.calls.set(c.id, c));
    regs.forEach((r) => state.registrations.set(r.aor + " " + r.contact, r));
    stores.forEach((s) => state.stores.set(s.store_id, Object.assign({ ready: s.threshold_at != null }, s)));
    renderAll();
  } catch (e) {
    setStatus(String(e));
    return;
  }
  pollShares();
  stream();
}

function main() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem("callvault-token", token);
    history.replaceState(null, "", location.pathname); // keep it out of the address bar
  } else {
    token = sessionStorage.getItem("callvault-token") || "";
  }
  const form = document.getElementById("login");
  if (!token) {
    form.style.display = "block";
    setStatus("token needed");
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      token = document.getElementById("token-input").value;
      sessionStorage.setItem("callvault-token", token);
      form.style.display = "none";
      start();
    });
    return;
  }
  start();
}

main();
