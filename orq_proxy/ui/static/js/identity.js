// One identity: its record, edit, delete (confirmed), its budget as a ring with Reset, and its cost and
// requests over the last 30 days (POST /v2/reporting filtered to the identity).

import { seg } from "./api.js";
import { announce, confirmDialog, errorBox, field, h, modal, replace, svg } from "./dom.js";
import { timeChart } from "./charts.js";
import { budgetForm, scopeText } from "./budgets.js";
import { count, dateTime, money, number, percent, periodEnd, periodName } from "./format.js";

const DAY = 86400;

export async function identityPage(container, ctx, ref) {
  const { identity } = await ctx.api.get(`/v2/identities/${seg(ref)}`, { include_metrics: "true" });
  if (!ctx.isCurrent()) return;
  const m = identity.metrics || {};
  const budgetSlot = h("section", { class: "card budget-card", "aria-labelledby": "budget-title" });
  const chartSlot = h("div", { class: "chart", id: "identity-chart" });
  const name = identity.display_name || identity.external_id;

  replace(
    container,
    h("p", { class: "crumbs" }, h("a", { href: "#/identities" }, "‹ Identities")),
    h(
      "div",
      { class: "page-head" },
      h("div", null, h("h1", { id: "identity-name" }, name), h("div", { class: "sub" }, identity.external_id)),
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", class: "ghost", on: { click: () => edit(ctx, identity) } }, "Edit"),
        h("button", { type: "button", class: "danger", on: { click: () => remove(ctx, identity) } }, "Delete"),
      ),
    ),
    h(
      "div",
      { class: "stats" },
      stat("Requests (30 d)", count(m.total_requests)),
      stat("Cost (30 d)", money(m.total_cost)),
      stat("Tokens (30 d)", count(m.total_tokens)),
      stat("Error rate", percent(m.error_rate)),
    ),
    h(
      "div",
      { class: "grid-2" },
      h("section", { class: "card", "aria-labelledby": "record-title" }, h("h2", { id: "record-title" }, "Record"), record(identity)),
      budgetSlot,
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "chart-title" },
      h("h2", { id: "chart-title" }, "Cost and requests, last 30 days"),
      chartSlot,
    ),
  );
  await Promise.all([showBudget(budgetSlot, ctx, identity), showChart(chartSlot, ctx, identity)]);
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value" }, value));
}

function record(identity) {
  const metadata = Object.entries(identity.metadata || {});
  const row = (label, value) => [h("dt", null, label), h("dd", null, value)];
  return h(
    "dl",
    { class: "record" },
    row("External ID", identity.external_id),
    row("Display name", identity.display_name || "—"),
    row("Email", identity.email || "—"),
    row("Tags", (identity.tags || []).length ? identity.tags.map((t) => h("span", { class: "tag" }, t)) : "—"),
    row(
      "Metadata",
      metadata.length
        ? h("ul", { class: "kv" }, metadata.map(([k, v]) => h("li", null, h("code", null, k), ": ", typeof v === "string" ? v : JSON.stringify(v))))
        : "—",
    ),
    row("Created", dateTime(identity.created)),
    row("Updated", dateTime(identity.updated)),
    row("ID", h("code", null, identity._id)),
  );
}

async function identityBudget(ctx, identity) {
  const page = await ctx.api.get("/v2/budgets", {
    scope_kind: "BUDGET_SCOPE_KIND_IDENTITY",
    scope_target_id: identity.external_id,
    limit: 1,
  });
  return (page.data || [])[0] || null;
}

/** The ring: consumed of the limit (cost if it has one, else tokens), percent, period, reset time. */
export function ring(budget) {
  const usage = budget.usage || { amount: 0, tokens: 0, requests: 0 };
  const limits = budget.limits || {};
  const byCost = limits.amount !== undefined && limits.amount !== null;
  const used = byCost ? usage.amount : usage.tokens;
  const limit = byCost ? limits.amount : limits.tokenLimit;
  const fraction = limit ? Math.min(used / limit, 1) : 0;
  const radius = 52;
  const circumference = 2 * Math.PI * radius;
  const over = limit && used >= limit;
  const text = byCost ? `${money(used)} of ${money(limit)}` : `${count(used)} of ${count(limit)} tokens`;
  return h(
    "div",
    { class: "ring", role: "img", "aria-label": `${percent(fraction)} used: ${text}`, dataset: { percent: Math.round(fraction * 100) } },
    svg(
      "svg",
      { viewBox: "0 0 128 128", width: 128, height: 128, "aria-hidden": "true" },
      svg("circle", { cx: 64, cy: 64, r: radius, class: "ring-track" }),
      svg("circle", {
        cx: 64, cy: 64, r: radius,
        class: over ? "ring-value over" : "ring-value",
        "stroke-dasharray": `${(fraction * circumference).toFixed(2)} ${circumference.toFixed(2)}`,
        transform: "rotate(-90 64 64)",
      }),
      svg("text", { x: 64, y: 70, "text-anchor": "middle", class: "ring-text" }, percent(fraction)),
    ),
    h("div", { class: "ring-facts" },
      h("div", { class: "ring-used", id: "ring-used" }, text),
      h("div", null, `${periodName(limits.period)} budget`),
      limits.tokenLimit && byCost ? h("div", { class: "muted" }, `${count(usage.tokens)} of ${count(limits.tokenLimit)} tokens`) : null,
      resetLine(budget),
    ),
  );
}

export function resetLine(budget) {
  const end = periodEnd((budget.limits || {}).period);
  if (!end) return h("div", { class: "muted" }, "Never resets (one-time budget)");
  const zone = budget.timeZone ? ` (${budget.timeZone} midnight; shown for UTC)` : "";
  return h("div", { class: "muted" }, `Resets ${dateTime(end)}${zone}`);
}

async function showBudget(slot, ctx, identity) {
  const title = h("h2", { id: "budget-title" }, "Budget");
  let budget;
  try {
    budget = await identityBudget(ctx, identity);
  } catch (err) {
    replace(slot, title, errorBox(err.message));
    return;
  }
  if (!ctx.isCurrent()) return;
  if (!budget) {
    replace(
      slot,
      title,
      h("p", { class: "muted" }, "No budget for this identity."),
      h("button", {
        type: "button",
        on: {
          click: async () => {
            const created = await budgetForm(ctx, null, { kind: "identity", target: identity.external_id });
            if (created) showBudget(slot, ctx, identity);
          },
        },
      }, "Add budget"),
    );
    return;
  }
  const resetButton = h("button", {
    type: "button",
    id: "budget-reset",
    on: {
      click: async () => {
        resetButton.disabled = true;
        try {
          await ctx.api.post(`/v2/budgets/${seg(budget.budgetId)}/reset-consumption`, {});
          announce("Budget usage reset.");
        } catch (err) {
          announce(`Reset failed: ${err.message}`, "error");
        }
        showBudget(slot, ctx, identity);
      },
    },
  }, "Reset");
  replace(
    slot,
    title,
    budget.isActive ? null : h("p", { class: "badge off" }, "Disabled"),
    ring(budget),
    h("p", { class: "muted small" }, scopeText(budget)),
    h("div", { class: "actions" },
      h("button", {
        type: "button", class: "ghost",
        on: { click: async () => { if (await budgetForm(ctx, budget)) showBudget(slot, ctx, identity); } },
      }, "Edit budget"),
      resetButton,
    ),
  );
}

/** Day buckets (UTC) for the last 30 days, today included: [from, to) and the bucket starts. */
function last30Days() {
  const today = Math.floor(Date.now() / 1000 / DAY) * DAY;
  const from = today - 29 * DAY;
  const to = today + DAY;
  const xs = [];
  for (let t = from; t < to; t += DAY) xs.push(t);
  return { from, to, xs };
}

async function showChart(slot, ctx, identity) {
  const { from, to, xs } = last30Days();
  const query = (metric) =>
    ctx.api.post("/v2/reporting", {
      metric,
      from: new Date(from * 1000).toISOString(),
      to: new Date(to * 1000).toISOString(),
      grain: "day",
      filters: [{ field: "identity", op: "eq", values: [identity.external_id] }],
    });
  let cost;
  let requests;
  try {
    [cost, requests] = await Promise.all([query("genai.cost"), query("genai.requests")]);
  } catch (err) {
    replace(slot, errorBox(`No chart: ${err.message}`));
    return;
  }
  if (!ctx.isCurrent()) return;
  const series = (report, metric) => {
    const byTime = new Map();
    for (const row of report.data || []) {
      const t = Math.floor(Date.parse(row.timestamp) / 1000 / DAY) * DAY;
      byTime.set(t, (byTime.get(t) || 0) + Number(row.metrics[metric] || 0));
    }
    return xs.map((t) => byTime.get(t) || 0);
  };
  await timeChart(slot, xs, [
    { label: "Cost (USD)", values: series(cost, "genai.cost"), format: (v) => money(v), bars: true },
    { label: "Requests", values: series(requests, "genai.requests"), format: (v) => number(v), axis: "right" },
  ], { xRange: [from - DAY / 2, to - DAY / 2] });
}

function edit(ctx, identity) {
  return modal("Edit identity", (close) => {
    const displayName = h("input", { name: "display_name", value: identity.display_name || "", autocomplete: "off" });
    const email = h("input", { name: "email", type: "email", value: identity.email || "", autocomplete: "off" });
    const tags = h("input", { name: "tags", value: (identity.tags || []).join(", "), autocomplete: "off" });
    const metadata = h("textarea", { name: "metadata", rows: 4, spellcheck: "false" });
    metadata.value = JSON.stringify(identity.metadata || {}, null, 2);
    const problem = h("div");
    return h(
      "form",
      {
        class: "stack",
        on: {
          submit: async (event) => {
            event.preventDefault();
            let meta;
            try {
              meta = JSON.parse(metadata.value || "{}");
              if (!meta || typeof meta !== "object" || Array.isArray(meta)) throw new Error("not an object");
            } catch {
              replace(problem, errorBox("Metadata must be a JSON object, e.g. {\"plan\": \"pro\"}."));
              return;
            }
            try {
              await ctx.api.patch(`/v2/identities/${seg(identity._id)}`, {
                display_name: displayName.value.trim(),
                email: email.value.trim(),
                tags: [...new Set(tags.value.split(",").map((t) => t.trim()).filter(Boolean))],
                metadata: meta,
              });
            } catch (err) {
              replace(problem, errorBox(err.message));
              return;
            }
            close(true);
            announce("Identity saved.");
            window.dispatchEvent(new HashChangeEvent("hashchange"));
          },
        },
      },
      field("External ID", h("input", { value: identity.external_id, readonly: true }), "Cannot be changed."),
      field("Display name", displayName),
      field("Email", email),
      field("Tags", tags, "Comma separated."),
      field("Metadata (JSON object)", metadata),
      problem,
      h("div", { class: "actions" },
        h("button", { type: "button", class: "ghost", on: { click: () => close(false) } }, "Cancel"),
        h("button", { type: "submit" }, "Save"),
      ),
    );
  });
}

async function remove(ctx, identity) {
  const name = identity.display_name || identity.external_id;
  const sure = await confirmDialog(
    "Delete identity",
    `Delete ${name} (${identity.external_id})? Its metrics and its budget are deleted too. This cannot be undone.`,
    "Delete identity",
  );
  if (!sure) return;
  try {
    await ctx.api.delete(`/v2/identities/${seg(identity._id)}`);
  } catch (err) {
    announce(`Delete failed: ${err.message}`, "error");
    return;
  }
  announce(`Identity ${identity.external_id} deleted.`);
  ctx.navigate("#/identities");
}
