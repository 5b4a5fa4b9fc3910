// Building the page from data without ever parsing it as HTML: every string becomes a text node or an
// attribute value (set with setAttribute), never markup: nothing in the dashboard parses HTML from strings.

/**
 * h("a", {href: "#/x", class: "link", on: {click: fn}}, "text", childNode, [more, children])
 * Attributes with null/undefined/false are left out; `true` sets an empty attribute.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element (the budget ring); same conventions as h(). */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  if (!attrs) return;
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) el.addEventListener(event, handler);
    } else if (name === "dataset") {
      for (const [key, v] of Object.entries(value)) el.dataset[key] = String(v);
    } else if (value === true) {
      el.setAttribute(name, "");
    } else if (value !== null && value !== undefined && value !== false) {
      el.setAttribute(name, String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace everything inside `el` with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let labelSeq = 0;

/** A labelled form field: <label for=id>text</label> + the control (+ an optional hint). */
export function field(label, control, hint) {
  if (!control.id) control.id = `f${++labelSeq}`;
  const hintEl = hint ? h("span", { class: "hint", id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hintEl);
}

/** A <select> of [value, label] pairs. */
export function select(attrs, options, selected) {
  return h(
    "select",
    attrs,
    options.map(([value, label]) => h("option", { value, selected: value === selected }, label)),
  );
}

/**
 * A modal <dialog> (focus stays inside; Escape closes it). `build(close)` returns its content.
 * Returns a promise settled when it closes.
 */
export function modal(title, build) {
  return new Promise((resolve) => {
    const titleId = `d${++labelSeq}`;
    const dialog = h("dialog", { "aria-labelledby": titleId });
    const close = (value) => {
      dialog.close();
      dialog.remove();
      resolve(value);
    };
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      close(undefined);
    });
    append(dialog, [h("h2", { id: titleId }, title), build(close)]);
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** Ask a yes/no question in a modal; resolves true when confirmed. */
export function confirmDialog(title, message, confirmLabel) {
  return modal(title, (close) =>
    h(
      "div",
      null,
      h("p", null, message),
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", class: "ghost", on: { click: () => close(false) } }, "Cancel"),
        h("button", { type: "button", class: "danger", on: { click: () => close(true) } }, confirmLabel),
      ),
    ),
  ).then((answer) => answer === true);
}

/** A message in the page's live region (announced to screen readers). */
export function announce(message, kind = "info") {
  const status = document.getElementById("status");
  status.className = `status ${kind}`;
  status.textContent = message;
  if (kind !== "error") {
    clearTimeout(announce.timer);
    announce.timer = setTimeout(() => {
      if (status.textContent === message) status.textContent = "";
    }, 4000);
  }
}

/** An inline error box. */
export function errorBox(message) {
  return h("p", { class: "error-box", role: "alert" }, message);
}
