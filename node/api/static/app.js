// peerd status page (served by node/api/status_page.py; no build step, no CDN).
//
// Rules (see node/api/status_page.py):
// - data from the API goes into the page with textContent / createElement /
//   setAttribute only, never innerHTML: a task named <script>...</script>
//   is shown as text;
// - only the node's own JSON routes are read (same origin, CSP connect-src
//   'self'); writes are POST pause/resume/run with the bearer token;
// - the token lives in this tab's sessionStorage only; without it the page
//   is read-only; a read that answers 401 hides everything and asks for it.
"use strict";

(function () {
  const REFRESH_MS = 3000;
  const TOKEN_KEY = "peerd.apiToken";
  // the task list shows details (name, zone, next fire, last run) for at
  // most this many rows, each re-read at most every DETAIL_TTL_MS
  const DETAIL_ROWS = 50;
  const DETAIL_TTL_MS = 10000;
  const RUNS_SHOWN = 50;
  const OUTPUT_TAIL = 240;
  const STATES = ["alive", "suspect", "dead", "left"];
  const STATUSES = ["pending", "running", "succeeded", "failed", "timeout", "error", "cancelled", "lost", "skipped"];

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ DOM helpers
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c);
      else td.textContent = c === null || c === undefined ? "" : String(c);
      tr.appendChild(td);
    }
    return tr;
  }

  function kv(dl, pairs) {
    clear(dl);
    for (const [k, v] of pairs) {
      dl.appendChild(el("dt", k));
      const dd = document.createElement("dd");
      if (v instanceof Node) dd.appendChild(v);
      else dd.textContent = v === null || v === undefined ? "-" : String(v);
      dl.appendChild(dd);
    }
  }

  // a class name from a fixed list only (never a value taken from the API)
  function stateClass(prefix, value, allowed) {
    return allowed.indexOf(value) >= 0 ? prefix + value : prefix + "other";
  }

  function badge(text, prefix, allowed) {
    return el("span", text, "badge " + stateClass(prefix, text, allowed));
  }

  // --------------------------------------------------------------- formats
  function ago(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
    const s = Math.abs(seconds);
    let t;
    if (s < 60) t = Math.round(s) + "s";
    else if (s < 3600) t = Math.floor(s / 60) + "m" + String(Math.round(s % 60)).padStart(2, "0") + "s";
    else if (s < 86400) t = Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    else t = Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
    return seconds >= 0 ? t + " ago" : "in " + t;
  }

  function utc(epochS) {
    if (epochS === null || epochS === undefined) return "-";
    const d = new Date(epochS * 1000);
    if (isNaN(d.getTime())) return String(epochS);
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "-";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
    return ago(s).replace(" ago", "");
  }

  function nowS() {
    return Date.now() / 1000;
  }

  const DOW = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
  const MONTHS = ["", "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December"];
  const ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
  };
  const NUM = /^[0-9]{1,2}$/;

  function pad2(x) {
    return String(x).padStart(2, "0");
  }

  function dowText(f) {
    if (f === "1-5" || f.toLowerCase() === "mon-fri") return "Monday to Friday";
    if (f === "0,6" || f === "6,0" || f.toLowerCase() === "sat,sun") return "Saturday and Sunday";
    return f.split(",").map((p) => (NUM.test(p) && +p <= 7 ? DOW[+p] : p)).join(", ");
  }

  // A human reading of a schedule: "at 02:30, Europe/Berlin", "every 5m".
  function humanSchedule(spec, tz) {
    if (typeof spec !== "string") return "";
    const zone = tz ? ", " + tz : "";
    if (spec.startsWith("@every")) return "every " + spec.slice(6).trim();
    if (spec === "now") return "once, when applied";
    if (spec.startsWith("once:")) return "once at " + spec.slice(5).replace("T", " ");
    const cron = ALIASES[spec.toLowerCase()] || spec;
    const f = cron.trim().split(/\s+/);
    if (f.length !== 5 && f.length !== 6) return spec;
    const [mi, h, dom, mon, dow] = f;
    const sec = f.length === 6 ? f[5] : "0";
    let time;
    if (NUM.test(mi) && NUM.test(h) && NUM.test(sec)) {
      time = "at " + pad2(h) + ":" + pad2(mi) + (sec !== "0" ? ":" + pad2(sec) : "");
    } else if (NUM.test(mi) && h === "*") {
      time = "every hour at minute " + mi;
    } else if (/^\*\/[0-9]+$/.test(mi) && h === "*") {
      time = "every " + mi.slice(2) + "m";
    } else if (mi === "*" && h === "*") {
      time = "every minute";
    } else if (NUM.test(mi) && /^\*\/[0-9]+$/.test(h)) {
      time = "every " + h.slice(2) + "h at minute " + mi;
    } else {
      return "cron " + spec + zone;
    }
    const days = [];
    if (dom !== "*") days.push("on day " + dom + (mon === "*" ? " of the month" : ""));
    if (mon !== "*") days.push((dom === "*" ? "in " : "of ") + mon.split(",").map((m) => (NUM.test(m) && +m >= 1 && +m <= 12 ? MONTHS[+m] : m)).join(", "));
    if (dow !== "*") days.push((dom !== "*" ? "or " : "on ") + dowText(dow));
    return time + (days.length ? " " + days.join(" ") : "") + zone;
  }

  // ------------------------------------------------------------ the API
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function setToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: the token lasts until the page is left */
    }
    memoryToken = value || "";
  }

  let memoryToken = "";

  async function call(method, path, asText) {
    const headers = {};
    const t = token() || memoryToken;
    if (t) headers["Authorization"] = "Bearer " + t;
    const r = await fetch(path, { method: method, headers: headers, cache: "no-store", credentials: "omit" });
    const body = await r.text();
    if (!r.ok) {
      let msg = body;
      try {
        msg = JSON.parse(body).error || body;
      } catch (e) {
        /* not JSON */
      }
      throw new ApiError(r.status, String(msg).slice(0, 300));
    }
    if (asText) return body;
    return JSON.parse(body);
  }

  const get = (path) => call("GET", path, false);
  const enc = encodeURIComponent;

  // ------------------------------------------------------------ /metrics
  // {family: [{labels: {...}, value: n}]} for the families asked for
  function parseMetrics(text, families) {
    const out = {};
    for (const f of families) out[f] = [];
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m || !(m[1] in out)) continue;
      const labels = {};
      const re = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
      let lm;
      while ((lm = re.exec(m[3] || "")) !== null) labels[lm[1]] = lm[2];
      out[m[1]].push({ labels: labels, value: parseFloat(m[4]) });
    }
    return out;
  }

  function byReason(samples) {
    const parts = samples.filter((s) => s.value > 0).map((s) => (s.labels.reason || "?") + " " + s.value);
    return parts.length ? parts.join(", ") : "none";
  }

  // ------------------------------------------------------------ token panel
  let pendingAction = null;

  function askToken(reason) {
    $("token-reason").textContent = reason;
    $("token-panel").hidden = false;
    $("token-input").focus();
  }

  function showAuthState() {
    const has = !!(token() || memoryToken);
    $("auth-state").textContent = has ? "token set" : "read-only (no token)";
    $("token-button").textContent = has ? "Token \u2713" : "Token";
    for (const id of ["act-pause", "act-resume", "act-run"]) $(id).title = has ? "" : "asks for the API token first";
  }

  // ------------------------------------------------------------ routing
  function route() {
    const h = location.hash || "#/";
    let m = /^#\/?task\/(.+)$/.exec(h);
    if (m) {
      let id;
      try {
        id = decodeURIComponent(m[1]);
      } catch (e) {
        id = m[1];
      }
      return { view: "task", id: id };
    }
    if (/^#\/?tasks/.test(h)) return { view: "tasks" };
    return { view: "cluster" };
  }

  function showView(name) {
    for (const v of ["cluster", "tasks", "task"]) $("view-" + v).hidden = v !== name;
    $("nav-cluster").className = name === "cluster" ? "current" : "";
    $("nav-tasks").className = name === "tasks" || name === "task" ? "current" : "";
  }

  function hideViews() {
    for (const v of ["cluster", "tasks", "task"]) $("view-" + v).hidden = true;
  }

  function showError(msg) {
    const e = $("error");
    e.textContent = msg || "";
    e.hidden = !msg;
  }

  // ------------------------------------------------------------ cluster view
  async function renderCluster() {
    const [status, members, ring, metricsText] = await Promise.all([
      get("/v1/status"), get("/v1/members"), get("/v1/ring"),
      call("GET", "/metrics", true).catch(() => ""),
    ]);
    $("node-name").textContent = status.name || "";
    document.title = "peerd " + (status.name || "");
    const m = parseMetrics(metricsText, ["peerd_gossip_awareness", "peerd_gossip_packets_rejected_total",
      "peerd_gossip_streams_rejected_total", "peerd_api_refusals_total"]);
    const aw = m.peerd_gossip_awareness.length ? m.peerd_gossip_awareness[0].value : null;
    const counts = Object.keys(status.members || {}).sort().map((k) => k + " " + status.members[k]).join(", ");
    kv($("health"), [
      ["name", status.name],
      ["gossip", status.gossip],
      ["api", status.api],
      ["incarnation", status.incarnation],
      ["members", counts || "-"],
      ["tasks", (status.tasks || 0) + " (" + (status.tasks_owned || 0) + " owned here, " + (status.runs_running || 0) + " running)"],
      ["awareness", aw === null ? "-" : aw + (aw === 0 ? " (healthy)" : " (degraded: probes slowed)")],
      ["packets rejected", byReason(m.peerd_gossip_packets_rejected_total)],
      ["streams rejected", byReason(m.peerd_gossip_streams_rejected_total)],
      ["API refusals", byReason(m.peerd_api_refusals_total)],
      ["fencing", status.fencing ? "etcd" : "off"],
      ["uptime", ago(status.uptime_s).replace(" ago", "")],
      ["version", status.version],
    ]);

    const tb = $("members").tBodies[0];
    clear(tb);
    const sorted = members.slice().sort((a, b) => String(a.name).localeCompare(String(b.name)));
    for (const mem of sorted) {
      const tags = Object.keys(mem.tags || {}).sort().map((k) => k + "=" + mem.tags[k]).join(", ");
      let api = mem.api ? document.createTextNode(mem.api) : document.createTextNode("-");
      if (mem.api && /^[A-Za-z0-9.:\[\]-]+$/.test(mem.api)) {
        api = el("a", mem.api);
        api.href = (location.protocol === "https:" ? "https://" : "http://") + mem.api + "/"; // peers share the scheme
      }
      const tr = row([mem.name, badge(mem.state, "state-", STATES), mem.incarnation, mem.addr, api, tags, mem.since]);
      tr.dataset.member = String(mem.name);
      tr.dataset.state = String(mem.state);
      tb.appendChild(tr);
    }

    const rb = $("ring").tBodies[0];
    clear(rb);
    const total = ring.tasks || 0;
    $("ring-summary").textContent = total + " tasks, " + ring.replicas + " replicas each";
    for (const r of (ring.members || []).slice().sort((a, b) => String(a.name).localeCompare(String(b.name)))) {
      const bar = document.createElement("meter");
      bar.min = 0;
      bar.max = Math.max(1, total);
      bar.value = r.owned || 0;
      bar.textContent = (r.owned || 0) + "/" + total;
      rb.appendChild(row([r.name, badge(r.state, "state-", STATES), r.eligible ? "yes" : "no", r.owned,
        r.replica_of, r.skew_ms === null || r.skew_ms === undefined ? "-" : r.skew_ms + " ms", bar]));
    }
  }

  // ------------------------------------------------------------ tasks view
  const details = new Map(); // id -> {at, task, explain, runs}
  let taskList = [];

  function lastRun(runs) {
    if (!runs || !runs.length) return null;
    return runs.slice().sort((a, b) => (a.slot - b.slot) || ((a.started || 0) - (b.started || 0)))[runs.length - 1];
  }

  async function loadDetail(id) {
    const d = details.get(id);
    if (d && Date.now() - d.at < DETAIL_TTL_MS) return d;
    const p = "/v1/tasks/" + enc(id);
    const [task, explain, runs] = await Promise.all([get(p), get(p + "/explain?n=1"), get(p + "/runs")]);
    const nd = { at: Date.now(), task: task, explain: explain, last: lastRun(runs) };
    details.set(id, nd);
    return nd;
  }

  async function loadDetails(ids) {
    const queue = ids.slice();
    const workers = [];
    for (let i = 0; i < 4; i++) {
      workers.push((async () => {
        while (queue.length) {
          const id = queue.shift();
          try {
            await loadDetail(id);
          } catch (e) {
            if (e instanceof ApiError && e.status === 401) throw e;
            /* a task deleted meanwhile: its row shows without details */
          }
        }
      })());
    }
    await Promise.all(workers);
  }

  function rowText(t) {
    const d = details.get(t.id);
    const parts = [t.id, t.schedule, t.owner || "", t.paused ? "paused" : "", t.conflict ? "conflict" : ""];
    if (d) {
      parts.push(d.task.task.name || "", humanSchedule(t.schedule, d.explain.timezone));
      if (d.last) parts.push(d.last.status || "");
    }
    return parts.join(" ").toLowerCase();
  }

  function filtered() {
    const q = $("task-filter").value.trim().toLowerCase();
    return q ? taskList.filter((t) => rowText(t).indexOf(q) >= 0) : taskList;
  }

  function drawTasks() {
    const tb = $("tasks").tBodies[0];
    clear(tb);
    const shown = filtered();
    $("task-count").textContent = "(" + shown.length + (shown.length !== taskList.length ? " of " + taskList.length : "") + ")";
    for (const t of shown) {
      const d = details.get(t.id);
      const link = el("a", t.id);
      link.href = "#task/" + enc(t.id);
      const idCell = document.createElement("span");
      idCell.appendChild(link);
      if (d && d.task.task.name && d.task.task.name !== t.id) idCell.appendChild(el("span", " " + d.task.task.name, "muted task-name"));
      const sched = document.createElement("span");
      sched.appendChild(el("code", t.schedule));
      const tz = d ? d.explain.timezone : null;
      sched.appendChild(el("span", " " + humanSchedule(t.schedule, tz), "muted"));
      let next = "-";
      if (d && d.explain.next && d.explain.next.length) {
        const n = d.explain.next[0];
        next = (n.local || n.utc || "").replace("T", " ") + " " + (n.local_zone || "") + " (" + ago(nowS() - n.fire_at) + ")";
      } else if (!d) next = "";
      let last = document.createTextNode(d ? "never" : "");
      if (d && d.last) {
        last = document.createElement("span");
        last.appendChild(badge(d.last.status, "run-", STATUSES));
        last.appendChild(el("span", " " + ago(nowS() - (d.last.finished || d.last.started || d.last.slot)) + " on " + d.last.node, "muted"));
      }
      const tr = row([idCell, sched, t.owner || "- (no eligible member)", t.paused ? badge("paused", "flag-", ["paused"]) : "no",
        next, last, t.conflict ? badge("conflict", "flag-", ["conflict"]) : ""]);
      tr.dataset.task = String(t.id);
      tb.appendChild(tr);
    }
  }

  async function renderTasks() {
    taskList = await get("/v1/tasks");
    drawTasks();
    const ids = filtered().slice(0, DETAIL_ROWS).map((t) => t.id);
    await loadDetails(ids);
    drawTasks();
  }

  // ------------------------------------------------------------ one task
  function runDuration(r) {
    if (r.started === null || r.started === undefined) return null;
    const end = r.finished === null || r.finished === undefined ? (r.status === "running" ? nowS() : null) : r.finished;
    return end === null ? null : Math.max(0, end - r.started);
  }

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k of Object.keys(attrs || {})) e.setAttribute(k, String(attrs[k]));
    return e;
  }

  // durations (bar height) and outcomes (bar class) of the runs kept
  function drawChart(box, runs) {
    clear(box);
    if (!runs.length) {
      box.appendChild(el("p", "no runs yet", "muted"));
      return;
    }
    const W = 720, H = 140, L = 56, B = 20, T = 8;
    const durs = runs.map(runDuration);
    const max = Math.max(0.001, ...durs.filter((x) => x !== null));
    const s = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", class: "runchart" });
    s.appendChild(el("title", "run durations and outcomes, oldest left"));
    const step = (W - L - 4) / runs.length;
    const bw = Math.max(1, step * 0.8);
    runs.forEach((r, i) => {
      const d = durs[i];
      const h = d === null ? 4 : Math.max(2, (H - B - T) * (d / max));
      const rect = svg("rect", {
        x: (L + i * step).toFixed(1), y: (H - B - h).toFixed(1), width: bw.toFixed(1), height: h.toFixed(1),
        class: "bar " + stateClass("run-", r.status, STATUSES),
      });
      const tip = svg("title");
      tip.textContent = utc(r.slot) + " " + r.status + " " + duration(d) + " on " + r.node;
      rect.appendChild(tip);
      s.appendChild(rect);
    });
    s.appendChild(svg("line", { x1: L - 2, y1: H - B, x2: W, y2: H - B, class: "axis" }));
    s.appendChild(svg("line", { x1: L - 2, y1: T, x2: L - 2, y2: H - B, class: "axis" }));
    const top = svg("text", { x: L - 6, y: T + 10, "text-anchor": "end", class: "label" });
    top.textContent = duration(max);
    s.appendChild(top);
    const zero = svg("text", { x: L - 6, y: H - B, "text-anchor": "end", class: "label" });
    zero.textContent = "0";
    s.appendChild(zero);
    const first = svg("text", { x: L, y: H - 4, class: "label" });
    first.textContent = utc(runs[0].slot);
    s.appendChild(first);
    const lastL = svg("text", { x: W - 2, y: H - 4, "text-anchor": "end", class: "label" });
    lastL.textContent = utc(runs[runs.length - 1].slot);
    s.appendChild(lastL);
    box.appendChild(s);
    const counts = {};
    for (const r of runs) counts[r.status] = (counts[r.status] || 0) + 1;
    const legend = el("p", "", "muted legend");
    for (const k of Object.keys(counts).sort()) {
      legend.appendChild(badge(k, "run-", STATUSES));
      legend.appendChild(document.createTextNode(" " + counts[k] + "   "));
    }
    legend.appendChild(document.createTextNode("\u00b7 " + runs.length + " runs kept (bar height: duration)"));
    box.appendChild(legend);
  }

  let currentTask = null;

  async function renderTask(id) {
    const p = "/v1/tasks/" + enc(id);
    const [t, ex, runs] = await Promise.all([get(p), get(p + "/explain?n=10"), get(p + "/runs")]);
    currentTask = t;
    const task = t.task;
    $("task-id").textContent = task.id;
    $("task-name").textContent = task.name && task.name !== task.id ? task.name : "";
    const tags = Object.keys(task.tags || {}).sort().map((k) => k + "=" + task.tags[k]).join(", ");
    const flag = t.conflict ? badge("conflict", "flag-", ["conflict"]) : document.createTextNode("no");
    kv($("task-summary"), [
      ["name", task.name],
      ["schedule", task.schedule + "  (" + humanSchedule(task.schedule, task.timezone) + ")"],
      ["timezone", task.timezone],
      ["owner", t.owner || "- (no eligible member)"],
      ["replicas", (t.replicas || []).join(", ") || "-"],
      ["paused", t.paused ? "yes" : "no"],
      ["last fired", t.last_fired ? utc(t.last_fired) + " (" + ago(nowS() - t.last_fired) + ")" : "never"],
      ["command", (task.command && task.command.type) || "-"],
      ["overlap / misfire", task.overlap + " / " + task.misfire],
      ["tags", tags || "-"],
      ["conflict", flag],
    ]);
    if (t.conflict) {
      $("task-summary").appendChild(el("dt", "siblings"));
      $("task-summary").appendChild(el("dd", (t.siblings || []).length + " kept; " + t.resolution));
    }
    $("act-pause").disabled = !!t.paused;
    $("act-resume").disabled = !t.paused;

    const why = $("explain-why");
    clear(why);
    for (const w of ex.why || []) why.appendChild(el("li", w));
    for (const n of ex.notes || []) why.appendChild(el("li", n, "note"));
    if (ex.upgrade) why.appendChild(el("li", "upgrade: " + JSON.stringify(ex.upgrade), "note"));
    if (ex.dst) why.appendChild(el("li", "DST policy: gap " + ex.dst.gap + ", overlap " + ex.dst.overlap, "muted"));
    if (ex.running && ex.running.length) why.appendChild(el("li", "running now: " + JSON.stringify(ex.running)));
    const nb = $("explain-next").tBodies[0];
    clear(nb);
    for (const n of ex.next || []) {
      nb.appendChild(row([n.utc, (n.local || "") + " " + (n.local_zone || ""), utc(n.fire_at) + " (" + ago(nowS() - n.fire_at) + ")",
        n.dst_note ? el("span", n.dst_note, "dst-note") : ""]));
    }

    const sorted = runs.slice().sort((a, b) => (a.slot - b.slot) || ((a.started || 0) - (b.started || 0)));
    drawChart($("run-chart"), sorted);
    const rb = $("runs").tBodies[0];
    clear(rb);
    for (const r of sorted.slice(-RUNS_SHOWN).reverse()) {
      let out = (r.output || "");
      if (out.length > OUTPUT_TAIL) out = "\u2026" + out.slice(-OUTPUT_TAIL);
      const cell = document.createElement("div");
      if (out) cell.appendChild(el("pre", out, "output"));
      if (r.error) cell.appendChild(el("div", r.error, "run-error"));
      const tr = row([utc(r.slot), badge(r.status, "run-", STATUSES), duration(runDuration(r)), r.node, r.attempt,
        r.fencing_token === null || r.fencing_token === undefined ? "-" : r.fencing_token, cell]);
      tr.dataset.status = String(r.status);
      rb.appendChild(tr);
    }
    $("task-def").textContent = JSON.stringify(task, null, 2);
  }

  async function act(kind) {
    const tr = route();
    if (tr.view !== "task") return;
    if (!(token() || memoryToken)) {
      pendingAction = kind;
      askToken(kind[0].toUpperCase() + kind.slice(1) + " needs the API token.");
      return;
    }
    const res = $("act-result");
    res.textContent = kind + "\u2026";
    try {
      const r = await call("POST", "/v1/tasks/" + enc(tr.id) + "/" + kind, false);
      res.textContent = kind === "run" ? "started slot " + r.slot + " on " + r.node : (r.paused ? "paused" : "resumed") + " (cluster-wide)";
      details.delete(tr.id);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        setToken("");
        pendingAction = kind;
        showAuthState();
        askToken("The token was refused: " + e.message);
        res.textContent = "";
        return;
      }
      res.textContent = kind + " failed: " + e.message;
    }
    refresh();
  }

  // ------------------------------------------------------------ refresh loop
  let timer = null;
  let running = false;
  let again = false;
  let waitingForToken = false;

  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    waitingForToken = false;
    clearTimeout(timer);
    const r = route();
    try {
      if (r.view === "cluster") await renderCluster();
      else if (r.view === "tasks") await renderTasks();
      else await renderTask(r.id);
      showView(r.view);
      showError("");
      $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        waitingForToken = true; // no more reads (and refusals in the node's log) until one is given
        hideViews();
        const had = !!(token() || memoryToken);
        if (had) setToken("");
        showAuthState();
        $("auth-state").textContent = "token needed to read";
        askToken(had ? "The token was refused (" + e.message + ")." :
          "This node answers reads only with the API token (it runs without --open-reads).");
      } else if (e instanceof ApiError && e.status === 404 && r.view === "task") {
        showView(r.view);
        showError("No task " + r.id + " on this node.");
      } else {
        showError("Cannot read the node's API: " + (e.message || e) + " (retrying)");
      }
    } finally {
      running = false;
      if (!waitingForToken) timer = setTimeout(refresh, REFRESH_MS);
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  function init() {
    memoryToken = token();
    showAuthState();
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = $("token-input").value.trim();
      $("token-input").value = "";
      setToken(v);
      showAuthState();
      $("token-panel").hidden = true;
      const pa = pendingAction;
      pendingAction = null;
      if (pa && v) act(pa);
      else refresh();
    });
    $("token-forget").addEventListener("click", () => {
      setToken("");
      pendingAction = null;
      showAuthState();
      refresh();
    });
    $("token-button").addEventListener("click", () => {
      const p = $("token-panel");
      if (p.hidden) askToken("Actions (pause, resume, run now) need the API token.");
      else p.hidden = true;
    });
    $("task-filter").addEventListener("input", () => drawTasks());
    $("act-pause").addEventListener("click", () => act("pause"));
    $("act-resume").addEventListener("click", () => act("resume"));
    $("act-run").addEventListener("click", () => act("run"));
    window.addEventListener("hashchange", () => {
      showError("");
      $("act-result").textContent = "";
      refresh();
    });
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
