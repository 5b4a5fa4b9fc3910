// Budgets: every budget with its live usage (GET /v2/budgets sends `usage`), create, edit, disable or
// enable, reset.

import { seg } from "./api.js";
import { announce, errorBox, field, h, modal, replace, select } from "./dom.js";
import { count, dateTime, money, percent, PERIODS, periodEnd, periodName } from "./format.js";

const PAGE_SIZE = 50;
const SCOPES = [
  ["workspace", "Workspace", null],
  ["project", "Project", "project_id"],
  ["identity", "Identity", "identity_external_id"],
  ["api_key", "API key", "api_key_id"],
  ["provider", "Provider", "provider"],
  ["model", "Model", "model_id"],
  ["cel", "Custom (CEL expression)", null],
];
// camelCase response keys of each scope's target.
const TARGET_KEYS = {
  project: "projectId", identity: "identityExternalId", apiKey: "apiKeyId", provider: "provider", model: "modelId",
};
const SCOPE_NAMES = { workspace: "Workspace", project: "Project", identity: "Identity", apiKey: "API key", provider: "Provider", model: "Model" };

/** "Identity: alice" / "Workspace" / "CEL: metadata.team == "ml"" — as text. */
export function scopeText(budget) {
  const scope = budget.scope;
  if (!scope) return `CEL: ${(budget.match && budget.match.cel) || "(matches everything)"}`;
  const kind = Object.keys(scope)[0];
  const target = TARGET_KEYS[kind] ? scope[kind][TARGET_KEYS[kind]] : null;
  return target ? `${SCOPE_NAMES[kind] || kind}: ${target}` : SCOPE_NAMES[kind] || kind;
}

function expired(budget) {
  return budget.expiresAt && Date.parse(budget.expiresAt) <= Date.now();
}

function status(budget) {
  if (expired(budget)) return h("span", { class: "badge off" }, "Expired");
  return budget.isActive ? h("span", { class: "badge on" }, "Active") : h("span", { class: "badge off" }, "Disabled");
}

function limitsText(budget) {
  const limits = budget.limits || {};
  const parts = [];
  if (limits.amount !== undefined) parts.push(money(limits.amount));
  if (limits.tokenLimit !== undefined) parts.push(`${count(limits.tokenLimit)} tokens`);
  if (budget.rateLimit && budget.rateLimit.requestsPerMinute) parts.push(`${count(budget.rateLimit.requestsPerMinute)} req/min`);
  return parts.join(" · ") || "—";
}

function bar(used, limit, label) {
  const fraction = limit ? Math.min(used / limit, 1) : 0;
  const fill = h("div", { class: fraction >= 1 ? "bar-fill over" : "bar-fill" });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM: allowed by the CSP (no inline style attribute)
  return h(
    "div",
    { class: "usage" },
    h("div", { class: "bar", role: "progressbar", "aria-label": label, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(fraction * 100) }, fill),
    h("div", { class: "small" }, label),
  );
}

function usageCell(budget) {
  const usage = budget.usage || { amount: 0, tokens: 0, requests: 0 };
  const limits = budget.limits || {};
  const bars = [];
  if (limits.amount !== undefined) {
    bars.push(bar(usage.amount, limits.amount, `${money(usage.amount)} of ${money(limits.amount)} (${percent(limits.amount ? usage.amount / limits.amount : 0)})`));
  }
  if (limits.tokenLimit !== undefined) {
    bars.push(bar(usage.tokens, limits.tokenLimit, `${count(usage.tokens)} of ${count(limits.tokenLimit)} tokens`));
  }
  if (budget.rateLimit && budget.rateLimit.requestsPerMinute) {
    bars.push(h("div", { class: "small" }, `${count(usage.requests)} requests in the last minute`));
  }
  return bars;
}

export async function budgetsPage(container, ctx) {
  const slot = h("div", { class: "table-slot" });
  const prev = h("button", { type: "button", class: "ghost", disabled: true }, "‹ Previous");
  const next = h("button", { type: "button", class: "ghost", disabled: true }, "Next ›");
  let cursor = null;

  async function load() {
    let page;
    try {
      page = await ctx.api.get("/v2/budgets", {
        limit: PAGE_SIZE, starting_after: cursor && cursor.after, ending_before: cursor && cursor.before,
      });
    } catch (err) {
      if (err.status === 403) throw err;
      replace(slot, errorBox(err.message));
      return;
    }
    if (!ctx.isCurrent()) return;
    const rows = page.data || [];
    prev.disabled = !cursor || (cursor.before ? !page.hasMore : false);
    next.disabled = cursor && cursor.before ? rows.length === 0 : !page.hasMore;
    prev.onclick = () => { if (rows.length) cursor = { before: rows[0].budgetId }; load(); };
    next.onclick = () => { if (rows.length) cursor = { after: rows[rows.length - 1].budgetId }; load(); };
    replace(slot, rows.length ? table(rows) : h("p", { class: "empty" }, "No budgets yet."));
  }

  function table(rows) {
    return h("div", { class: "table-wrap" }, h(
      "table",
      { class: "data stacked", id: "budgets-table" },
      h("caption", { class: "sr-only" }, "Budgets with their usage in the current period"),
      h("thead", null, h("tr", null,
        ["Scope", "Limits", "Period", "Usage", "Status", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", null, rows.map((budget) => h(
        "tr",
        { dataset: { budgetId: budget.budgetId } },
        h("td", { "data-label": "Scope" }, h("div", { class: "scope" }, scopeText(budget))),
        h("td", { "data-label": "Limits" }, limitsText(budget)),
        h("td", { "data-label": "Period" }, periodName((budget.limits || {}).period), h("div", { class: "sub" }, resetsText(budget))),
        h("td", { class: "usage-cell", "data-label": "Usage" }, usageCell(budget)),
        h("td", { "data-label": "Status" }, status(budget), budget.expiresAt ? h("div", { class: "sub" }, `until ${dateTime(budget.expiresAt)}`) : null),
        h("td", { class: "row-actions", "data-label": "Actions" },
          h("button", { type: "button", class: "ghost small", "aria-label": `Edit budget ${scopeText(budget)}`, on: { click: async () => { if (await budgetForm(ctx, budget)) load(); } } }, "Edit"),
          h("button", {
            type: "button", class: "ghost small", "aria-label": `${budget.isActive ? "Disable" : "Enable"} budget ${scopeText(budget)}`,
            on: { click: async () => {
              try {
                await ctx.api.patch(`/v2/budgets/${seg(budget.budgetId)}`, { is_active: !budget.isActive });
                announce(budget.isActive ? "Budget disabled." : "Budget enabled.");
              } catch (err) { announce(err.message, "error"); }
              load();
            } },
          }, budget.isActive ? "Disable" : "Enable"),
          h("button", {
            type: "button", class: "ghost small", "aria-label": `Reset usage of budget ${scopeText(budget)}`,
            on: { click: async () => {
              try {
                await ctx.api.post(`/v2/budgets/${seg(budget.budgetId)}/reset-consumption`, {});
                announce("Budget usage reset.");
              } catch (err) { announce(err.message, "error"); }
              load();
            } },
          }, "Reset"),
        ),
      ))),
    ));
  }

  replace(
    container,
    h("div", { class: "page-head" },
      h("h1", null, "Budgets"),
      h("button", { type: "button", on: { click: async () => { if (await budgetForm(ctx, null)) { cursor = null; load(); } } } }, "Create budget"),
    ),
    h("p", { class: "muted" }, "Spend, token and rate limits; usage is for the current period (requests: the last 60 s)."),
    slot,
    h("div", { class: "pager" }, prev, next),
  );
  await load();
}

function resetsText(budget) {
  const end = periodEnd((budget.limits || {}).period);
  return end ? `resets ${dateTime(end)}` : "";
}

/**
 * Create (budget = null) or edit a budget in a modal; resolves to the saved budget, or undefined.
 * `preset` = {kind, target} fixes the scope of a new budget (the identity page's "Add budget").
 */
export function budgetForm(ctx, budget, preset) {
  const editing = Boolean(budget);
  return modal(editing ? "Edit budget" : "Create budget", (close) => {
    const limits = (budget && budget.limits) || {};
    const kind = select({ name: "scope_kind", disabled: editing || Boolean(preset) }, SCOPES.map(([v, l]) => [v, l]), preset ? preset.kind : "identity");
    const target = h("input", { name: "scope_target", autocomplete: "off", value: preset ? preset.target : "", readonly: Boolean(preset) });
    const cel = h("textarea", { name: "cel", rows: 2, spellcheck: "false" });
    cel.value = (budget && !budget.scope && budget.match && budget.match.cel) || "";
    const targetField = field("Target", target, "e.g. the identity's external id, a project id, openai, openai/gpt-4o");
    const celField = field("CEL expression", cel, 'e.g. metadata.team == "ml"');
    const period = select({ name: "period" }, PERIODS, limits.period || "BUDGET_PERIOD_MONTHLY");
    const amount = h("input", { name: "amount", type: "number", min: "0", step: "0.01", inputmode: "decimal", value: limits.amount ?? "" });
    const tokens = h("input", { name: "token_limit", type: "number", min: "0", step: "1", value: limits.tokenLimit ?? "" });
    const rpm = h("input", { name: "requests_per_minute", type: "number", min: "1", step: "1", value: (budget && budget.rateLimit && budget.rateLimit.requestsPerMinute) ?? "" });
    const active = h("input", { type: "checkbox", name: "is_active", checked: budget ? budget.isActive : true, id: `active-${Date.now()}` });
    const problem = h("div");

    function showScopeFields() {
      const value = kind.value;
      const needsTarget = SCOPES.find(([v]) => v === value)[2];
      targetField.hidden = editing || !needsTarget;
      celField.hidden = value !== "cel" && !(editing && !budget.scope);
    }
    if (editing) {
      kind.value = budget.scope ? Object.keys(budget.scope)[0].replace("apiKey", "api_key") : "cel";
    }
    kind.addEventListener("change", showScopeFields);
    showScopeFields();

    return h(
      "form",
      {
        class: "stack",
        on: {
          submit: async (event) => {
            event.preventDefault();
            replace(problem);
            const body = { limits: { period: period.value } };
            if (amount.value !== "") body.limits.amount = Number(amount.value);
            if (tokens.value !== "") body.limits.token_limit = Number(tokens.value);
            if (rpm.value !== "") body.rate_limit = { requests_per_minute: Number(rpm.value) };
            body.is_active = active.checked;
            let saved;
            try {
              if (editing) {
                if (!budget.scope) body.match = { cel: cel.value };
                saved = (await ctx.api.patch(`/v2/budgets/${seg(budget.budgetId)}`, body)).budget;
              } else {
                const [, , key] = SCOPES.find(([v]) => v === kind.value);
                if (kind.value === "cel") body.match = { cel: cel.value };
                else body.scope = { [kind.value]: key ? { [key]: target.value.trim() } : {} };
                saved = (await ctx.api.post("/v2/budgets", body)).budget;
              }
            } catch (err) {
              replace(problem, errorBox(err.message));
              return;
            }
            close(saved);
            announce(editing ? "Budget saved." : "Budget created.");
          },
        },
      },
      editing ? h("p", { class: "muted" }, scopeText(budget)) : field("Scope", kind),
      targetField,
      celField,
      field("Period", period),
      field("Amount (USD)", amount, "Leave empty for no spend limit."),
      field("Token limit", tokens),
      field("Requests per minute", rpm),
      h("div", { class: "field toggle" }, h("label", { for: active.id }, active, " Active")),
      problem,
      h("div", { class: "actions" },
        h("button", { type: "button", class: "ghost", on: { click: () => close(undefined) } }, "Cancel"),
        h("button", { type: "submit" }, editing ? "Save" : "Create"),
      ),
    );
  });
}
