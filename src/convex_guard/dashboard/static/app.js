// The convex-guard dashboard: one snapshot per refresh, drawn as SVG; live over server-sent
// events, polling when they fail. Every text from the store goes in as textContent.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#4fa3f7", "#f7b84f", "#6fd08c", "#e66f7a", "#b58cf0", "#5ad1d1"];
  const ACTIONS = { allowed: "#6fd08c", challenged: "#f7b84f", blocked: "#e66f7a" };
  const REASONS = { limit: "#f7b84f", bot: "#e66f7a", key: "#b58cf0", budget: "#5ad1d1", body: "#8fd16a" };
  const POLL_MS = Math.max(100, Number(document.body.dataset.poll) || 5000);

  // The window in the address, else the one the dashboard was started with.
  const asked = new URLSearchParams(location.search).get("window");
  let windowName = /^\d{1,4}[mhd]$/.test(asked || "") ? asked : document.body.dataset.window || "1h";
  let source = null;
  let pollTimer = null;
  let generation = 0;

  const $ = (id) => document.getElementById(id);

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const decimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
  const fmt = (n) => integer.format(n);
  const fmtRate = (r) => `${decimal.format(r * 100)}%`;
  const fmtMs = (n) => `${fmt(n)} ms`;
  const fmtCost = (n) => `$${n.toFixed(n !== 0 && Math.abs(n) < 1 ? 4 : 2)}`;

  /** Draw at the box's own width, so that text keeps its size whatever the layout. */
  const widthOf = (id, fallback) => Math.max(280, Math.floor($(id).clientWidth) || fallback);

  /** Room for the longest label (about 6.5 px a character at 11 px), at most a third. */
  const labelWidth = (labels, width) =>
    Math.min(width / 3, Math.max(80, 12 + 6.5 * Math.max(...labels.map((l) => l.length))));

  function replace(id, node) {
    const box = $(id);
    box.replaceChildren(node);
  }

  function legend(id, entries) {
    const box = $(id);
    box.replaceChildren(
      ...entries.map(([name, color]) => {
        const item = document.createElement("span");
        item.textContent = name;
        item.style.setProperty("--swatch", color);
        return item;
      }),
    );
  }

  function empty(width, height) {
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}` });
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "no data"));
    return root;
  }

  /** Horizontal bars: items [{key, label, value, text, color}], scaled to `max` (or the largest). */
  function bars(id, items, max) {
    const W = widthOf(id, 560), ROW = 24, VALUE = 90;
    if (items.length === 0) return replace(id, empty(W, 60));
    const LABEL = labelWidth(items.map((i) => i.label), W);
    const top = max || Math.max(...items.map((i) => i.value)) || 1;
    const root = svg("svg", { viewBox: `0 0 ${W} ${items.length * ROW + 4}` });
    items.forEach((item, n) => {
      const y = n * ROW + 2;
      const g = svg("g", { "data-key": item.key, "data-value": item.value });
      g.append(svg("text", { x: LABEL - 8, y: y + 15, "text-anchor": "end" }, item.label));
      const width = Math.max(item.value > 0 ? 2 : 0, (item.value / top) * (W - LABEL - VALUE));
      g.append(svg("rect", { x: LABEL, y: y + 3, width, height: ROW - 8, rx: 3, fill: item.color }));
      g.append(svg("text", { x: LABEL + width + 6, y: y + 15, class: "value" }, item.text));
      root.append(g);
    });
    replace(id, root);
  }

  /** Stacked horizontal bars: groups [{key, label, parts: [{name, value, color}]}]. */
  function stacked(id, groups) {
    const W = widthOf(id, 560), ROW = 24, VALUE = 60;
    if (groups.length === 0) return replace(id, empty(W, 60));
    const LABEL = labelWidth(groups.map((g) => g.label), W);
    const totals = groups.map((g) => g.parts.reduce((s, p) => s + p.value, 0));
    const top = Math.max(...totals) || 1;
    const root = svg("svg", { viewBox: `0 0 ${W} ${groups.length * ROW + 4}` });
    groups.forEach((group, n) => {
      const y = n * ROW + 2;
      const g = svg("g", { "data-key": group.key, "data-value": totals[n] });
      g.append(svg("text", { x: LABEL - 8, y: y + 15, "text-anchor": "end" }, group.label));
      let x = LABEL;
      for (const part of group.parts) {
        const width = (part.value / top) * (W - LABEL - VALUE);
        const rect = svg("rect", { x, y: y + 3, width, height: ROW - 8, fill: part.color, "data-key": `${group.key}/${part.name}`, "data-value": part.value });
        rect.append(svg("title", {}, `${part.name}: ${fmt(part.value)}`));
        g.append(rect);
        x += width;
      }
      g.append(svg("text", { x: x + 6, y: y + 15 }, fmt(totals[n])));
      root.append(g);
    });
    replace(id, root);
  }

  /** Lines over the snapshot's buckets: series [{key, name, values, color}]. */
  function lines(id, snap, series, unit) {
    const W = widthOf(id, 960), H = 220, L = 48, R = 12, T = 10, B = 24;
    const n = series.length ? series[0].values.length : 0;
    if (n === 0) return replace(id, empty(W, H));
    const top = Math.max(1, ...series.flatMap((s) => s.values));
    const x = (i) => L + (n === 1 ? 0 : (i / (n - 1)) * (W - L - R));
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}` });
    const axis = svg("g", { class: "axis" });
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      axis.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "gridline" }));
      axis.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, decimal.format(v)));
    }
    const anchors = ["start", "middle", "end"];
    [0, Math.floor((n - 1) / 2), n - 1].forEach((i, k) => {
      const at = new Date(snap.start + i * snap.bucketMs);
      const label = snap.bucketMs >= 3600000 ? at.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit" }) : at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      axis.append(svg("text", { x: x(i), y: H - 6, "text-anchor": anchors[k] }, label));
    });
    root.append(axis);
    for (const s of series) {
      const points = s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      const total = s.values.reduce((a, b) => a + b, 0);
      const line = svg("polyline", { points, fill: "none", stroke: s.color, "stroke-width": 2, "data-key": s.key, "data-total": total });
      line.append(svg("title", {}, `${s.name}: ${decimal.format(total)} ${unit}`));
      root.append(line);
    }
    replace(id, root);
  }

  let shown = null;

  function render(snap) {
    shown = snap;
    const t = snap.totals;
    $("tile-requests").textContent = fmt(t.requests);
    $("tile-success").textContent = t.requests ? fmtRate(t.successRate) : "–";
    $("tile-p50").textContent = t.requests ? fmtMs(t.p50) : "–";
    $("tile-p95").textContent = t.requests ? fmtMs(t.p95) : "–";
    $("tile-tokens").textContent = fmt(t.tokens);
    $("tile-cost").textContent = fmtCost(t.cost);
    $("tile-auth").textContent = fmt(t.authFailures);
    $("tile-bots").textContent = fmt(t.botEvents);
    $("truncated").hidden = !snap.truncated;

    const providers = snap.providers;
    const color = (i) => COLORS[i % COLORS.length];
    const perMinute = 60000 / snap.bucketMs;
    lines(
      "chart-rpm",
      snap,
      providers.map((p, i) => ({ key: `rpm/${p.provider}`, name: p.provider, values: p.requests.map((r) => r * perMinute), color: color(i) })),
      "requests/min",
    );
    legend("legend-rpm", providers.map((p, i) => [p.provider, color(i)]));
    bars("chart-success", providers.map((p, i) => ({ key: `success/${p.provider}`, label: p.provider, value: p.successRate * 100, text: fmtRate(p.successRate), color: color(i) })), 100);
    bars(
      "chart-latency",
      providers.flatMap((p, i) => [
        { key: `p50/${p.provider}`, label: `${p.provider} p50`, value: p.p50, text: fmtMs(p.p50), color: color(i) },
        { key: `p95/${p.provider}`, label: `${p.provider} p95`, value: p.p95, text: fmtMs(p.p95), color: color(i) },
      ]),
    );
    bars("chart-tokens", providers.map((p, i) => ({ key: `tokens/${p.provider}`, label: p.provider, value: p.tokens, text: fmt(p.tokens), color: color(i) })));
    bars("chart-cost", providers.map((p, i) => ({ key: `cost/${p.provider}`, label: p.provider, value: p.cost, text: fmtCost(p.cost), color: color(i) })));
    bars("chart-refusals", Object.entries(snap.refusals).map(([reason, n]) => ({ key: `refusals/${reason}`, label: reason, value: n, text: fmt(n), color: REASONS[reason] || COLORS[0] })));
    // Absent from a server older than shadow rules.
    bars("chart-shadow", Object.entries(snap.shadowRefusals || {}).map(([reason, n]) => ({ key: `shadow/${reason}`, label: reason, value: n, text: fmt(n), color: REASONS[reason] || COLORS[0] })));

    const types = new Map();
    for (const e of snap.botEvents) {
      if (!types.has(e.type)) types.set(e.type, []);
      types.get(e.type).push({ name: e.action, value: e.count, color: ACTIONS[e.action] || COLORS[4] });
    }
    stacked("chart-bots", [...types].map(([type, parts]) => ({ key: `bots/${type}`, label: type.replace(/_/g, " "), parts })));
    legend("legend-bots", Object.entries(ACTIONS));
    lines(
      "chart-failures",
      snap,
      [
        { key: "auth-failures", name: "auth failures", values: snap.authFailures, color: "#b58cf0" },
        { key: "bot-events", name: "bot events", values: snap.botSeries, color: "#e66f7a" },
      ],
      "events",
    );
    legend("legend-failures", [["auth failures", "#b58cf0"], ["bot events", "#e66f7a"]]);
    bars("chart-keys", snap.topKeys.map((k, i) => ({ key: `keys/${k.id}`, label: `${k.name} (${k.prefix}…)`, value: k.requests, text: fmt(k.requests), color: k.active ? color(i) : "#8b98a5" })));
  }

  /** The bot list: one row per event, each text put in as textContent; a verified claim's
   * row green, a spoofed one's red. */
  function renderBots(events) {
    const rows = events.map((e) => {
      const row = document.createElement("tr");
      if (e.verification === "verified" || e.verification === "spoofed") row.className = e.verification;
      const claim = e.verification ? `${e.verification} ${e.verifiedName || ""}`.trim() : "–";
      const takenFor = `${e.category || ""} ${e.agent || ""}`.trim() || e.type;
      const cells = [new Date(e.timestamp).toLocaleTimeString(), e.action, takenFor, claim, e.ip || "–", e.userAgent || "–", e.evidence || "–"];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value;
        cell.title = value;
        row.append(cell);
      }
      return row;
    });
    $("bot-list").tBodies[0].replaceChildren(...rows);
  }

  async function refreshBots(mine) {
    try {
      const response = await fetch(`api/bots?window=${windowName}`, { credentials: "same-origin", cache: "no-store" });
      if (mine !== generation || !response.ok) return;
      renderBots((await response.json()).events);
    } catch {
      // The snapshot's status line already says when the dashboard is unreachable.
    }
  }

  function status(text, live) {
    const box = $("status");
    box.textContent = text;
    box.classList.toggle("live", Boolean(live));
  }

  const stamp = () => new Date().toLocaleTimeString();

  async function refresh(mine) {
    try {
      const response = await fetch(`api/snapshot?window=${windowName}`, { credentials: "same-origin", cache: "no-store" });
      if (mine !== generation) return;
      if (response.status === 401) {
        status("unauthorized: open the address the dashboard printed");
        return false;
      }
      if (!response.ok) {
        status(`store unavailable (${response.status}); retrying`);
        return true;
      }
      render(await response.json());
      refreshBots(mine);
      status(`updated ${stamp()}${source === null ? ", polling" : ""}`, source !== null);
    } catch {
      if (mine === generation) status("dashboard unreachable; retrying");
    }
    return true;
  }

  function poll(mine) {
    if (source !== null) {
      source.close();
      source = null;
    }
    clearInterval(pollTimer);
    pollTimer = setInterval(() => refresh(mine), POLL_MS);
  }

  function follow(mine) {
    if (typeof EventSource === "undefined") return poll(mine);
    source = new EventSource(`api/events?window=${windowName}`);
    source.addEventListener("snapshot", (event) => {
      if (mine !== generation) return;
      render(JSON.parse(event.data));
      refreshBots(mine);
      status(`live, updated ${stamp()}`, true);
    });
    const fallBack = () => {
      if (mine !== generation) return;
      poll(mine);
      status(`live updates failed; polling every ${POLL_MS / 1000} s`);
    };
    source.addEventListener("unavailable", fallBack);
    source.onerror = fallBack;
  }

  async function start() {
    generation += 1;
    const mine = generation;
    if (source !== null) source.close();
    source = null;
    clearInterval(pollTimer);
    for (const button of document.querySelectorAll("#windows button")) {
      button.classList.toggle("active", button.dataset.window === windowName);
    }
    if (await refresh(mine)) follow(mine);
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const button of document.querySelectorAll("#windows button")) {
      button.addEventListener("click", () => {
        windowName = button.dataset.window;
        history.replaceState(null, "", `?window=${windowName}`);
        start();
      });
    }
    start();
  });
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => shown && render(shown), 150);
  });
})();
