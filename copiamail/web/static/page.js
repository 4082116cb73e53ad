// The copiamail web page: /api/status every REFRESH_MS, drawn with DOM
// calls only. Values from job files and servers (addresses, EMAIL_ERROR) are
// text, never markup: no innerHTML anywhere.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function age(seconds) {
  if (seconds == null) return "";
  if (seconds < 60) return Math.round(seconds) + "s";
  if (seconds < 3600) return Math.round(seconds / 60) + "m";
  if (seconds < 86400) return (seconds / 3600).toFixed(1) + "h";
  return (seconds / 86400).toFixed(1) + "d";
}

// A table of rows; each cell a value or [value, attributes].
function table(headers, rows, textColumns) {
  const t = el("table");
  t.append(el("tr", {}, ...headers.map((h, i) => el("th", textColumns.includes(i) ? {class: "text"} : {}, h))));
  for (const row of rows) {
    t.append(el("tr", {}, ...row.map((cell, i) => {
      const [value, attrs] = Array.isArray(cell) ? cell : [cell, {}];
      if (textColumns.includes(i)) attrs.class = (attrs.class ? attrs.class + " " : "") + "text";
      return el("td", attrs, value);
    })));
  }
  return t;
}

function fill(id, content) {
  const box = document.getElementById(id);
  box.replaceChildren(content);
}

function none(what) {
  return el("span", {class: "empty"}, what);
}

function limitText(n) {
  if (n.limit == null) return String(n.connections);
  let text = n.connections + " / " + n.limit;
  if (n.configured != null && n.configured !== n.limit) text += " (configured " + n.configured + ")";
  return text;
}

function drawDomains(doc) {
  const nodeNames = doc.nodes.filter(n => n.alive).map(n => n.name);
  if (!doc.domains.length) return none("no job waiting, no connection open");
  const rows = doc.domains.map(d => [
    [d.domain, {"data-domain": d.domain}],
    [d.waiting, {"data-field": "waiting"}],
    [d.deferred, {"data-field": "deferred"}],
    [d.retry_later, {"data-field": "retry_later"}],
    [d.held, {"data-field": "held"}],
    [d.connections, {"data-field": "connections", "data-domain": d.domain,
                     class: d.limit != null && d.connections >= d.limit ? "full" : ""}],
    [d.limit == null ? "" : d.limit, {"data-field": "limit"}],
    ...nodeNames.map(name => d.nodes[name] ? limitText(d.nodes[name]) : ""),
  ]);
  return table(["domain", "waiting", "deferred", "retry later", "held", "connections", "limit",
                ...nodeNames.map(n => n + " (open / limit)")], rows, [0]);
}

function drawNodes(doc) {
  if (!doc.nodes.length) return none("no node has published its state");
  const box = el("div");
  box.append(table(["node", "host", "alive", "heartbeat", "workers", "connections", "sent", "failed", "retry",
                    "deferred", "sent/s"],
    doc.nodes.map(n => [
      [n.name, {"data-node": n.name}], n.host,
      [n.alive ? "yes" : "stale", {class: n.alive ? "" : "stale"}],
      age(n.heartbeat_age_seconds) + " ago", n.workers, n.connections,
      n.counters.sent || 0, n.counters.failed || 0, n.counters.retried || 0, n.counters.deferred || 0,
      n.sent_per_second == null ? "" : n.sent_per_second,
    ]), [0, 1]));
  for (const n of doc.nodes) {
    const keys = Object.entries(n.keys).sort();
    if (!keys.length) continue;
    const details = el("details", {}, el("summary", {}, n.name + ": connections per limit key"));
    details.append(table(["key", "open", "cap now", "configured"],
      keys.map(([key, k]) => [key, [k.open, {class: k.open >= k.cap ? "full" : ""}], k.cap,
                              k.configured == null ? "" : k.configured]), [0]));
    box.append(details);
  }
  return box;
}

function drawChart(points) {
  const width = 720, height = 160, pad = 30;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  const label = (x, y, text, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", y);
    t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", anchor || "start");
    t.textContent = text;
    svg.append(t);
  };
  if (points.length < 2) {
    label(pad, height / 2, "collecting: a point every 2 s");
    return svg;
  }
  const t0 = points[0].t, t1 = points[points.length - 1].t;
  const top = Math.max(1, ...points.map(p => Math.max(p.sent_per_second, p.failed_per_second)));
  const x = t => pad + (width - 2 * pad) * (t - t0) / Math.max(1, t1 - t0);
  const y = v => height - pad + -(height - 2 * pad) * v / top;
  for (const [field, colour] of [["sent_per_second", "#2a7"], ["failed_per_second", "#c33"]]) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("points", points.map(p => x(p.t).toFixed(1) + "," + y(p[field]).toFixed(1)).join(" "));
    svg.append(line);
  }
  label(pad - 4, y(top) + 4, top.toFixed(top < 10 ? 1 : 0), "end");
  label(pad - 4, y(0) + 4, "0", "end");
  label(pad, height - 8, "-" + age(t1 - t0));
  label(width - pad, height - 8, "now", "end");
  const last = points[points.length - 1];
  label(width - pad, 14, "sent " + last.sent_per_second + "/s, failed " + last.failed_per_second + "/s", "end");
  return svg;
}

function jobs(list, empty) {
  if (!list.length) return none(empty);
  return table(["job", "folder", "recipient", "age", "EMAIL_ERROR"],
    list.map(j => [j.name, j.folder, j.recipient, age(j.age_seconds), [j.error || "", {"data-field": "error"}]]),
    [0, 1, 2, 4]);
}

function drawCluster(cluster) {
  if (!cluster) return none("no cluster: every limit is this spool's nodes' own");
  if (cluster.error) return none("Redis at " + cluster.redis + " cannot be read (" + cluster.error +
                                 "); jobs under cluster-wide limits wait");
  const rows = cluster.keys.map(k => [[k.key, {"data-cluster-key": k.key}], [k.leases, {"data-leases": k.key}],
    k.cap == null ? "" : k.cap, Object.entries(k.nodes).sort().map(([n, c]) => n + " " + c).join(", ")]);
  const box = el("div", {}, el("div", {}, "Redis at " + cluster.redis +
    (cluster.quiet_seconds ? "; no new lease for " + cluster.quiet_seconds + " s (Redis lost its leases lately)" : "")));
  box.append(rows.length ? table(["key", "leases", "cap", "nodes"], rows, [0, 3]) : none("no cluster-wide limit set"));
  return box;
}

function draw(doc) {
  document.getElementById("meta").textContent =
    "spool " + doc.spool + " · " + new Date(doc.time * 1000).toLocaleString() + " · refreshes every 2 s";
  fill("chart", drawChart(doc.throughput || []));
  fill("folders", table(["folder", "jobs", "oldest"],
    doc.folders.filter(f => f.jobs || !f.folder.startsWith("TOSEND") || f.folder === "TOSEND")
      .map(f => [f.folder, [f.jobs, {"data-folder": f.folder}], age(f.oldest_age_seconds)]), [0]));
  fill("domains", drawDomains(doc));
  fill("nodes", drawNodes(doc));
  fill("holds", doc.holds.length ? el("ul", {}, ...doc.holds.map(h => el("li", {}, h))) : none("none"));
  fill("failures", jobs(doc.failures, "none"));
  fill("replies", jobs(doc.replies, "none"));
  fill("cluster", drawCluster(doc.cluster));
  fill("learned", doc.learned.length
    ? table(["key", "node", "learned", "since", "reply"],
            doc.learned.map(l => [l.key, l.node, l.learned, new Date(l.since * 1000).toLocaleString(), l.reply]),
            [0, 1, 2, 3, 4])
    : none("nothing learned"));
  document.body.setAttribute("data-updated", String(doc.time));
}

async function refresh() {
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    if (!response.ok) throw new Error("/api/status: " + response.status);
    draw(await response.json());
    document.getElementById("problem").textContent = "";
  } catch (e) {
    document.getElementById("problem").textContent = "cannot refresh: " + e.message;
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
