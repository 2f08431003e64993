// The interpolation curves as SVG: loss and accuracy against lambda for the naive and the aligned pair.
// Hover (or focus and press the arrow keys) to read lambda, loss and accuracy of both curves.

const SVG = "http://www.w3.org/2000/svg";
const LABELS = { naive: "Naive", aligned: "Aligned", aligned_repair: "Aligned + REPAIR" };
let SERIES = [];

function legendOf(series) {
  const legend = document.createElement("p");
  legend.className = "legend";
  for (const [key, label] of series) {
    const item = document.createElement("span");
    item.className = `key ${key}`;
    item.textContent = label;
    legend.appendChild(item);
  }
  return legend;
}

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(x) {
  return Number.isFinite(x) ? x.toFixed(4) : "–";
}

function panel(svg, curves, metric, top, height, width, margin) {
  const xs = curves.lambdas;
  const values = SERIES.flatMap(([key]) => curves[key][metric]).filter(Number.isFinite);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (metric === "accuracy") { lo = Math.min(lo, 1); hi = Math.max(hi, 0); lo = Math.max(0, Math.floor(lo * 10) / 10); hi = Math.min(1, Math.ceil(hi * 10) / 10); }
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const x = (l) => margin + (l - xs[0]) / (xs[xs.length - 1] - xs[0] || 1) * (width - 2 * margin);
  const y = (v) => top + height - (v - lo) / (hi - lo) * height;
  el("line", { x1: margin, x2: width - margin, y1: top + height, y2: top + height, class: "axis" }, svg);
  el("line", { x1: margin, x2: margin, y1: top, y2: top + height, class: "axis" }, svg);
  for (const v of [lo, (lo + hi) / 2, hi]) {
    el("text", { x: margin - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, svg).textContent = v.toPrecision(3);
  }
  el("text", { x: margin, y: top - 6, class: "label" }, svg).textContent = metric === "loss" ? "Loss" : "Accuracy";
  for (const [key] of SERIES) {
    const points = xs.map((l, i) => `${x(l).toFixed(1)},${y(curves[key][metric][i]).toFixed(1)}`).join(" ");
    el("polyline", { points, class: `line ${key}` }, svg);
  }
  return { x, y };
}

export function drawCurves(container, curves, caption) {
  // Every curve the result holds (naive, aligned, and e.g. aligned_repair), in a fixed order.
  SERIES = Object.keys(curves).filter((k) => k !== "lambdas" && curves[k] && curves[k].loss)
    .sort((a, b) => Object.keys(LABELS).indexOf(a) - Object.keys(LABELS).indexOf(b)).map((k) => [k, LABELS[k] || k]);
  const width = 640, margin = 52, height = 150;
  const svg = el("svg", { viewBox: `0 0 ${width} ${2 * height + 110}`, role: "img", class: "chart", tabindex: 0,
    "aria-label": `${caption}. Focus and use the arrow keys to read each point.` });
  const loss = panel(svg, curves, "loss", 24, height, width, margin);
  const acc = panel(svg, curves, "accuracy", height + 64, height, width, margin);
  const xs = curves.lambdas;
  for (const l of [xs[0], (xs[0] + xs[xs.length - 1]) / 2, xs[xs.length - 1]]) {
    el("text", { x: loss.x(l), y: 2 * height + 84, class: "tick", "text-anchor": "middle" }, svg).textContent = l.toFixed(2);
  }
  el("text", { x: width / 2, y: 2 * height + 104, class: "label", "text-anchor": "middle" }, svg).textContent = "λ (0 = model A, 1 = aligned model B)";
  const cursor = el("line", { y1: 20, y2: 2 * height + 64, class: "cursor", visibility: "hidden" }, svg);
  const dots = SERIES.flatMap(([key]) => [el("circle", { r: 4, class: `dot ${key}`, visibility: "hidden" }, svg),
                                          el("circle", { r: 4, class: `dot ${key}`, visibility: "hidden" }, svg)]);
  const legend = legendOf(SERIES);
  const readout = document.createElement("p");
  readout.className = "readout";
  readout.setAttribute("aria-live", "polite");
  readout.textContent = "Hover over the chart to read the values.";
  let index = -1;
  const show = (i) => {
    index = Math.max(0, Math.min(xs.length - 1, i));
    const px = loss.x(xs[index]);
    cursor.setAttribute("x1", px); cursor.setAttribute("x2", px); cursor.setAttribute("visibility", "visible");
    SERIES.forEach(([key], s) => {
      const [dl, da] = [dots[2 * s], dots[2 * s + 1]];
      dl.setAttribute("cx", px); dl.setAttribute("cy", loss.y(curves[key].loss[index])); dl.setAttribute("visibility", "visible");
      da.setAttribute("cx", px); da.setAttribute("cy", acc.y(curves[key].accuracy[index])); da.setAttribute("visibility", "visible");
    });
    readout.textContent = `λ = ${xs[index].toFixed(3)}` +
      SERIES.map(([key]) => ` · ${key}: loss ${fmt(curves[key].loss[index])}, accuracy ${fmt(curves[key].accuracy[index])}`).join("");
  };
  svg.addEventListener("pointermove", (event) => {
    const box = svg.getBoundingClientRect();
    const px = (event.clientX - box.left) / box.width * width;
    let best = 0;
    xs.forEach((l, i) => { if (Math.abs(loss.x(l) - px) < Math.abs(loss.x(xs[best]) - px)) best = i; });
    show(best);
  });
  svg.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight") { show(index + 1); event.preventDefault(); }
    if (event.key === "ArrowLeft") { show(index < 0 ? 0 : index - 1); event.preventDefault(); }
  });
  const figure = document.createElement("figure");
  const figcaption = document.createElement("figcaption");
  figcaption.textContent = caption;
  figure.append(figcaption, legend, svg, readout);
  container.appendChild(figure);
  return { show };
}

// A partial-merge sweep: per cut point (x, in execution order), the joint accuracy and the FLOPs as a fraction of
// the two models (y, both in [0, 1]); the ensemble's and the full merge's joint accuracy as dashed levels.
export function drawSweep(container, partial, joint) {
  const cuts = partial.cuts.filter((c) => Number.isFinite(c.flops_fraction));  // not the cuts the method refused
  const width = 640, margin = 52, top = 24, height = 220;
  const svg = el("svg", { viewBox: `0 0 ${width} ${height + 90}`, role: "img", class: "chart sweep", id: "sweep-chart",
    "aria-label": "Partial-merge sweep: joint accuracy and FLOPs per cut point" });
  const x = (i) => margin + (cuts.length > 1 ? i / (cuts.length - 1) : 0.5) * (width - 2 * margin);
  const y = (v) => top + height - v * height;
  el("line", { x1: margin, x2: width - margin, y1: top + height, y2: top + height, class: "axis" }, svg);
  el("line", { x1: margin, x2: margin, y1: top, y2: top + height, class: "axis" }, svg);
  for (const v of [0, 0.5, 1]) el("text", { x: margin - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, svg).textContent = v.toFixed(1);
  cuts.forEach((cut, i) => {
    const label = el("text", { x: x(i), y: top + height + 16, class: "tick", "text-anchor": "end",
      transform: `rotate(-30 ${x(i)} ${top + height + 16})` }, svg);
    label.textContent = cut.module;
  });
  const series = [["flops_fraction", "FLOPs / two models"]];
  if (joint) series.unshift(["joint_accuracy", "Joint accuracy"]);
  for (const [key, label] of series) {
    el("polyline", { points: cuts.map((c, i) => `${x(i).toFixed(1)},${y(c[key]).toFixed(1)}`).join(" "), class: `line ${key}` }, svg);
    cuts.forEach((c, i) => {
      const dot = el("circle", { cx: x(i), cy: y(c[key]), r: 4, class: `dot ${key}`, "data-cut": c.module, [`data-${key.replace("_", "-")}`]: c[key] }, svg);
      el("title", {}, dot).textContent = `${c.module}: ${label} ${fmt(c[key])}`;
    });
  }
  const levels = joint ? [["ensemble", "Ensemble"], ["full_merge", "Full merge"]] : [];
  levels.forEach(([key, label], i) => {  // labels at opposite ends: the two levels are often close
    el("line", { x1: margin, x2: width - margin, y1: y(joint[key]), y2: y(joint[key]), class: `level ${key}` }, svg);
    el("text", { x: i ? width - margin : margin + 4, y: y(joint[key]) - 4, class: "tick", "text-anchor": i ? "end" : "start" }, svg)
      .textContent = `${label} ${fmt(joint[key])}`;
  });
  const legend = legendOf(series);
  const figure = document.createElement("figure");
  const figcaption = document.createElement("figcaption");
  figcaption.textContent = "Partial merges: everything up to each cut merged, the rest kept as two heads (cut points in execution order)";
  figure.append(figcaption, legend, svg);
  container.appendChild(figure);
}
