// Number and date formatting for display (tables keep raw numbers for CSV). Numbers are formatted by
// hand: the first Intl.NumberFormat of a page costs 20-40 ms (ICU start-up), which the identities page,
// with its 300 ms budget, does not spend.

function grouped(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

function fixed(value, places) {
  const [whole, fraction] = Math.abs(value).toFixed(places).split(".");
  return (value < 0 ? "-" : "") + grouped(whole) + (fraction ? `.${fraction}` : "");
}

export function money(value) {
  const v = Number(value || 0);
  if (v !== 0 && Math.abs(v) < 0.01) return `${v < 0 ? "-" : ""}$${Number(Math.abs(v).toPrecision(3))}`;
  const text = fixed(v, 2);
  return text.startsWith("-") ? `-$${text.slice(1)}` : `$${text}`;
}

export function count(value) {
  return fixed(Math.round(Number(value || 0)), 0);
}

export function number(value) {
  const v = Number(value || 0);
  return Number.isInteger(v) ? fixed(v, 0) : fixed(v, 2).replace(/\.?0+$/, "");
}

export function percent(fraction) {
  const v = Number(fraction || 0) * 100;
  return `${v < 10 && v > 0 ? v.toFixed(1) : Math.round(v)}%`;
}

export function dateTime(value) {
  if (!value) return "";
  const d = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toLocaleString("en-GB", {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", timeZone: "UTC",
  }) + " UTC";
}

export const PERIODS = [
  ["BUDGET_PERIOD_DAILY", "Daily"],
  ["BUDGET_PERIOD_WEEKLY", "Weekly"],
  ["BUDGET_PERIOD_MONTHLY", "Monthly"],
  ["BUDGET_PERIOD_YEARLY", "Yearly"],
  ["BUDGET_PERIOD_ONE_TIME", "One time"],
];

export function periodName(period) {
  const found = PERIODS.find(([value]) => value === period);
  return found ? found[1] : period || "No period";
}

/**
 * When the current period of a budget ends (UTC calendar windows: day, week from Monday, month, year),
 * or null for one-time budgets. The API has no field for it; a budget with its own time zone resets at
 * that zone's midnight, which is shown as an approximation in UTC here.
 */
export function periodEnd(period, now = new Date()) {
  const y = now.getUTCFullYear();
  const m = now.getUTCMonth();
  const d = now.getUTCDate();
  switch (period) {
    case "BUDGET_PERIOD_DAILY":
      return new Date(Date.UTC(y, m, d + 1));
    case "BUDGET_PERIOD_WEEKLY": {
      const sinceMonday = (now.getUTCDay() + 6) % 7;
      return new Date(Date.UTC(y, m, d - sinceMonday + 7));
    }
    case "BUDGET_PERIOD_MONTHLY":
      return new Date(Date.UTC(y, m + 1, 1));
    case "BUDGET_PERIOD_YEARLY":
      return new Date(Date.UTC(y + 1, 0, 1));
    default:
      return null;
  }
}
