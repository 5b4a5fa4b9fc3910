// Identities: the table (30-day metrics from include_metrics), search, tag filter, sort, cursor pages,
// and "Create identity" (with an optional budget, created right after the identity).

import { seg } from "./api.js";
import { announce, errorBox, field, h, modal, replace, select } from "./dom.js";
import { count, money, percent, PERIODS } from "./format.js";

const PAGE_SIZE = 25;
const SORTS = [
  ["", "Newest first"],
  ["IDENTITY_SORT_FIELD_DISPLAY_NAME", "Name"],
  ["IDENTITY_SORT_FIELD_UPDATED", "Recently updated"],
];

// Kept while the tab is open, so coming back from an identity shows the same view.
const view = { search: "", tags: "", sort: "", cursor: null };

function tagList(text) {
  return [...new Set(text.split(",").map((t) => t.trim()).filter(Boolean))];
}

export async function identitiesPage(container, ctx) {
  const searchInput = h("input", {
    type: "search", name: "search", value: view.search, autocomplete: "off", placeholder: "Name, email or external id",
  });
  const tagInput = h("input", { type: "text", name: "tags", value: view.tags, autocomplete: "off", placeholder: "e.g. beta, vip" });
  const sortSelect = select({ name: "sort" }, SORTS, view.sort);
  const tableSlot = h("div", { class: "table-slot" });
  const prev = h("button", { type: "button", class: "ghost", disabled: true }, "‹ Previous");
  const next = h("button", { type: "button", class: "ghost", disabled: true }, "Next ›");
  const pageInfo = h("span", { class: "muted" });

  let loadSeq = 0;
  async function load() {
    const seq = ++loadSeq;
    const search = view.search.trim();
    const params = {
      limit: PAGE_SIZE,
      include_metrics: "true",
      search: search.length >= 2 ? search : null,
      "filter_by.tags": tagList(view.tags),
      sort_by: view.sort || null,
      starting_after: view.cursor && view.cursor.after,
      ending_before: view.cursor && view.cursor.before,
    };
    tableSlot.setAttribute("aria-busy", "true");
    let page;
    try {
      page = await ctx.api.get("/v2/identities", params);
    } catch (err) {
      if (seq !== loadSeq || !ctx.isCurrent()) return;
      tableSlot.removeAttribute("aria-busy");
      if (err.status === 403) throw err;
      replace(tableSlot, errorBox(err.message));
      return;
    }
    if (seq !== loadSeq || !ctx.isCurrent()) return;
    tableSlot.removeAttribute("aria-busy");
    const rows = page.data || [];
    const cursor = view.cursor;
    prev.disabled = !cursor || (cursor.before ? !page.has_more : false);
    next.disabled = cursor && cursor.before ? rows.length === 0 : !page.has_more;
    prev.onclick = () => {
      if (rows.length) view.cursor = { before: rows[0]._id };
      load();
    };
    next.onclick = () => {
      if (rows.length) view.cursor = { after: rows[rows.length - 1]._id };
      load();
    };
    pageInfo.textContent = rows.length ? `${rows.length} shown` : "";
    replace(tableSlot, rows.length ? table(rows) : h("p", { class: "empty" }, emptyText(search)));
    // Time from navigation start to the first page on screen (benchmarks/ui.py reads it).
    if (!performance.getEntriesByName("identities-shown").length) performance.mark("identities-shown");
  }

  function emptyText(search) {
    if (search.length === 1) return "Type at least 2 characters to search.";
    if (search || view.tags) return "No identity matches these filters.";
    return "No identities yet. Create one, or send a request with an identity through the proxy.";
  }

  function restart() {
    view.cursor = null;
    load();
  }

  let debounce = null;
  searchInput.addEventListener("input", () => {
    view.search = searchInput.value;
    const text = view.search.trim();
    clearTimeout(debounce);
    if (text.length === 1) {
      hint.textContent = "Type at least 2 characters to search.";
      return;
    }
    hint.textContent = "";
    debounce = setTimeout(restart, 200);
  });
  tagInput.addEventListener("change", () => {
    view.tags = tagInput.value;
    restart();
  });
  sortSelect.addEventListener("change", () => {
    view.sort = sortSelect.value;
    restart();
  });
  const hint = h("span", { class: "hint", id: "search-hint", "aria-live": "polite" });
  searchInput.setAttribute("aria-describedby", "search-hint");

  replace(
    container,
    h(
      "div",
      { class: "page-head" },
      h("h1", null, "Identities"),
      h("button", { type: "button", on: { click: () => createIdentity(ctx) } }, "Create identity"),
    ),
    h("p", { class: "muted" }, "Requests, cost, tokens and error rate over the last 30 days."),
    h(
      "form",
      { class: "filters", role: "search", on: { submit: (e) => { e.preventDefault(); view.tags = tagInput.value; view.search = searchInput.value; restart(); } } },
      h("div", { class: "field" }, h("label", { for: "identity-search" }, "Search"), withId(searchInput, "identity-search"), hint),
      field("Tags (all of)", tagInput),
      field("Sort by", sortSelect),
      h("button", { type: "submit", class: "ghost" }, "Apply"),
    ),
    tableSlot,
    h("div", { class: "pager" }, prev, pageInfo, next),
  );
  await load();
}

function withId(el, id) {
  el.id = id;
  return el;
}

function table(rows) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "data stacked", id: "identities-table" },
      h("caption", { class: "sr-only" }, "Identities with their metrics over the last 30 days"),
      h(
        "thead",
        null,
        h("tr", null,
          h("th", { scope: "col" }, "Identity"),
          h("th", { scope: "col" }, "Tags"),
          h("th", { scope: "col", class: "num" }, "Requests"),
          h("th", { scope: "col", class: "num" }, "Cost"),
          h("th", { scope: "col", class: "num" }, "Tokens"),
          h("th", { scope: "col", class: "num" }, "Error rate"),
        ),
      ),
      h(
        "tbody",
        null,
        rows.map((identity) => {
          const m = identity.metrics || {};
          return h(
            "tr",
            { dataset: { externalId: identity.external_id } },
            h("td", { "data-label": "Identity" },
              h("a", { href: `#/identities/${seg(identity._id)}`, class: "name" }, identity.display_name || identity.external_id),
              identity.display_name ? h("div", { class: "sub" }, identity.external_id) : null,
            ),
            h("td", { "data-label": "Tags" }, (identity.tags || []).map((t) => h("span", { class: "tag" }, t))),
            h("td", { class: "num", "data-label": "Requests", dataset: { col: "requests" } }, count(m.total_requests)),
            h("td", { class: "num", "data-label": "Cost", dataset: { col: "cost" } }, money(m.total_cost)),
            h("td", { class: "num", "data-label": "Tokens", dataset: { col: "tokens" } }, count(m.total_tokens)),
            h("td", { class: "num", "data-label": "Error rate", dataset: { col: "error-rate" } }, percent(m.error_rate)),
          );
        }),
      ),
    ),
  );
}

/** The create form: identity fields and the budget toggle; creates the identity, then its budget. */
export function createIdentity(ctx) {
  return modal("Create identity", (close) => {
    const externalId = h("input", { name: "external_id", required: true, maxlength: 255, autocomplete: "off" });
    const displayName = h("input", { name: "display_name", autocomplete: "off" });
    const email = h("input", { name: "email", type: "email", autocomplete: "off" });
    const tags = h("input", { name: "tags", autocomplete: "off", placeholder: "comma separated" });
    const budgetOn = h("input", { type: "checkbox", name: "budget", role: "switch" });
    const period = select({ name: "period" }, PERIODS.slice(0, 4), "BUDGET_PERIOD_MONTHLY");
    const amount = h("input", { name: "amount", type: "number", min: "0.01", step: "0.01", value: "10", inputmode: "decimal" });
    const budgetFields = h("fieldset", { class: "budget-fields", disabled: true },
      h("legend", { class: "sr-only" }, "Budget"),
      field("Period", period),
      field("Amount (USD)", amount),
    );
    budgetOn.addEventListener("change", () => {
      budgetFields.disabled = !budgetOn.checked;
    });
    const problem = h("div");
    const submit = h("button", { type: "submit" }, "Create");
    return h(
      "form",
      {
        class: "stack",
        on: {
          submit: async (event) => {
            event.preventDefault();
            submit.disabled = true;
            replace(problem);
            const body = { external_id: externalId.value.trim() };
            if (displayName.value.trim()) body.display_name = displayName.value.trim();
            if (email.value.trim()) body.email = email.value.trim();
            const tagValues = tagList(tags.value);
            if (tagValues.length) body.tags = tagValues;
            let identity;
            try {
              identity = (await ctx.api.post("/v2/identities", body)).identity;
            } catch (err) {
              submit.disabled = false;
              replace(problem, errorBox(err.message));
              return;
            }
            if (budgetOn.checked) {
              try {
                await ctx.api.post("/v2/budgets", {
                  scope: { identity: { identity_external_id: identity.external_id } },
                  limits: { period: period.value, amount: Number(amount.value) },
                });
              } catch (err) {
                replace(problem, errorBox(`The identity was created, but its budget was not: ${err.message}`));
                submit.textContent = "Close";
                submit.disabled = false;
                submit.type = "button";
                submit.onclick = () => { close(identity); ctx.navigate(`#/identities/${seg(identity._id)}`); };
                return;
              }
            }
            close(identity);
            announce(`Identity ${identity.external_id} created.`);
            ctx.navigate(`#/identities/${seg(identity._id)}`);
          },
        },
      },
      field("External ID", externalId, "Your stable id for this user, team or client."),
      field("Display name", displayName),
      field("Email", email),
      field("Tags", tags),
      h("div", { class: "field toggle" }, h("label", { for: "budget-toggle" }, withId(budgetOn, "budget-toggle"), " Budget")),
      budgetFields,
      problem,
      h("div", { class: "actions" },
        h("button", { type: "button", class: "ghost", on: { click: () => close(undefined) } }, "Cancel"),
        submit,
      ),
    );
  });
}
