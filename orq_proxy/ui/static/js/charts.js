// Charts: uPlot (vendored, window.uPlot) with the dashboard's colours and axes. uPlot draws on a canvas
// and sets sizes through the CSSOM, which the page's Content-Security-Policy allows. It is loaded the
// first time a chart is drawn, so the identities page does not wait for it.

import { h } from "./dom.js";

export const COLOURS = ["#4f46e5", "#0891b2", "#d97706", "#059669", "#dc2626", "#7c3aed", "#db2777", "#65a30d", "#475569", "#0d9488"];

let loading = null;

/** window.uPlot, loading ui/static/vendor/uPlot.iife.min.js and its CSS (same-origin files the CSP allows) once. */
function loadUplot() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  if (!loading) {
    const vendor = new URL("../vendor/", import.meta.url).href;
    document.head.append(h("link", { rel: "stylesheet", href: `${vendor}uPlot.min.css` }));
    loading = new Promise((resolve, reject) => {
      const script = h("script", { src: `${vendor}uPlot.iife.min.js` });
      script.addEventListener("load", () => resolve(window.uPlot));
      script.addEventListener("error", () => {
        loading = null;
        reject(new Error("the charting library did not load"));
      });
      document.head.append(script);
    });
  }
  return loading;
}

function width(container) {
  return Math.max(260, Math.floor(container.getBoundingClientRect().width || 600));
}

/**
 * Draw a time series chart into `container`.
 *   xs: bucket starts in seconds since the epoch
 *   series: [{label, values, format(value) -> string, axis: "left"|"right", bars: bool}]
 *   xRange: [from, to] in seconds: the whole queried range stays on the axis, however few buckets have data
 * Resolves to the uPlot instance (or null when the library could not be loaded).
 */
export async function timeChart(container, xs, series, { height = 260, title, xRange } = {}) {
  try {
    await loadUplot();
  } catch (err) {
    container.replaceChildren(h("p", { class: "muted" }, `No chart: ${err.message}.`));
    return null;
  }
  container.replaceChildren();
  if (!container.isConnected) return null;
  const hasRight = series.some((s) => s.axis === "right");
  const fmt = (s) => (u, value) => (value === null || value === undefined ? "–" : s.format(value));
  const opts = {
    title,
    width: width(container),
    height,
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    scales: { x: xRange ? { time: true, range: () => xRange } : { time: true } },
    series: [
      { label: "Time" },
      ...series.map((s, i) => ({
        label: s.label,
        scale: s.axis === "right" ? "right" : "y",
        stroke: COLOURS[i % COLOURS.length],
        fill: s.bars ? `${COLOURS[i % COLOURS.length]}99` : series.length === 1 ? `${COLOURS[0]}22` : undefined,
        width: s.bars ? 1 : 2,
        paths: s.bars ? window.uPlot.paths.bars({ size: [0.6, 40] }) : undefined,
        points: { show: !s.bars && xs.length < 40 },
        value: fmt(s),
      })),
    ],
    axes: [
      { stroke: "#64748b", grid: { stroke: "#e2e8f0" } },
      {
        scale: "y",
        stroke: "#64748b",
        grid: { stroke: "#e2e8f0" },
        size: 70,
        values: (u, ticks) => ticks.map((t) => series.find((s) => s.axis !== "right").format(t)),
      },
      ...(hasRight
        ? [{
            scale: "right",
            side: 1,
            stroke: "#64748b",
            grid: { show: false },
            size: 60,
            values: (u, ticks) => ticks.map((t) => series.find((s) => s.axis === "right").format(t)),
          }]
        : []),
    ],
  };
  const data = [xs, ...series.map((s) => s.values)];
  const chart = new window.uPlot(opts, data, container);
  const observer = new ResizeObserver(() => {
    if (!container.isConnected) {
      observer.disconnect();
      chart.destroy();
      return;
    }
    const w = width(container);
    if (w !== chart.width) chart.setSize({ width: w, height });
  });
  observer.observe(container);
  return chart;
}
