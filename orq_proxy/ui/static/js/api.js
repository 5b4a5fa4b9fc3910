// The public /v2/* API, called with the admin key the user signed in with. The key lives in this tab's
// sessionStorage only (gone when the tab closes; never localStorage, never a cookie).

const KEY_SLOT = "orq-proxy.ui.key";

// The proxy's root: the page is at <root>/ui, so this works when the proxy is mounted under a prefix.
const ROOT = new URL(".", window.location.href);

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function storedKey() {
  try {
    return window.sessionStorage.getItem(KEY_SLOT);
  } catch {
    return null;
  }
}

export function storeKey(key) {
  try {
    window.sessionStorage.setItem(KEY_SLOT, key);
  } catch {
    // Storage disabled: the key then lives in memory only, for this page load.
  }
}

export function forgetKey() {
  try {
    window.sessionStorage.removeItem(KEY_SLOT);
  } catch {
    // nothing stored
  }
}

/** Query string from an object; arrays become repeated keys (orq's `filter_by.tags=a&filter_by.tags=b`). */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) search.append(name, String(item));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export class Api {
  constructor(key, onUnauthorized) {
    this.key = key;
    this.onUnauthorized = onUnauthorized;
  }

  async call(method, path, body) {
    const headers = { Authorization: `Bearer ${this.key}`, Accept: "application/json" };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(new URL(path.replace(/^\//, ""), ROOT), init);
    } catch (err) {
      throw new ApiError(0, `could not reach the proxy (${err.message})`);
    }
    let data = null;
    const type = response.headers.get("content-type") || "";
    if (type.includes("application/json")) {
      data = await response.json().catch(() => null);
    }
    if (!response.ok) {
      const message = (data && (data.message || (data.error && data.error.message))) || response.statusText;
      const error = new ApiError(response.status, message);
      if (response.status === 401 && this.onUnauthorized) this.onUnauthorized(error);
      throw error;
    }
    return data;
  }

  get(path, params = {}) {
    return this.call("GET", path + query(params));
  }

  post(path, body) {
    return this.call("POST", path, body);
  }

  patch(path, body) {
    return this.call("PATCH", path, body);
  }

  delete(path) {
    return this.call("DELETE", path);
  }
}

/** Path segment for an id (ULIDs need no escaping; external ids may). */
export function seg(id) {
  return encodeURIComponent(id);
}
