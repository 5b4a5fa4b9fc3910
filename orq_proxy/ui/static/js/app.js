// The dashboard's shell: sign-in, navigation (hash routes) and the pages. The identities page, the one a
// user lands on, is loaded with the shell; the others (and the charting library) when first opened.
//   #/identities            the identities table
//   #/identities/<_id>      one identity
//   #/budgets               every budget
//   #/reports               reporting

import { Api, ApiError, forgetKey, storedKey, storeKey } from "./api.js";
import { announce, errorBox, field, h, replace } from "./dom.js";
import { identitiesPage } from "./identities.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");

let api = null;
let renderSeq = 0;

export const NOT_ADMIN =
  "This key cannot manage identities: it is not an admin key. Sign in with an admin API key.";

/** Check a key against the API: resolves to null when it may manage identities, else the reason. */
async function checkKey(key) {
  try {
    await new Api(key).get("/v2/identities", { limit: 1 });
    return null;
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return NOT_ADMIN;
    if (err instanceof ApiError && err.status === 401) return "This key was not recognised by the proxy.";
    return `Could not sign in: ${err.message}`;
  }
}

function signIn(message) {
  api = null;
  nav.hidden = true;
  signOutButton.hidden = true;
  const input = h("input", {
    type: "password", name: "key", required: true, autocomplete: "off", spellcheck: "false",
    placeholder: "sk-…",
  });
  const problem = h("div", { class: "problem" }, message ? errorBox(message) : null);
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h(
    "form",
    {
      class: "card signin",
      "aria-labelledby": "signin-title",
      on: {
        submit: async (event) => {
          event.preventDefault();
          const key = input.value.trim();
          if (!key) return;
          button.disabled = true;
          replace(problem);
          const reason = await checkKey(key);
          button.disabled = false;
          if (reason) {
            replace(problem, errorBox(reason));
            input.focus();
            return;
          }
          storeKey(key);
          start(key);
        },
      },
    },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p", { class: "muted" },
      "Enter an admin API key of this proxy. It is kept in this browser tab only and sent to the proxy's /v2 API."),
    field("Admin API key", input),
    problem,
    h("div", { class: "actions" }, button),
  );
  replace(main, form);
  input.focus();
}

function start(key) {
  api = new Api(key, () => {
    forgetKey();
    signIn("The proxy no longer accepts this key. Sign in again.");
  });
  nav.hidden = false;
  signOutButton.hidden = false;
  if (!location.hash || location.hash === "#" || location.hash === "#/") {
    location.replace("#/identities"); // its hashchange renders the page
    return;
  }
  render();
}

async function render() {
  if (!api) return;
  const seq = ++renderSeq;
  const path = (location.hash || "#/identities").slice(1);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const section = parts[0] || "identities";
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const container = h("div", { class: "page" });
  replace(main, container);
  const ctx = { api, isCurrent: () => seq === renderSeq, navigate: (hash) => { location.hash = hash; } };
  try {
    if (section === "identities" && parts[1]) {
      const { identityPage } = await import("./identity.js");
      await identityPage(container, ctx, parts.slice(1).join("/"));
    } else if (section === "identities") {
      await identitiesPage(container, ctx);
    } else if (section === "budgets") {
      const { budgetsPage } = await import("./budgets.js");
      await budgetsPage(container, ctx);
    } else if (section === "reports") {
      const { reportsPage } = await import("./reports.js");
      await reportsPage(container, ctx);
    }
    else replace(container, h("h1", null, "Not found"), h("p", null, h("a", { href: "#/identities" }, "Go to identities")));
  } catch (err) {
    if (!ctx.isCurrent()) return;
    if (err instanceof ApiError && err.status === 403) {
      replace(container, errorBox(NOT_ADMIN));
    } else if (!(err instanceof ApiError && err.status === 401)) {
      replace(container, errorBox(`Could not load this page: ${err.message}`));
    }
  }
}

signOutButton.addEventListener("click", () => {
  forgetKey();
  announce("Signed out.");
  signIn();
});
window.addEventListener("hashchange", () => {
  render();
  main.focus({ preventScroll: true });
});

const key = storedKey();
if (key) start(key);
else signIn();
