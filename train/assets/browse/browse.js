// The feature browser's pages (index, feature, compare), for both the server (`train browse`)
// and the static export (`train browse --export DIR`). Only the data source differs: the server
// answers pages and records over /api; the export ships columns and pieces that are filtered
// here. The filters travel in the URL, so every view is a link.
"use strict";

(function () {
  const B = window.BROWSE;
  const STATIC = B.mode === "static";
  const FILTERS = ["sae", "layer", "direction", "significant", "healthy", "alive", "q", "qmode",
    "min_fire_rate", "max_fire_rate", "min_auroc", "max_auroc", "min_max_activation", "max_q_value"];
  const STATE = FILTERS.concat(["sort", "dir", "page", "size"]);
  const DIRECTIONS = ["", "correct↑", "wrong↑"];
  const ROLE_NAMES = {0: "text", 1: "prompt", 2: "thinking", 3: "answer"};
  B.rendered = 0; // pages of the table drawn, and feature panels rendered: tests wait on these
  B.featuresRendered = 0;

  // -- helpers --------------------------------------------------------------------------

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  }
  function visible(s) { // a token on one line: line breaks and tabs as symbols
    return String(s == null ? "" : s).replace(/\r/g, "").replace(/\n/g, "↵").replace(/\t/g, "→");
  }
  function fmt(v) {
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) return "—";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v !== "number") return esc(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toLocaleString("en-US");
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toPrecision(3);
    return v.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }
  function params(search) {
    const out = {};
    new URLSearchParams(search).forEach((v, k) => { if (v !== "") out[k] = v; });
    return out;
  }
  function query(obj, keys) {
    const u = new URLSearchParams();
    (keys || Object.keys(obj)).forEach((k) => { if (obj[k] !== undefined && obj[k] !== null && obj[k] !== "") u.set(k, obj[k]); });
    return u.toString();
  }
  function indexURL(q) {
    return (STATIC ? B.base + "index.html" : B.base) + (q ? "?" + q : "");
  }
  function featureURL(sae, id, q) {
    if (STATIC) return B.base + "feature.html?" + query({sae: sae, id: id}) + (q ? "&" + q : "");
    return B.base + "feature/" + encodeURIComponent(sae) + "/" + id + (q ? "?" + q : "");
  }
  function compareURL(a, ai, b, bi, q) {
    if (STATIC) return B.base + "compare.html?" + query({a: a, ai: ai, b: b, bi: bi}) + (q ? "&" + q : "");
    return B.base + "compare/" + [a, ai, b, bi].map((x) => encodeURIComponent(x)).join("/") + (q ? "?" + q : "");
  }
  async function fetchOK(url) {
    const r = await fetch(url);
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      const err = new Error(msg); err.status = r.status; throw err;
    }
    return r;
  }
  async function fetchJSON(url) { // pieces of the static export are gzip files, decompressed here
    const r = await fetchOK(url);
    if (!url.endsWith(".gz")) return r.json();
    const text = await new Response(r.body.pipeThrough(new DecompressionStream("gzip"))).text();
    return JSON.parse(text);
  }

  // -- data sources ---------------------------------------------------------------------

  function serverSource() {
    return {
      meta: () => fetchJSON(B.base + "api/meta"),
      page: (p) => fetchJSON(B.base + "api/features?" + query(p)),
      feature: (sae, id) => fetchJSON(B.base + "api/feature/" + encodeURIComponent(sae) + "/" + id),
    };
  }

  function staticSource() {
    const data = B.base + "data/";
    let meta = null, cols = null, search = null, allSnippets = null;
    const snippetBlocks = {}, orders = {};
    async function getMeta() { if (!meta) meta = await fetchJSON(data + "meta.json"); return meta; }
    async function columns() {
      if (cols) return cols;
      const m = await getMeta();
      const out = {};
      await Promise.all(m.static.columns.map(async (c) => {
        const buf = await (await fetchOK(data + "columns/" + c.field + ".bin")).arrayBuffer();
        out[c.field] = new ({float32: Float32Array, int32: Int32Array, int16: Int16Array, int8: Int8Array, uint8: Uint8Array})[c.dtype](buf);
      }));
      cols = out;
      return cols;
    }
    async function snippets(rows) {
      const m = await getMeta();
      const size = m.static.snippet_block;
      const need = [...new Set(rows.map((r) => Math.floor(r / size)))];
      await Promise.all(need.map(async (b) => {
        if (!snippetBlocks[b]) snippetBlocks[b] = await fetchJSON(data + "snippets/" + b + ".json.gz");
      }));
      return rows.map((r) => snippetBlocks[Math.floor(r / size)][r % size]);
    }
    async function tokenIndex() {
      if (!search) {
        const [t, rows] = await Promise.all([
          fetchJSON(data + "search/tokens.json.gz"),
          fetchOK(data + "search/rows.bin").then((r) => r.arrayBuffer()),
        ]);
        search = {tokens: t.tokens, starts: t.starts, rows: new Int32Array(rows)};
      }
      return search;
    }
    async function everySnippet() {
      if (!allSnippets) {
        const m = await getMeta();
        const all = [...Array(Math.ceil(m.n / m.static.snippet_block)).keys()].map((b) => b * m.static.snippet_block);
        await snippets(all);
        allSnippets = [];
        for (let b = 0; b < all.length; b++) allSnippets.push(...snippetBlocks[b].map((s) => (s[0] || "") + (s[1] || "") + (s[2] || "")));
      }
      return allSnippets;
    }
    async function order(field, desc) { // the export ships every column's order, both ways
      const k = field + (desc ? ".desc" : ".asc");
      if (!orders[k]) orders[k] = new Int32Array(await (await fetchOK(data + "orders/" + k + ".bin")).arrayBuffer());
      return orders[k];
    }
    async function mask(p, c, m) {
      const n = m.n, keep = new Uint8Array(n).fill(1);
      const num = (v) => (v === undefined || v === "" ? null : Number(v));
      if (p.sae) { const i = m.saes.findIndex((s) => s.name === p.sae); for (let r = 0; r < n; r++) if (c.sae[r] !== i) keep[r] = 0; }
      if (p.layer !== undefined && p.layer !== "") { const l = Number(p.layer); for (let r = 0; r < n; r++) if (c.layer[r] !== l) keep[r] = 0; }
      if (p.direction) { const d = DIRECTIONS.indexOf(p.direction); for (let r = 0; r < n; r++) if (c.direction[r] !== d) keep[r] = 0; }
      if (p.significant) for (let r = 0; r < n; r++) if (!(c.q_value[r] <= m.saes[c.sae[r]].alpha)) keep[r] = 0;
      if (p.healthy) for (let r = 0; r < n; r++) if (!c.healthy[r]) keep[r] = 0;
      if (p.alive) for (let r = 0; r < n; r++) if (!c.alive[r]) keep[r] = 0;
      for (const key of Object.keys(p)) {
        const mm = /^(min|max)_(.+)$/.exec(key);
        if (!mm || !c[mm[2]]) continue;
        const v = num(p[key]), x = c[mm[2]];
        if (v === null || isNaN(v)) continue;
        const f = Math.fround(v);
        for (let r = 0; r < n; r++) if (!(mm[1] === "min" ? x[r] >= f : x[r] <= f)) keep[r] = 0;
      }
      if (p.q) {
        const exact = p.q.length >= 2 && p.q[0] === '"' && p.q[p.q.length - 1] === '"';
        const text = exact ? p.q.slice(1, -1) : p.q;
        const hit = new Uint8Array(n);
        if (p.qmode === "context") {
          const all = await everySnippet(), t = text.toLowerCase();
          for (let r = 0; r < n; r++) if (exact ? all[r].includes(text) : all[r].toLowerCase().includes(t)) hit[r] = 1;
        } else {
          const s = await tokenIndex(), t = text.toLowerCase();
          s.tokens.forEach((tok, i) => {
            if (exact ? tok === text : tok.toLowerCase().includes(t)) for (let j = s.starts[i]; j < s.starts[i + 1]; j++) hit[s.rows[j]] = 1;
          });
        }
        for (let r = 0; r < n; r++) keep[r] &= hit[r];
      }
      return keep;
    }
    function round4(v) { return v !== v ? null : Number(v.toPrecision(4)); }
    async function rowsOf(rows, c, m) {
      const snip = await snippets(rows);
      return rows.map((r, i) => {
        const o = {};
        m.columns.forEach((col) => {
          const x = c[col.field][r];
          if (col.field === "sae") o.sae = m.saes[x].name;
          else if (col.field === "direction") o.direction = DIRECTIONS[x];
          else if (col.kind === "float") o[col.field] = round4(x);
          else if (col.kind === "bool") o[col.field] = !!x;
          else o[col.field] = x;
        });
        o.top = {before: snip[i][0], token: snip[i][1], after: snip[i][2]};
        return o;
      });
    }
    return {
      meta: getMeta,
      page: async (p) => {
        const m = await getMeta();
        const size = Math.min(Math.max(Number(p.size) || 50, 1), 500);
        const plain = FILTERS.every((k) => !p[k] || k === "qmode") && (!p.sort || p.sort === "sae") && p.dir !== "desc";
        if (plain && (Number(p.page) || 1) === 1 && size === m.static.first_page.data.length) return m.static.first_page;
        const c = await columns();
        const o = plain || !p.sort || (p.sort === "sae" && p.dir !== "desc") ? null : await order(p.sort, p.dir === "desc");
        const keep = plain ? null : await mask(p, c, m);
        const kept = [];
        for (let i = 0; i < m.n; i++) { const r = o ? o[i] : i; if (!keep || keep[r]) kept.push(r); }
        const pages = Math.max(1, Math.ceil(kept.length / size));
        const page = Math.min(Math.max(Number(p.page) || 1, 1), pages);
        return {last_page: pages, last_row: kept.length, data: await rowsOf(kept.slice((page - 1) * size, page * size), c, m)};
      },
      feature: async (sae, id) => {
        const m = await getMeta();
        const i = m.saes.findIndex((s) => s.name === sae);
        if (i < 0 || !(id >= 0 && id < m.saes[i].d_sae)) {
          const e = new Error(i < 0 ? "no SAE named " + sae + " in this run" : sae + " has features 0 to " + (m.saes[i].d_sae - 1));
          e.status = 404; throw e;
        }
        const block = Math.floor(id / m.static.feature_block);
        const recs = await fetchJSON(data + "features/" + i + "/" + block + ".json.gz");
        return recs[id - block * m.static.feature_block];
      },
    };
  }

  const api = STATIC ? staticSource() : serverSource();

  // -- index ----------------------------------------------------------------------------

  function topCell(cell) {
    const t = cell.getValue();
    if (!t || t.token == null) return "";
    const before = visible(t.before), keep = 20; // the firing token stays in view: long text before it is cut
    const shown = before.length > keep ? "…" + before.slice(before.length - keep) : before;
    return '<span class="snippet">' + esc(shown) + "<mark>" + esc(visible(t.token)) + "</mark>" + esc(visible(t.after)) + "</span>";
  }

  async function indexPage() {
    const meta = await api.meta();
    document.getElementById("run").textContent = meta.run + " · " + meta.n.toLocaleString("en-US") + " features";
    const form = document.getElementById("filters");
    const state = params(location.search);
    const opt = (sel, v, label) => { const o = document.createElement("option"); o.value = v; o.textContent = label; sel.appendChild(o); };
    meta.saes.forEach((s) => opt(form.sae, s.name, s.name + " (" + s.d_sae.toLocaleString("en-US") + ")"));
    meta.layers.forEach((l) => opt(form.layer, l, l));
    meta.directions.forEach((d) => opt(form.direction, d, d));
    FILTERS.forEach((k) => {
      const el = form.elements[k];
      if (!el || state[k] === undefined) return;
      if (el.type === "checkbox") el.checked = state[k] === "1"; else el.value = state[k];
    });
    function filters() {
      const f = {};
      FILTERS.forEach((k) => {
        const el = form.elements[k];
        if (!el) return;
        if (el.type === "checkbox") { if (el.checked) f[k] = "1"; } else if (el.value !== "") f[k] = el.value;
      });
      if (f.qmode === "token" || !f.q) delete f.qmode;
      return f;
    }
    let current = Object.assign({}, state);
    function remember(p) {
      current = p;
      history.replaceState(null, "", indexURL(query(p, STATE)));
    }
    const num = (cell) => fmt(cell.getValue());
    const columns = [
      {title: "SAE", field: "sae", width: 130},
      {title: "layer", field: "layer", hozAlign: "right", width: 70},
      {title: "feature", field: "feature", hozAlign: "right", width: 85, formatter: (c) => {
        const r = c.getRow().getData();
        return '<a href="' + esc(featureURL(r.sae, r.feature, query(current, STATE))) + '">' + r.feature + "</a>";
      }},
      {title: "fire rate", field: "fire_rate", hozAlign: "right", minWidth: 88, formatter: num},
      {title: "mean act", field: "mean_activation", hozAlign: "right", minWidth: 88, formatter: num},
      {title: "max act", field: "max_activation", hozAlign: "right", minWidth: 88, formatter: num},
      {title: "AUROC", field: "auroc", hozAlign: "right", minWidth: 88, formatter: num},
      {title: "95% CI", field: "auroc_ci_low", hozAlign: "right", width: 120, formatter: (c) => {
        const r = c.getRow().getData();
        return r.auroc_ci_low == null ? "—" : "[" + fmt(r.auroc_ci_low) + ", " + fmt(r.auroc_ci_high) + "]";
      }},
      {title: "BH q", field: "q_value", hozAlign: "right", minWidth: 88, formatter: num},
      {title: "direction", field: "direction", width: 90},
      {title: "seq AUROC", field: "seq_auroc", hozAlign: "right", minWidth: 88, formatter: num},
      {title: "healthy", field: "healthy", hozAlign: "center", width: 75, formatter: "tickCross"},
      {title: "top context", field: "top", headerSort: false, minWidth: 320, formatter: topCell},
    ];
    const size = Number(state.size) || 50;
    const table = new Tabulator("#table", {
      columns: columns,
      layout: "fitColumns",
      height: "calc(100vh - 190px)",
      placeholder: "No features match these filters",
      ajaxURL: "features", // Tabulator's remote mode needs a URL; the request goes through api.page
      ajaxRequestFunc: (url, config, p) => {
        const s = (p.sort && p.sort[0]) || {};
        const req = Object.assign(filters(), {page: p.page, size: p.size, sort: s.field, dir: s.field ? s.dir : undefined});
        remember(req);
        return api.page(req).then((res) => { B.answeredAt = performance.now(); return res; });
      },
      pagination: true,
      paginationMode: "remote",
      paginationSize: size,
      paginationSizeSelector: [25, 50, 100, 200, 500],
      paginationInitialPage: Number(state.page) || 1,
      paginationCounter: "rows",
      sortMode: "remote",
      filterMode: "remote",
      initialSort: state.sort ? [{column: state.sort, dir: state.dir === "desc" ? "desc" : "asc"}] : [],
    });
    table.on("renderComplete", () => {
      B.rendered++;
      B.renderedAt = performance.now(); // since navigation start: what the scale bench reads
      document.body.dataset.rendered = B.rendered;
    });
    table.on("rowClick", (e, row) => {
      if (e.target.closest("a")) return;
      const r = row.getData();
      location.href = featureURL(r.sae, r.feature, query(current, STATE));
    });
    let timer = null;
    const reload = () => { clearTimeout(timer); timer = setTimeout(() => table.setData(), 150); };
    form.addEventListener("input", reload);
    form.addEventListener("change", reload);
    form.addEventListener("submit", (e) => { e.preventDefault(); reload(); });
    form.addEventListener("reset", () => setTimeout(reload, 0));
    B.table = table;
  }

  // -- a feature ------------------------------------------------------------------------

  function shade(v, max) {
    if (v === null || v === undefined) return "";
    const a = max > 0 ? Math.max(0, Math.min(1, v / max)) : 0;
    return a > 0 ? "background: rgba(255, 120, 0, " + (0.08 + 0.82 * a).toFixed(3) + ")" : "";
  }

  function contextHTML(ex, max) {
    const toks = ex.tokens.map((t, i) => {
      const v = ex.values ? ex.values[i] : (i === ex.focus ? ex.activation : null);
      const title = v === null || v === undefined ? "not analyzed (outside the scanned rows)" : "activation " + v;
      const cls = "tok" + (i === ex.focus ? " focus" : "") + (v === null || v === undefined ? " na" : "");
      return '<span class="' + cls + '" title="' + esc(title) + '" data-value="' + (v === null || v === undefined ? "" : v) + '" style="' + shade(v, max) + '">' + esc(visible(t)) + "</span>";
    });
    const role = ROLE_NAMES[ex.role] || ex.role;
    return '<div class="example" data-rank="' + ex.rank + '"><span class="meta">#' + ex.rank + " · " + fmt(ex.activation) +
      " · seq " + ex.seq_id + " pos " + ex.position + " · " + esc(role) + '</span><span class="ctx">' + toks.join("") + "</span></div>";
  }

  function bars(values, labels, opts) {
    const w = 360, h = 110, n = values.length, max = Math.max(...values.map((v) => v || 0), 0) || 1;
    const bw = w / Math.max(n, 1);
    const rects = values.map((v, i) => {
      const bh = (v || 0) / max * (h - 16);
      const name = opts && opts.titles ? opts.titles[i] : labels ? labels[i] : "";
      const title = (name ? name + ": " : "") + (v === null || v === undefined ? "not analyzed" : fmt(v));
      return '<rect x="' + (i * bw + 1).toFixed(1) + '" y="' + (h - 14 - bh).toFixed(1) + '" width="' + Math.max(bw - 2, 1).toFixed(1) +
        '" height="' + bh.toFixed(1) + '" class="' + (v === null || v === undefined ? "na" : "") + '"><title>' + esc(title) + "</title></rect>";
    });
    const axis = opts && opts.axis ? '<text x="0" y="' + h + '">' + esc(opts.axis[0]) + '</text><text x="' + w + '" y="' + h + '" text-anchor="end">' + esc(opts.axis[1]) + "</text>" : "";
    const ticks = labels && !(opts && opts.axis) ? labels.map((l, i) => '<text x="' + ((i + 0.5) * bw).toFixed(1) + '" y="' + h + '" text-anchor="middle">' + esc(l) + "</text>").join("") : "";
    return '<svg class="bars" viewBox="0 0 ' + w + " " + (h + 2) + '" width="' + w + '" height="' + (h + 2) + '">' + rects.join("") + axis + ticks + "</svg>";
  }

  function table(head, rows) {
    return "<table><thead><tr>" + head.map((h) => "<th>" + esc(h) + "</th>").join("") + "</tr></thead><tbody>" +
      rows.map((r) => "<tr>" + r.map((c) => "<td>" + c + "</td>").join("") + "</tr>").join("") + "</tbody></table>";
  }

  function featureHTML(f, q, other) {
    const m = f.metrics;
    const ci = m.auroc_ci_low == null ? "—" : "[" + fmt(m.auroc_ci_low) + ", " + fmt(m.auroc_ci_high) + "]";
    const sig = m.q_value != null && m.q_value <= f.alpha;
    const parts = [];
    parts.push('<h1><span class="sae">' + esc(f.sae) + '</span> · feature <span class="fid">' + f.feature + "</span>" +
      (f.layer != null ? ' <small>layer ' + f.layer + "</small>" : "") + "</h1>");
    parts.push('<p class="links">' +
      (f.prev != null ? '<a rel="prev" href="' + esc(featureURL(f.sae, f.prev, q)) + '">← ' + f.prev + "</a> " : "") +
      (f.next != null ? '<a rel="next" href="' + esc(featureURL(f.sae, f.next, q)) + '">' + f.next + " →</a> " : "") +
      '· <a class="permalink" href="' + esc(featureURL(f.sae, f.feature)) + '">permalink</a>' +
      (other ? "" : ' <span class="note">(← → or k j: previous / next)</span>') + "</p>");
    parts.push('<table class="stats"><tbody>' + [
      ["fire rate", fmt(m.fire_rate) + " (" + fmt(m.fire_count) + " rows)"],
      ["mean / max activation", fmt(m.mean_activation) + " / " + fmt(m.max_activation)],
      ["AUROC (95% CI)", fmt(m.auroc) + " " + ci],
      ["BH q", fmt(m.q_value) + (sig ? ' <b class="sig">significant</b>' : "")],
      ["direction", esc(m.direction || "—")],
      ["sequence AUROC", fmt(m.seq_auroc)],
      ["fire rate correct / wrong", fmt(m.fire_rate_correct) + " / " + fmt(m.fire_rate_wrong)],
      ["healthy", f.healthy ? "yes" : "no"],
    ].map((r) => '<tr><th>' + r[0] + "</th><td>" + r[1] + "</td></tr>").join("") + "</tbody></table>");

    // top contexts, split by the rollout's correctness where the cache has labels
    const max = Math.max(m.max_activation || 0, ...f.examples.map((e) => e.activation || 0));
    const groups = f.examples.some((e) => e.label >= 0)
      ? [["Correct rollouts", (e) => e.label === 1, "correct"], ["Wrong rollouts", (e) => e.label === 0, "wrong"], ["No label", (e) => e.label < 0, "unlabeled"]]
      : [["Top contexts", () => true, "all"]];
    parts.push("<h2>Top contexts</h2>");
    if (!f.examples.length) parts.push('<p class="note">No examples: this feature never fired on the analyzed rows.</p>');
    groups.forEach(([title, keep, cls]) => {
      const ex = f.examples.filter(keep);
      if (!ex.length && cls === "unlabeled") return;
      parts.push('<section class="examples ' + cls + '"><h3>' + title + " <small>(" + ex.length + ")</small></h3>" +
        (ex.length ? ex.map((e) => contextHTML(e, max)).join("") : '<p class="note">none among the top examples</p>') + "</section>");
    });

    const p = f.profile;
    parts.push('<div class="figs">');
    if (p) {
      const h = p.histogram;
      parts.push('<figure class="hist"><figcaption>Activation histogram</figcaption>' +
        (h.low == null ? '<p class="note">never fired</p>' : bars(h.counts, h.counts.map((_, i) => fmt(h.low + (h.high - h.low) * (i + 0.5) / h.counts.length)), {axis: [fmt(h.low), fmt(h.high)]})) + "</figure>");
      const roles = Object.keys(p.fire_rate_by_role).filter((r) => p.rows_by_role == null || p.rows_by_role[r] > 0 || p.fire_rate_by_role[r] != null);
      parts.push('<figure class="roles"><figcaption>Fire rate by role</figcaption>' +
        table(["role", "fire rate", "rows analyzed"], roles.map((r) => [esc(r), fmt(p.fire_rate_by_role[r]), fmt(p.rows_by_role ? p.rows_by_role[r] : null)])) + "</figure>");
      const e = p.position_edges || [];
      const k = (x) => (x >= 1024 ? x / 1024 + "k" : String(x));
      const ranges = e.map((x, i) => (i + 1 < e.length ? (e[i + 1] - 1 === x ? String(x) : x + "–" + (e[i + 1] - 1)) : x + "+"));
      parts.push('<figure class="positions"><figcaption>Fire rate by position <small>(bucket start)</small></figcaption>' +
        bars(p.fire_rate_by_position, e.map(k), {titles: ranges}) + "</figure>");
    } else {
      parts.push('<p class="note">' + esc(f.missing.analysis || "No profile.") + "</p>");
    }
    parts.push("</div>");

    parts.push("<h2>Decoder neighbours</h2>");
    if (f.neighbours) {
      const link = (sae, id) => '<a href="' + esc(featureURL(sae, id, q)) + '">' + esc(sae) + " #" + id + "</a>";
      const cmp = (sae, id) => '<a class="cmp" href="' + esc(compareURL(f.sae, f.feature, sae, id, q)) + '">compare</a>';
      parts.push('<div class="figs"><figure class="same"><figcaption>In ' + esc(f.sae) + "</figcaption>" +
        table(["feature", "cosine", ""], f.neighbours.same.map((n) => [link(f.sae, n.feature), fmt(n.cosine), cmp(f.sae, n.feature)])) + "</figure>" +
        '<figure class="other"><figcaption>Best matches in the other SAEs</figcaption>' +
        (f.neighbours.other.length ? table(["feature", "cosine", ""], f.neighbours.other.map((n) => [link(n.sae, n.feature), fmt(n.cosine), cmp(n.sae, n.feature)])) : '<p class="note">no other SAE of this width of input in the run</p>') +
        "</figure></div>");
    } else {
      parts.push('<p class="note">' + esc(f.missing.analysis) + "</p>");
    }

    parts.push("<h2>Logit effects</h2>");
    if (f.logit_effects) {
      const side = (list) => table(["token", "logit"], list.map((t) => ['<code>' + esc(visible(t.token)) + "</code>", fmt(t.value)]));
      parts.push('<div class="figs"><figure class="promoted"><figcaption>Promoted</figcaption>' + side(f.logit_effects.promoted) +
        '</figure><figure class="suppressed"><figcaption>Suppressed</figcaption>' + side(f.logit_effects.suppressed) + "</figure></div>");
    } else {
      parts.push('<p class="note missing-logits">' + esc(f.missing.logit_effects) + "</p>");
    }
    return parts.join("");
  }

  async function renderFeature(el, sae, id, q, other) {
    try {
      const f = await api.feature(sae, id);
      el.innerHTML = featureHTML(f, q, other);
      el.dataset.sae = f.sae;
      el.dataset.feature = f.feature;
      return f;
    } catch (e) {
      el.innerHTML = '<h1>Not found</h1><p class="error">' + esc(e.message) + '</p><p><a href="' + esc(indexURL(q)) + '">back to the index</a></p>';
      el.dataset.error = e.status || "error";
      return null;
    } finally {
      B.featuresRendered++;
      B.featureRenderedAt = performance.now();
      document.body.dataset.features = B.featuresRendered;
    }
  }

  function route() { // (page arguments, the index's filters to keep)
    const p = params(location.search);
    const q = query(p, STATE);
    if (STATIC) return {args: p, q: q};
    const parts = location.pathname.slice(B.base.length).split("/").map(decodeURIComponent);
    return {args: parts[0] === "feature" ? {sae: parts[1], id: parts[2]} : {a: parts[1], ai: parts[2], b: parts[3], bi: parts[4]}, q: q};
  }

  function nav(q) {
    document.getElementById("nav").innerHTML = '<a class="back" href="' + esc(indexURL(q)) + '">← index</a>';
  }

  async function featurePage() {
    const {args, q} = route();
    nav(q);
    const el = document.getElementById("feature");
    const f = await renderFeature(el, args.sae, Number(args.id), q);
    if (f) document.title = "Feature: " + f.sae + " #" + f.feature;
    document.addEventListener("keydown", (e) => {
      if (!f || e.target.closest("input, select, textarea") || e.altKey || e.ctrlKey || e.metaKey) return;
      const to = e.key === "ArrowLeft" || e.key === "k" ? f.prev : e.key === "ArrowRight" || e.key === "j" ? f.next : undefined;
      if (to !== undefined && to !== null) location.href = featureURL(f.sae, to, q);
    });
  }

  async function comparePage() {
    const {args, q} = route();
    nav(q);
    await Promise.all([
      renderFeature(document.getElementById("left"), args.a, Number(args.ai), q, true),
      renderFeature(document.getElementById("right"), args.b, Number(args.bi), q, true),
    ]);
  }

  const pages = {index: indexPage, feature: featurePage, compare: comparePage};
  pages[B.page]().catch((e) => {
    document.body.insertAdjacentHTML("afterbegin", '<p class="error">' + esc(e.message) + "</p>");
    document.body.dataset.error = "1";
  });
})();
