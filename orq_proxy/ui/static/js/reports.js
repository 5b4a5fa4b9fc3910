// Reports: one metric over a range, by grain, grouped by a dimension, in a time zone (POST /v2/reporting);
// a chart and a table of the same rows, and the table as CSV.

import { errorBox, field, h, replace, select } from "./dom.js";
import { timeChart } from "./charts.js";
import { count, dateTime, money, number, percent } from "./format.js";

const METRICS = [
  ["genai.cost", "Cost (USD)"],
  ["genai.requests", "Requests"],
  ["genai.tokens", "Tokens"],
  ["genai.errors", "Errors"],
  ["genai.error_rate", "Error rate"],
  ["genai.latency.p50", "Latency p50 (ms)"],
  ["genai.latency.p95", "Latency p95 (ms)"],
  ["genai.latency.p99", "Latency p99 (ms)"],
  ["genai.ttft.avg", "Time to first token, average (ms)"],
  ["genai.ttft.p50", "Time to first token p50 (ms)"],
  ["genai.ttft.p95", "Time to first token p95 (ms)"],
];
const RANGES = [
  ["3600", "Last hour"],
  ["21600", "Last 6 hours"],
  ["86400", "Last 24 hours"],
  ["604800", "Last 7 days"],
  ["2592000", "Last 30 days"],
];
const GRAINS = [["auto", "Automatic"], ["minute", "Minute"], ["hour", "Hour"], ["day", "Day"]];
const GROUPS = [["", "Nothing"], ["identity", "Identity"], ["model", "Model"], ["provider", "Provider"], ["project", "Project"], ["api_key", "API key"]];
const ZONES = ["UTC", "Europe/Amsterdam", "Europe/London", "America/New_York", "America/Los_Angeles", "Asia/Tokyo", "Australia/Sydney"];
const MAX_SERIES = 10;
const COUNTED = new Set(["genai.cost", "genai.requests", "genai.tokens", "genai.errors"]);

const view = { metric: "genai.cost", range: "604800", grain: "day", group: "identity", zone: "UTC" };

function formatter(metric) {
  if (metric === "genai.cost") return (v) => money(v);
  if (metric === "genai.error_rate") return (v) => percent(v);
  if (metric === "genai.requests" || metric === "genai.tokens" || metric === "genai.errors") return (v) => count(v);
  return (v) => `${number(v)} ms`;
}

/** One CSV field: quoted when needed; text that a spreadsheet would run as a formula is defused. */
function csvField(value) {
  if (typeof value === "number") return String(value);
  let text = String(value ?? "");
  if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

export function toCsv(header, rows) {
  return [header, ...rows].map((row) => row.map(csvField).join(",")).join("\r\n") + "\r\n";
}

const STEPS = { minute: 60, hour: 3600, day: 86400 };

/** Every bucket start of the range (so empty buckets show), anchored on the answer's own timestamps. */
function buckets(rows, grain, body) {
  const seen = new Set(rows.map((r) => Date.parse(r.timestamp) / 1000));
  const step = STEPS[grain];
  const from = Date.parse(body.from) / 1000;
  const to = Date.parse(body.to) / 1000;
  if (step && (to - from) / step <= 2000) {
    const anchor = seen.size ? Math.min(...seen) : Math.floor(from / step) * step;
    for (let t = anchor; t > from - step; t -= step) seen.add(t);
    for (let t = anchor; t < to; t += step) seen.add(t);
  }
  return [...seen].sort((a, b) => a - b);
}

export async function reportsPage(container, ctx) {
  const metric = select({ name: "metric" }, METRICS, view.metric);
  const range = select({ name: "range" }, RANGES, view.range);
  const grain = select({ name: "grain" }, GRAINS, view.grain);
  const group = select({ name: "group_by" }, GROUPS, view.group);
  const zone = h("input", { name: "time_zone", value: view.zone, list: "zones", autocomplete: "off", spellcheck: "false" });
  const zones = h("datalist", { id: "zones" }, ZONES.map((z) => h("option", { value: z })));
  const chartSlot = h("div", { class: "chart", id: "report-chart" });
  const tableSlot = h("div", { class: "table-slot", id: "report-table" });
  const meta = h("p", { class: "muted small", id: "report-meta", "aria-live": "polite" });
  const download = h("button", { type: "button", class: "ghost", disabled: true, id: "csv-download" }, "Download CSV");
  let csv = null;

  download.addEventListener("click", () => {
    if (!csv) return;
    const blob = new Blob([csv.text], { type: "text/csv;charset=utf-8" });
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: csv.name, class: "sr-only" }, "download");
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });

  async function run() {
    Object.assign(view, { metric: metric.value, range: range.value, grain: grain.value, group: group.value, zone: zone.value.trim() || "UTC" });
    const now = new Date();
    now.setUTCMilliseconds(0);
    const body = {
      metric: view.metric,
      from: new Date(now.getTime() - Number(view.range) * 1000).toISOString().replace(".000Z", "Z"),
      to: now.toISOString().replace(".000Z", "Z"),
      grain: view.grain,
      time_zone: view.zone,
      include_totals: true,
      limit: 5000,
    };
    if (view.group) body.group_by = [view.group];
    let report;
    download.disabled = true;
    tableSlot.setAttribute("aria-busy", "true");
    try {
      report = await ctx.api.post("/v2/reporting", body);
    } catch (err) {
      tableSlot.removeAttribute("aria-busy");
      if (err.status === 403) throw err;
      replace(chartSlot);
      replace(tableSlot, errorBox(err.message));
      meta.textContent = "";
      return;
    }
    if (!ctx.isCurrent()) return;
    tableSlot.removeAttribute("aria-busy");
    await show(report, body);
  }

  async function show(report, body) {
    const rows = report.data || [];
    const fmt = formatter(body.metric);
    const dim = body.group_by ? body.group_by[0] : null;
    const label = METRICS.find(([v]) => v === body.metric)[1];
    const effective = (report.meta && report.meta.effective_grain) || body.grain;
    meta.textContent = `${rows.length} rows · ${effective} buckets · ${dateTime(body.from)} to ${dateTime(body.to)} · time zone ${body.time_zone}`;

    // Chart: one series per group value (the largest ones), over every bucket of the answer.
    const xs = buckets(rows, effective, body);
    const groups = new Map();
    for (const row of rows) {
      const key = dim ? (row.dimensions || {})[dim] || "(none)" : label;
      if (!groups.has(key)) groups.set(key, { total: 0, byTime: new Map() });
      const value = Number(row.metrics[body.metric] || 0);
      const g = groups.get(key);
      g.total += value;
      g.byTime.set(Date.parse(row.timestamp) / 1000, value);
    }
    const top = [...groups.entries()].sort((a, b) => b[1].total - a[1].total).slice(0, MAX_SERIES);
    if (xs.length) {
      // Buckets without a row have no events: 0 for counts and sums, a gap for rates and quantiles.
      const empty = COUNTED.has(body.metric) ? 0 : null;
      const range = [Date.parse(body.from) / 1000, Date.parse(body.to) / 1000];
      await timeChart(chartSlot, xs, top.map(([name, g]) => ({
        label: name, values: xs.map((t) => (g.byTime.has(t) ? g.byTime.get(t) : empty)), format: fmt,
      })), { xRange: [Math.min(range[0], xs[0]), range[1]] });
    } else {
      replace(chartSlot, h("p", { class: "empty" }, "No data in this range."));
    }

    // Table and CSV: the same rows, in the API's order (CSV keeps the raw numbers).
    const header = ["timestamp", ...(dim ? [dim] : []), body.metric];
    const records = rows.map((r) => [r.timestamp || "", ...(dim ? [(r.dimensions || {})[dim] || ""] : []), Number(r.metrics[body.metric] || 0)]);
    csv = { name: `report-${body.metric.replace("genai.", "")}-${body.to.slice(0, 10)}.csv`, text: toCsv(header, records) };
    download.disabled = rows.length === 0;
    replace(
      tableSlot,
      rows.length
        ? h("div", { class: "table-wrap" }, h(
            "table",
            { class: "data" },
            h("caption", { class: "sr-only" }, `${label} by ${dim || "time"}`),
            h("thead", null, h("tr", null,
              h("th", { scope: "col" }, "Time (UTC)"),
              dim ? h("th", { scope: "col" }, GROUPS.find(([v]) => v === dim)[1]) : null,
              h("th", { scope: "col", class: "num" }, label))),
            h("tbody", null, records.map((r) => h("tr", null,
              h("td", null, dateTime(r[0])),
              dim ? h("td", null, r[1]) : null,
              h("td", { class: "num" }, fmt(r[r.length - 1]))))),
            report.totals && report.totals.metrics && body.metric in report.totals.metrics
              ? h("tfoot", null, h("tr", null,
                  h("th", { scope: "row", colspan: dim ? 2 : 1 }, "Total"),
                  h("td", { class: "num" }, fmt(report.totals.metrics[body.metric]))))
              : null,
          ))
        : h("p", { class: "empty" }, "No rows."),
    );
  }

  replace(
    container,
    h("div", { class: "page-head" }, h("h1", null, "Reports"), download),
    h(
      "form",
      { class: "filters", on: { submit: (e) => { e.preventDefault(); run(); } } },
      field("Metric", metric),
      field("Range", range),
      field("Grain", grain),
      field("Group by", group),
      field("Time zone", zone),
      zones,
      h("button", { type: "submit" }, "Run report"),
    ),
    meta,
    h("section", { class: "card", "aria-label": "Chart" }, chartSlot),
    tableSlot,
  );
  await run();
}
