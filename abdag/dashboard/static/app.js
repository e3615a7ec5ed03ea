/* abdag dashboard: reads /api/report and /api/timeline, draws them with uPlot, refreshes.
 *
 * Test hooks: #verdict[data-verdict][data-srm][data-srm-segments] (#srm-warning shown while the SRM fires, overall or in a segment value), every chart container .chart[data-points] (x points
 * drawn, set after each render), .tile[data-key][data-value], tr[data-metric],
 * #ttd[data-status] (the time to decision: decided, projected, no decision expected, ...).
 * Names from the database are only ever set as text, never as HTML.
 */
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const EXPERIMENTS_EVERY = 6; // refresh the experiment list every 6th cycle
  const C = {
    a: "#3b6fd8",
    b: "#e8850c",
    ink: "#1f2430",
    muted: "#9aa1ad",
    good: "#1f8a4c",
    bad: "#c93636",
    teal: "#2a8c8c",
    purple: "#7b55c7",
    grid: "#eef0f3",
  };
  // Metric titles and directions come with the data (comparators/metric_specs.py), so a
  // new metric needs nothing here.

  const params = new URLSearchParams(location.search);
  const state = {
    experiment: params.get("experiment") || "",
    charts: new Map(),
    busy: false,
    cycle: 0,
    experiments: [],
  };
  const $ = (id) => document.getElementById(id);

  /* ------------------------------------------------------------------ helpers */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const isNum = (x) => typeof x === "number" && isFinite(x);
  const num = (x, d = 4) => (isNum(x) ? x.toFixed(d) : "n/a");
  const signed = (x, d = 4) => (isNum(x) ? (x >= 0 ? "+" : "") + x.toFixed(d) : "n/a");
  const pct = (x, d = 1) => (isNum(x) ? (100 * x).toFixed(d) + "%" : "n/a");
  const int = (x) => (isNum(x) ? Math.round(x).toLocaleString("en-US") : "n/a");
  const pval = (p) => (!isNum(p) ? "n/a" : p < 1e-4 ? p.toExponential(2) : p.toFixed(4));
  function dur(s) {
    if (!isNum(s)) return "n/a";
    if (Math.abs(s) < 120) return s.toFixed(1) + " s";
    if (Math.abs(s) < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  const utc = (iso) => (iso ? iso.replace("T", " ").replace(/(\.\d+)?(\+00:00|Z)$/, " UTC") : "");

  async function getJSON(url) {
    return (await fetchJSON(url)).body;
  }

  /** {body, headers}; a non-2xx answer throws with the server's message. */
  async function fetchJSON(url) {
    const resp = await fetch(url, { cache: "no-store" });
    let body = null;
    try {
      body = await resp.json();
    } catch (e) {
      body = null;
    }
    if (!resp.ok) {
      throw new Error(body && body.error ? body.error : `${resp.status} ${resp.statusText}`);
    }
    return { body, headers: resp.headers };
  }

  function setStatus(text, st) {
    const s = $("status");
    s.textContent = text;
    s.dataset.state = st || "ok";
  }
  function showError(msg) {
    const e = $("error");
    e.textContent = msg;
    e.hidden = !msg;
  }

  /* ------------------------------------------------------------------ experiments */
  async function loadExperiments() {
    const names = await getJSON("/api/experiments");
    state.experiments = names;
    const sel = $("experiment");
    const want = state.experiment || names[0] || "";
    const options = names.includes(want) || !want ? names : [want, ...names];
    const same =
      sel.options.length === options.length &&
      options.every((n, i) => sel.options[i].value === n);
    if (!same) {
      sel.replaceChildren(...options.map((n) => el("option", { value: n, text: n })));
    }
    sel.value = want;
    state.experiment = want;
  }

  function query() {
    const q = new URLSearchParams({ experiment: state.experiment });
    return q;
  }

  /* ------------------------------------------------------------------ refresh */
  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      if (state.cycle % EXPERIMENTS_EVERY === 0 || !state.experiment) await loadExperiments();
      state.cycle += 1;
      if (!state.experiment) {
        setStatus("no experiments in ClickHouse yet");
        return;
      }
      const rq = query();
      const margin = parseFloat($("margin").value);
      if (isNum(margin) && margin > 0) rq.set("margin", String(margin));
      const tq = query();
      if ($("bucket").value) tq.set("bucket", $("bucket").value);
      const [rep, tl] = await Promise.all([
        fetchJSON("/api/report?" + rq),
        getJSON("/api/timeline?" + tq),
      ]);
      const report = rep.body;
      if (report.experiment !== state.experiment) return; // picker changed meanwhile
      render(report, tl);
      showError("");
      const computed = (rep.headers.get("X-Abdag-Computed-At") || "").slice(11, 19);
      const stale = rep.headers.get("X-Abdag-Stale") === "1";
      setStatus(
        `updated ${new Date().toISOString().slice(11, 19)} UTC` +
          (computed ? ` · report of ${computed}${stale ? ", recomputing…" : ""}` : "")
      );
    } catch (err) {
      showError(err.message || String(err));
      setStatus("error", "error");
    } finally {
      state.busy = false;
    }
  }

  function render(report, tl) {
    document.title = `abdag · ${report.experiment} · ${report.verdict.label}`;
    renderVerdict(report);
    renderModels(report);
    renderTiles(report, tl.summary || {});
    renderMetrics(report);
    renderTests(report);
    renderSegments(report);
    renderMetricCharts(tl);
    renderOpsCharts(report, tl);
  }

  /* ------------------------------------------------------------------ cards */
  function renderVerdict(r) {
    const v = r.verdict;
    const box = $("verdict");
    box.dataset.verdict = v.label;
    box.dataset.confidence = String(v.confidence);
    $("verdict-label").textContent = v.label;
    $("verdict-confidence").textContent =
      v.label === "not enough data" || v.label === "withheld" ? "" : `confidence ${num(v.confidence, 3)}`;
    $("verdict-reason").textContent = v.reason;
    const ttd = r.time_to_decision || {};
    $("ttd").dataset.status = ttd.status || "";
    $("ttd").textContent = timeToDecision(ttd);
    // a sample-ratio mismatch withholds the verdict: say so, and what the tests said
    const srm = r.srm;
    const warn = $("srm-warning");
    // overall, or in a value of a segment (srm.segments: Bonferroni over the values checked)
    const segFired = srm ? (srm.segments || []).filter((s) => s.fired) : [];
    const anyFired = !!(srm && (srm.fired || segFired.length));
    warn.hidden = !anyFired;
    box.dataset.srm = srm ? (anyFired ? "fired" : srm.status) : "";
    box.dataset.srmSegments = segFired.map((s) => s.label).join(",");
    if (anyFired) {
      const sv = r.statistical_verdict || {};
      const overall = srm.fired
        ? `Sample-ratio mismatch: ${srm.summary} (A ${int(srm.n_a)}, B ${int(srm.n_b)} served; ` +
          `sequential p ${pval(srm.pvalue_sequential)} < ${srm.threshold}). `
        : "";
      const segs = segFired
        .map((s) => `Sample-ratio mismatch in segment ${s.label}: ${s.summary} (A ${int(s.n_a)}, B ${int(s.n_b)} served; ` +
          `sequential p ${pval(s.pvalue_sequential)} < ${pval(s.threshold)}). `)
        .join("");
      warn.textContent =
        overall + segs +
        `The verdict is withheld until the served split matches; the tests say ${sv.label || "n/a"}.`;
    } else {
      warn.textContent = "";
    }
  }

  /** The line under the verdict: what it still needs, and when (comparators/decision_time.py). */
  function timeToDecision(t) {
    if (!t.status) return "";
    const eta = (x) => (isNum(x) ? `in ~${dur(x)}` : "no ETA: no labels arriving");
    if (t.status === "decided") {
      const n = t.then;
      const done = `Decided at ${int(t.n)} labelled pairs.`;
      return n && n.status === "projected"
        ? `${done} ${n.decision} expected after ${int(n.more_pairs)} more, ${eta(n.eta_s)}.`
        : done;
    }
    if (t.status === "projected") {
      const rate = isNum(t.rate_per_s) ? ` at ${t.rate_per_s.toPrecision(3)} labelled pairs/s` : "";
      return (
        `Time to decision: ${t.decision} expected after ${int(t.more_pairs)} more labelled pairs ` +
        `(${int(t.needed_pairs)} in all), ${eta(t.eta_s)}${rate}, if the mean stays as it is.`
      );
    }
    return `Time to decision: ${t.status}. ${t.reason}`;
  }

  function model(name, version) {
    if (!name) return "?";
    return version ? `${name} @ ${version}` : name;
  }

  function renderModels(r) {
    $("model-a").textContent = model(r.model_a, r.version_a);
    $("model-b").textContent = model(r.model_b, r.version_b);
    $("span").textContent = r.first_request_ts
      ? `${r.task} · requests ${utc(r.first_request_ts)} → ${utc(r.last_request_ts)}`
      : r.task || "no paired requests yet";
  }

  function tile(key, label, value, note, opts) {
    opts = opts || {};
    const raw = "raw" in opts ? opts.raw : value;
    return el(
      "div",
      { class: "tile", "data-key": key, "data-value": raw === null ? "" : raw },
      el("div", { class: "kicker", text: label }),
      el("div", { class: "value" + (opts.warn ? " warn" : "") }, value),
      el("div", { class: "note", text: note || "" })
    );
  }

  function renderTiles(r, s) {
    const c = r.counts;
    const lb = r.labels || {};
    const dead = Object.entries(r.dead_letters || {})
      .map(([k, v]) => `${k} ${v}`)
      .join(" · ");
    const reg = r.task === "regression";
    const lat = (m) =>
      isNum(s[`latency_p50_${m}`])
        ? `${s[`latency_p50_${m}`].toFixed(1)} / ${s[`latency_p95_${m}`].toFixed(1)} ms`
        : "n/a";
    const tiles = [
      tile("paired", "Paired", int(c.paired), "A and B both answered", { raw: c.paired }),
      tile("labelled", "Labelled", int(c.labelled), "paired with a ground truth", {
        raw: c.labelled,
      }),
      tile("coverage", "Label coverage", pct(c.paired ? c.labelled / c.paired : null),
        `labelled / paired · ${int(lb.waiting)} waiting for a label`, {
        raw: c.paired ? c.labelled / c.paired : "",
      }),
      tile("label_delay", "Label delay p50", dur(s.label_delay_p50_s),
        `p90 ${dur(lb.delay_p90_s)} · p99 ${dur(lb.delay_p99_s)} (label − request time)`, {
        raw: isNum(s.label_delay_p50_s) ? s.label_delay_p50_s : "",
      }),
      tile("unknown_labels", "Labels, no request", int(lb.unknown_request_labels), "label without request (dead letters)", {
        raw: isNum(lb.unknown_request_labels) ? lb.unknown_request_labels : "",
        warn: lb.unknown_request_labels > 0,
      }),
      tile("dead_letters", "Dead letters", int(c.dead_letters), dead || "none", {
        raw: c.dead_letters,
        warn: c.dead_letters > 0,
      }),
      tile("missing_a", "Missing A", int(c.missing_a), "B answered, A did not", {
        raw: c.missing_a,
        warn: c.missing_a > 0,
      }),
      tile("missing_b", "Missing B", int(c.missing_b), "A answered, B did not", {
        raw: c.missing_b,
        warn: c.missing_b > 0,
      }),
      reg
        ? tile("mean_abs_diff", "Mean |A − B|", num(s.mean_abs_diff, 3), "between predictions", {
            raw: isNum(s.mean_abs_diff) ? s.mean_abs_diff : "",
          })
        : tile("agreement", "Agreement", pct(s.agreement), "same predicted class", {
            raw: isNum(s.agreement) ? s.agreement : "",
          }),
      reg
        ? tile("flip_rate", "Flip rate", "n/a", "classification only", { raw: "" })
        : tile(
            "flip_rate",
            "Flip rate",
            pct(s.flip_rate),
            `B fixes ${pct(s.fixed_rate)} · breaks ${pct(s.broken_rate)}`,
            { raw: isNum(s.flip_rate) ? s.flip_rate : "" }
          ),
      tile(
        "latency",
        "Latency p50 / p95",
        [
          el("div", { class: "lat a", text: "A " + lat("a") }),
          el("div", { class: "lat b", text: "B " + lat("b") }),
        ],
        "",
        { raw: "" }
      ),
    ];
    $("counts").replaceChildren(...tiles);
  }

  function forest(lo, diff, hi, colour) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 200 16");
    svg.setAttribute("preserveAspectRatio", "none");
    const add = (tag, attrs) => {
      const n = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
      svg.append(n);
    };
    const vals = [lo, diff, hi].filter(isNum).map(Math.abs);
    const ext = Math.max(...vals, 1e-12) * 1.15;
    const x = (v) => 100 + (v / ext) * 96;
    add("line", { x1: 100, x2: 100, y1: 0, y2: 16, stroke: "#b8bec9", "stroke-width": 1 });
    if (isNum(lo) && isNum(hi)) {
      add("rect", { x: x(lo), y: 5, width: Math.max(x(hi) - x(lo), 1), height: 6, fill: colour, opacity: 0.35, rx: 2 });
    }
    if (isNum(diff)) add("rect", { x: x(diff) - 1.5, y: 2, width: 3, height: 12, fill: colour });
    return svg;
  }

  function renderMetrics(r) {
    $("ci-level").textContent = `${Math.round((1 - r.alpha) * 100)}%`;
    const rows = Object.entries(r.metrics).map(([name, m]) => {
      const hib = m.higher_is_better !== false;
      let cls = "";
      if (isNum(m.ci_low) && isNum(m.ci_high)) {
        if (m.ci_low > 0) cls = hib ? "better" : "worse";
        else if (m.ci_high < 0) cls = hib ? "worse" : "better";
      }
      const colour = cls === "better" ? C.good : cls === "worse" ? C.bad : C.muted;
      return el(
        "tr",
        { "data-metric": name },
        el("td", {}, m.label || name, el("span", { class: "hint", text: hib ? "↑" : "↓" })),
        el("td", { class: "a", text: num(m.a) }),
        el("td", { class: "b", text: num(m.b) }),
        el("td", { class: cls, text: signed(m.diff) }),
        el("td", { class: "ci", text: `[${signed(m.ci_low)}, ${signed(m.ci_high)}]` }),
        el("td", { class: "forest" }, forest(m.ci_low, m.diff, m.ci_high, colour))
      );
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: 6, text: "no labelled pairs yet" })));
    }
    $("metrics").tBodies[0].replaceChildren(...rows);
  }

  function dl(pairs) {
    return el(
      "dl",
      {},
      pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])
    );
  }

  function pill(text, kind) {
    return el("span", { class: "pill" + (kind ? " " + kind : ""), text });
  }

  function renderTests(r) {
    const level = `${Math.round((1 - r.alpha) * 100)}%`;
    const parts = [];
    const s = r.sequential;
    if (s && s.n) {
      const kind = s.decision === "B better" || s.decision === "B not worse" ? "good" : s.decision === "B worse" ? "bad" : "";
      parts.push(
        el("h3", { "data-test": "sequential" }, "Sequential test ", el("small", { text: `on ${r.loss}, always valid` }), pill(s.decision, kind)),
        dl([
          ["labelled pairs", int(s.n)],
          ["mean loss improvement (A − B)", signed(s.mean)],
          [`${level} confidence sequence`, `[${signed(s.lower)}, ${signed(s.upper)}]`],
          ["p (always valid)", pval(s.pvalue_always_valid)],
          ...(r.margin > 0 ? [["p vs margin " + r.margin, pval(s.pvalue_margin)]] : []),
        ])
      );
    } else {
      parts.push(el("h3", { text: "Sequential test" }), el("p", { text: "no labelled pairs yet" }));
    }
    const m = r.mcnemar;
    if (m) {
      const sig = m.pvalue < r.alpha;
      const kind = sig ? (m.b01 > m.b10 ? "good" : "bad") : "";
      const label = sig ? (m.b01 > m.b10 ? "B right more often" : "A right more often") : "no significant difference";
      parts.push(
        el("h3", { "data-test": "mcnemar" }, "McNemar ", el("small", { text: m.exact ? "exact binomial" : "χ², continuity corrected" }), pill(label, kind)),
        dl([
          ["A wrong, B right (b01)", int(m.b01)],
          ["A right, B wrong (b10)", int(m.b10)],
          ["statistic", num(m.statistic, 3)],
          ["p", pval(m.pvalue)],
        ])
      );
    }
    const srm = r.srm;
    if (srm) {
      const label = srm.status === "fired" ? "SRM: verdict withheld" : srm.status === "ok" ? "split as declared" : "skipped";
      parts.push(
        el("h3", { "data-test": "srm" }, "Served split ", el("small", { text: "sample-ratio mismatch check" }), pill(label, srm.fired ? "bad" : "")),
        dl(
          srm.status === "skipped"
            ? [["skipped", srm.reason], ["declared share of B", pct(srm.declared)]]
            : [
                ["served by A / B", `${int(srm.n_a)} / ${int(srm.n_b)}`],
                ["share of B, served / declared", `${pct(srm.observed)} / ${pct(srm.declared)}`],
                ["χ² p (fixed sample)", pval(srm.pvalue_chi2)],
                ["sequential p (always valid)", pval(srm.pvalue_sequential)],
                ["not served", int(srm.not_served)],
                ...(srm.segments && srm.segments.length
                  ? [["segment values checked / skipped", `${int(srm.segments_checked)} / ${int(srm.segments_skipped)}`],
                     ["SRM in segment", (srm.segments_fired || []).join(", ") || "none"]]
                  : []),
              ]
        )
      );
    }
    parts.push(
      el("h3", { "data-test": "bootstrap" }, "Bootstrap intervals ", el("small", { text: "paired, resampling requests" })),
      dl([
        ["method", r.ci_method || "n/a"],
        ["level", level],
        ["non-inferiority margin", String(r.margin)],
      ])
    );
    $("tests-body").replaceChildren(...parts);
  }

  /* --------------------------------------------------------------- segments */
  // report.segments (comparators/segments.py): one row per metric of each tested segment
  // value, tr[data-segment][data-seg-metric][data-flag] ('worse', 'better' or 'none');
  // #segments-warning shown while B is significantly worse somewhere the verdict favours B.
  const segName = (v) => `${v.segment}=${v.value === "" ? "(missing)" : v.value}`;

  function renderSegments(r) {
    const s = r.segments;
    $("segments-section").hidden = !s;
    if (!s) return;
    $("segments-note").textContent =
      `p: the paired test of each metric; q: Benjamini-Hochberg over ${int(s.n_tests)} tests ` +
      `(${s.scope}); flagged where q < ${s.alpha}`;
    const hidden = s.b_worse_despite_verdict || [];
    const warn = $("segments-warning");
    warn.hidden = !hidden.length;
    warn.textContent = hidden.length
      ? `B is significantly worse for ${hidden.map((v) => `${segName(v)} (${v.metrics.join(", ")})`).join("; ")} although the verdict is ${s.verdict}`
      : "";
    const rows = [];
    for (const v of s.values) {
      if (v.status !== "tested") continue; // listed below, not tested
      Object.values(v.metrics).forEach((m, i) => {
        const flag = m.b_worse ? "worse" : m.significant ? "better" : "";
        const info = r.metrics[m.metric] || {};
        rows.push(
          el(
            "tr",
            { "data-segment": segName(v), "data-seg-metric": m.metric, "data-flag": flag || "none" },
            el("td", { text: i === 0 ? segName(v) : "" }),
            el("td", { text: i === 0 ? int(v.n) : "" }),
            el("td", { class: "name" }, info.label || m.metric, el("span", { class: "hint", text: m.higher_is_better ? "↑" : "↓" })),
            el("td", { class: "a", text: num(m.a) }),
            el("td", { class: "b", text: num(m.b) }),
            el("td", { class: flag, text: signed(m.diff) }),
            el("td", { class: "ci", text: `[${signed(m.ci_low)}, ${signed(m.ci_high)}]` }),
            el("td", { text: pval(m.pvalue), title: m.test + (m.note ? `: ${m.note}` : "") }),
            el("td", { class: flag, text: pval(m.qvalue) })
          )
        );
      });
    }
    const few = s.too_few || [];
    if (few.length) {
      const total = s.too_few_count ?? few.length;
      const shown = few.slice(0, 20).map((v) => `${segName(v)} (${v.n})`).join(", ");
      const more = total > 20 ? ` and ${total - 20} more` : "";
      rows.push(
        el("tr", { "data-too-few": total },
          el("td", { colspan: 9, class: "few", text: `too few labelled pairs (< ${s.min_labelled}), not tested: ${shown}${more}` }))
      );
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9, text: s.note || "no segment values yet" })));
    $("segments").tBodies[0].replaceChildren(...rows);
  }

  /* ------------------------------------------------------------------ charts */
  function chartBox(parent, id, title, subtitle) {
    let box = document.getElementById(id);
    if (!box) {
      box = el("div", { class: "chart", id, "data-points": 0 });
      parent.append(
        el("div", { class: "card chart-card", id: id + "-card" }, el("h3", {}, title + " ", el("small", { text: subtitle || "" })), box)
      );
    }
    return box;
  }

  const tzDate = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
  const two = (n) => String(n).padStart(2, "0");

  /** Tick labels in UTC, 24 h: seconds for short spans, the date for long ones. */
  function timeTicks(u, splits) {
    const span = (u.scales.x.max || 0) - (u.scales.x.min || 0);
    const seconds = splits.some((ts) => ts % 60 !== 0);
    return splits.map((ts) => {
      const d = new Date(ts * 1e3);
      const hm = `${two(d.getUTCHours())}:${two(d.getUTCMinutes())}`;
      if (seconds) return `${hm}:${two(d.getUTCSeconds())}`;
      if (span < 2 * 86400) return hm;
      return `${two(d.getUTCMonth() + 1)}-${two(d.getUTCDate())} ${hm}`;
    });
  }

  /** Draw (or update) one chart: xs in epoch seconds, series [{label, values, stroke, ...}]. */
  function draw(box, xs, series, opts) {
    opts = opts || {};
    const key = series.map((s) => s.label).join("|") + "|" + (opts.key || "");
    const data = [xs, ...series.map((s) => s.values)];
    let u = state.charts.get(box.id);
    if (!xs.length) {
      if (u) u.destroy();
      state.charts.delete(box.id);
      box.replaceChildren(el("div", { class: "empty", text: "no data yet" }));
      box.dataset.points = "0";
      return;
    }
    if (u && u._abdagKey === key) {
      u.setData(data);
    } else {
      if (u) u.destroy();
      box.replaceChildren();
      const yfmt = opts.percent
        ? (_, vals) => vals.map((v) => (v == null ? "" : (100 * v).toFixed(0) + "%"))
        : undefined;
      u = new uPlot(
        {
          width: Math.max(box.clientWidth, 200),
          height: opts.height || 155,
          padding: [10, 22, 0, 0],
          tzDate,
          legend: { live: false },
          cursor: { drag: { x: false, y: false } },
          scales: { x: { time: true }, y: opts.range ? { range: opts.range } : { auto: true } },
          axes: [
            { stroke: "#6b7280", grid: { stroke: C.grid }, ticks: { stroke: C.grid }, values: timeTicks, size: 32 },
            { stroke: "#6b7280", grid: { stroke: C.grid }, ticks: { stroke: C.grid }, size: 52, values: yfmt },
          ],
          series: [
            { label: "time (UTC)" },
            ...series.map((s) => ({
              label: s.label,
              stroke: s.stroke,
              width: s.width || 2,
              dash: s.dash,
              spanGaps: true,
              points: { show: xs.length <= 40 && !s.noPoints, size: 5 },
            })),
          ],
          bands: opts.bands,
        },
        data,
        box
      );
      u._abdagKey = key;
      state.charts.set(box.id, u);
    }
    box.dataset.points = String(xs.length);
  }

  function col(rows, key) {
    return rows.map((r) => (isNum(r[key]) ? r[key] : null));
  }

  function renderMetricCharts(tl) {
    const parent = $("metric-charts");
    const ids = new Set(tl.metrics.map((m) => "chart-" + m));
    for (const card of [...parent.children]) {
      const id = card.id.replace(/-card$/, "");
      if (!ids.has(id)) {
        const u = state.charts.get(id);
        if (u) u.destroy();
        state.charts.delete(id);
        card.remove();
      }
    }
    const xs = tl.buckets.map((b) => b.t);
    for (const m of tl.metrics) {
      const info = (tl.metric_info || {})[m] || {};
      const better = info.higher_is_better === false ? "lower is better" : "higher is better";
      const box = chartBox(parent, "chart-" + m, info.label || m, better);
      draw(box, xs, [
        { label: "A", values: col(tl.buckets, m + "_a"), stroke: C.a },
        { label: "B", values: col(tl.buckets, m + "_b"), stroke: C.b },
      ]);
    }
  }

  function renderOpsCharts(r, tl) {
    const parent = $("ops-charts");
    const b = tl.buckets;
    const xs = b.map((x) => x.t);
    const level = `${Math.round((1 - r.alpha) * 100)}%`;

    const seq = tl.sequential || [];
    const sx = seq.map((p) => p.t);
    const series = [
      { label: "mean", values: seq.map((p) => p.mean), stroke: C.ink },
      { label: "CS low", values: seq.map((p) => p.lower), stroke: C.good, width: 1 },
      { label: "CS high", values: seq.map((p) => p.upper), stroke: C.good, width: 1 },
      { label: "0", values: seq.map(() => 0), stroke: C.muted, dash: [4, 4], width: 1, noPoints: true },
    ];
    if (r.margin > 0) {
      series.push({ label: "−margin", values: seq.map(() => -r.margin), stroke: C.bad, dash: [6, 3], width: 1, noPoints: true });
    }
    draw(
      chartBox(parent, "chart-sequential", "Loss improvement A − B", `${level} always-valid CS, by label time`),
      sx,
      series,
      { bands: [{ series: [3, 2], fill: "rgba(31,138,76,0.12)" }], key: String(r.margin > 0) }
    );

    if (tl.task === "regression") {
      draw(chartBox(parent, "chart-agreement", "Mean |A − B|", "between predictions"), xs, [
        { label: "mean |A − B|", values: col(b, "mean_abs_diff"), stroke: C.purple },
      ]);
    } else {
      draw(
        chartBox(parent, "chart-agreement", "Agreement and flips", "share of pairs"),
        xs,
        [
          { label: "agree", values: col(b, "agreement"), stroke: C.purple },
          { label: "flip", values: col(b, "flip_rate"), stroke: C.ink },
          { label: "B fixes", values: col(b, "fixed_rate"), stroke: C.good, dash: [5, 3] },
          { label: "B breaks", values: col(b, "broken_rate"), stroke: C.bad, dash: [5, 3] },
        ],
        { percent: true, range: [0, 1] }
      );
    }

    draw(chartBox(parent, "chart-latency", "Latency", "ms, p50 and p95 per model"), xs, [
      { label: "A p50", values: col(b, "latency_p50_a"), stroke: C.a },
      { label: "A p95", values: col(b, "latency_p95_a"), stroke: C.a, dash: [5, 3], width: 1.5 },
      { label: "B p50", values: col(b, "latency_p50_b"), stroke: C.b },
      { label: "B p95", values: col(b, "latency_p95_b"), stroke: C.b, dash: [5, 3], width: 1.5 },
    ]);

    draw(chartBox(parent, "chart-traffic", "Traffic", `requests per ${tl.bucket_seconds} s bucket`), xs, [
      { label: "paired", values: col(b, "paired"), stroke: C.ink },
      { label: "labelled", values: col(b, "labelled"), stroke: C.teal },
      { label: "missing A", values: col(b, "missing_a"), stroke: C.a, dash: [5, 3] },
      { label: "missing B", values: col(b, "missing_b"), stroke: C.b, dash: [5, 3] },
    ]);

    draw(
      chartBox(parent, "chart-coverage", "Label coverage", "labelled / paired"),
      xs,
      [
        { label: "per bucket", values: col(b, "coverage"), stroke: C.teal },
        { label: "cumulative", values: col(b, "cum_coverage"), stroke: C.ink, dash: [5, 3] },
      ],
      { percent: true, range: [0, 1.05] }
    );

    draw(chartBox(parent, "chart-delay", "Label delay", "p50 and p90 of label time − request time, s"), xs, [
      { label: "p50 delay (s)", values: col(b, "label_delay_p50_s"), stroke: C.purple },
      { label: "p90 delay (s)", values: col(b, "label_delay_p90_s"), stroke: C.purple, dash: [5, 3], width: 1.5 },
    ]);
  }

  /* ------------------------------------------------------------------ wiring */
  function resetCharts() {
    for (const u of state.charts.values()) u.destroy();
    state.charts.clear();
    $("metric-charts").replaceChildren();
    $("ops-charts").replaceChildren();
  }

  function syncUrl() {
    const q = new URLSearchParams(location.search);
    q.set("experiment", state.experiment);
    for (const [k, id] of [["bucket", "bucket"], ["margin", "margin"]]) {
      const v = $(id).value;
      if (v && v !== "0") q.set(k, v);
      else q.delete(k);
    }
    history.replaceState(null, "", "?" + q);
  }

  function init() {
    if (params.get("bucket")) {
      const sel = $("bucket");
      const v = params.get("bucket");
      if (![...sel.options].some((o) => o.value === v)) {
        sel.append(el("option", { value: v, text: `${v} s` }));
      }
      sel.value = v;
    }
    if (params.get("margin")) $("margin").value = params.get("margin");
    $("every").textContent = String(REFRESH_MS / 1000);
    $("experiment").addEventListener("change", (e) => {
      state.experiment = e.target.value;
      syncUrl();
      resetCharts();
      refresh();
    });
    for (const id of ["bucket", "margin"]) {
      $(id).addEventListener("change", () => {
        syncUrl();
        refresh();
      });
    }
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        for (const [id, u] of state.charts) {
          const box = document.getElementById(id);
          if (box) u.setSize({ width: Math.max(box.clientWidth, 200), height: u.height });
        }
      }, 150);
    });
    refresh();
    setInterval(refresh, REFRESH_MS);
  }

  init();
})();
