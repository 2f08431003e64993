// rebasin in the browser: hash routes, each a function that renders into <main>. Text from the server is
// only ever set as text (textContent, attribute values), never parsed as HTML.

import { api, ApiError, newKey, setSession, uploadFile } from "./api.js";
import { drawCurves, drawSweep } from "./chart.js";

const main = document.getElementById("main");
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const PAGE_SIZE = 20;
let session = null;
let cleanups = [];

// --- small helpers -----------------------------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "value") node.value = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function onCleanup(fn) {
  cleanups.push(fn);
}

export function bytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function age(iso) {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 10) return "just now";
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${Math.floor(s / 3600)} h ${Math.floor(s / 60) % 60} min`;
}

function num(x) {
  return typeof x === "number" ? Number(x.toPrecision(4)).toString() : "–";
}

function problemBox(error) {
  const p = error instanceof ApiError ? error.problem : { title: "Error", detail: String(error) };
  return h("div", { class: "problem", role: "alert" }, h("strong", {}, p.title || "Error"), " ", p.detail || "");
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function title(text) {
  document.title = `${text} · rebasin`;
  return h("h1", {}, text);
}

async function allPages(path) {
  const items = [];
  let token = null;
  do {
    const page = await api("GET", `${path}?page_size=200${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    items.push(...page.items);
    token = page.next_page_token;
  } while (token && items.length < 2000);
  return items;
}

// --- sign in / out -----------------------------------------------------------------------------------------

async function loadSession() {
  session = await api("GET", "/v1/session");
  setSession(session);
  document.getElementById("nav").hidden = !session.signed_in;
  document.getElementById("tenant").textContent = session.signed_in && !session.open_mode ? `Tenant: ${session.tenant}` : "";
  document.getElementById("sign-out").hidden = !(session.signed_in && !session.open_mode);
}

function signInView() {
  const error = h("p", { class: "field-error", id: "err-api_key", role: "alert" });
  const input = h("input", { id: "api_key", name: "api_key", type: "password", autocomplete: "current-password", required: true });
  const form = h("form", { class: "card narrow", onsubmit: async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      await api("POST", "/v1/session", { api_key: input.value });
      input.value = "";
      await loadSession();
      location.hash = "#/jobs";
    } catch (e) {
      error.textContent = e.problem ? e.problem.detail : String(e);
    }
  } },
  title("Sign in"),
  h("p", {}, "This server needs an API key. It is exchanged for a session cookie that scripts cannot read; the key is not stored in the browser."),
  h("label", { for: "api_key" }, "API key"), input, error,
  h("button", { type: "submit", class: "primary" }, "Sign in"));
  main.replaceChildren(form);
  input.focus();
}

document.getElementById("sign-out").addEventListener("click", async () => {
  try { await api("DELETE", "/v1/session"); } catch { /* the cookie is gone or was never there */ }
  await loadSession();
  location.hash = "#/signin";
});

window.addEventListener("unauthorized", () => {
  if (session && session.signed_in && !session.open_mode) {
    loadSession().finally(() => { if (location.hash === "#/signin") route(); else location.hash = "#/signin"; });
  }
});

// --- jobs list ---------------------------------------------------------------------------------------------

function jobsView(params) {
  const status = params.get("status") || "";
  const tokens = [null];
  const filter = h("select", { id: "status-filter", onchange: () => { location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs"; } },
    h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s }, s)));
  filter.value = status;
  const body = h("tbody");
  const info = h("div");
  const older = h("button", { type: "button", onclick: () => { tokens.push(next); refresh(); } }, "Older →");
  const newer = h("button", { type: "button", onclick: () => { tokens.pop(); refresh(); } }, "← Newer");
  let next = null;
  async function refresh() {
    const token = tokens[tokens.length - 1];
    const query = new URLSearchParams({ page_size: PAGE_SIZE });
    if (status) query.set("status", status);
    if (token) query.set("page_token", token);
    try {
      const page = await api("GET", `/v1/jobs?${query}`);
      next = page.next_page_token;
      body.replaceChildren(...page.items.map((job) => h("tr", {},
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
        h("td", {}, badge(job.status)),
        h("td", {}, job.method.replace("_", " ")),
        h("td", {}, job.progress ? job.progress.stage : ""),
        h("td", {}, age(job.created_at)))));
      info.replaceChildren(page.items.length ? "" : h("p", { class: "muted" }, status ? `No ${status} jobs.` : "No jobs yet. Start one with New merge."));
      older.disabled = !next;
      newer.disabled = tokens.length < 2;
    } catch (e) {
      info.replaceChildren(problemBox(e));
    }
  }
  const timer = setInterval(refresh, 3000);
  onCleanup(() => clearInterval(timer));
  main.replaceChildren(title("Jobs"),
    h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status "), filter, h("a", { class: "button primary", href: "#/new" }, "New merge")),
    h("div", { class: "scroll" }, h("table", { id: "jobs" }, h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Stage", "Created"].map((c) => h("th", { scope: "col" }, c)))), body)),
    info, h("div", { class: "pager" }, newer, older));
  refresh();
}

// --- checkpoints and datasets ------------------------------------------------------------------------------

function fileSection(kind) {
  const plural = kind === "checkpoint" ? "checkpoints" : "datasets";
  const countLabel = kind === "checkpoint" ? "Parameters" : "Examples";
  const tokens = [null];
  let next = null;
  const body = h("tbody");
  const info = h("div");
  const uploads = h("ul", { class: "uploads", "aria-live": "polite" });
  const older = h("button", { type: "button", onclick: () => { tokens.push(next); refresh(); } }, "Older →");
  const newer = h("button", { type: "button", onclick: () => { tokens.pop(); refresh(); } }, "← Newer");

  async function refresh() {
    const token = tokens[tokens.length - 1];
    try {
      const page = await api("GET", `/v1/${plural}?page_size=${PAGE_SIZE}${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
      next = page.next_page_token;
      body.replaceChildren(...page.items.map(row));
      info.replaceChildren(page.items.length ? "" : h("p", { class: "muted" }, `No ${plural} yet.`));
      older.disabled = !next;
      newer.disabled = tokens.length < 2;
    } catch (e) {
      info.replaceChildren(problemBox(e));
    }
  }

  function row(item) {
    const status = h("span", { class: "row-error", role: "alert" });
    const remove = h("button", { type: "button", class: "danger", "aria-label": `Delete ${item.name}`, onclick: async () => {
      if (!confirm(`Delete ${kind} “${item.name}”?`)) return;
      try {
        await api("DELETE", `/v1/${plural}/${encodeURIComponent(item.id)}`);
        refresh();
      } catch (e) {
        status.textContent = e.status === 409 ? `Not deleted: ${e.problem.detail}` : e.message;
      }
    } }, "Delete");
    return h("tr", { "data-id": item.id },
      h("td", { class: "name" }, item.name, h("div", { class: "muted small" }, item.id)),
      h("td", {}, bytes(item.size_bytes)),
      h("td", {}, (kind === "checkpoint" ? item.num_parameters : item.num_examples).toLocaleString("en")),
      h("td", { class: "mono", title: item.sha256 }, `${item.sha256.slice(0, 12)}…`),
      h("td", {}, age(item.created_at)),
      h("td", {}, remove, status));
  }

  async function upload(file) {
    const bar = h("progress", { max: file.size || 1, value: 0, "aria-label": `Upload of ${file.name}` });
    const speed = h("span", { class: "muted" }, "starting…");
    const line = h("li", {}, h("span", { class: "name" }, file.name), " ", bar, " ", speed);
    uploads.appendChild(line);
    const started = performance.now();
    try {
      await uploadFile(kind, file, (sent) => {
        bar.value = sent;
        const seconds = (performance.now() - started) / 1000;
        speed.textContent = `${bytes(sent)} of ${bytes(file.size)} · ${bytes(sent / Math.max(seconds, 0.001))}/s`;
      });
      bar.value = file.size;
      const seconds = (performance.now() - started) / 1000;
      speed.textContent = `uploaded ${bytes(file.size)} in ${seconds.toFixed(1)} s · ${bytes(file.size / Math.max(seconds, 0.001))}/s`;
      line.classList.add("done");
      refresh();
    } catch (e) {
      line.appendChild(problemBox(e));
    }
  }

  const picker = h("input", { type: "file", id: `${kind}-file`, multiple: true, class: "visually-hidden",
    accept: kind === "checkpoint" ? ".safetensors,.pt,.pth,.bin,.tar,.tar.gz,.tgz,.zip" : ".safetensors",
    onchange: () => { [...picker.files].forEach(upload); picker.value = ""; } });
  const drop = h("div", { class: "dropzone", id: `${kind}-drop` },
    picker, h("label", { for: `${kind}-file`, class: "button" }, `Choose ${kind} files`), " or drop them here");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); [...e.dataTransfer.files].forEach(upload); });
  refresh();
  return h("section", { id: plural, class: "card" }, h("h2", {}, plural[0].toUpperCase() + plural.slice(1)), drop, uploads,
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Size", countLabel, "sha256", "Uploaded", ""].map((c) => h("th", { scope: "col" }, c)))), body)),
    info, h("div", { class: "pager" }, newer, older));
}

function filesView() {
  main.replaceChildren(title("Checkpoints & datasets"),
    h("p", { class: "muted" }, "Checkpoints: safetensors, a torch.save state dict, or a Hugging Face model folder (config.json and its weights, as save_pretrained writes them) as one .tar, .tar.gz or .zip. Datasets: safetensors with inputs and targets (optionally eval_inputs, eval_targets)."),
    fileSection("checkpoint"), fileSection("dataset"));
}

// --- the job form ------------------------------------------------------------------------------------------

function resolve(schema, doc) {
  // Follows $ref and single-entry allOf/anyOf (nullable) wrappers in the OpenAPI document.
  for (let i = 0; schema && i < 10; i += 1) {
    if (schema.$ref) schema = schema.$ref.split("/").slice(1).reduce((o, k) => o[k], doc);
    else if (schema.allOf && schema.allOf.length === 1) schema = schema.allOf[0];
    else if (schema.anyOf) {
      const real = schema.anyOf.filter((s) => s.type !== "null");
      if (real.length !== 1) return schema;
      schema = { ...real[0], default: schema.default ?? real[0].default, description: schema.description ?? real[0].description };
    } else return schema;
  }
  return schema;
}

function fieldError(name) {
  return h("p", { class: "field-error", id: `err-${name}`, "data-error-for": name, role: "alert" });
}

function field(name, label, input, help) {
  input.id = input.id || `f-${name}`;
  input.setAttribute("aria-describedby", `err-${name}`);
  return h("div", { class: "field", "data-field": name }, h("label", { for: input.id }, label), input,
    help ? h("p", { class: "help" }, help) : null, fieldError(name));
}

function showProblem(form, problem) {
  // Each error goes beside its field (longest matching prefix of its location), the rest above the button.
  form.querySelectorAll(".field-error").forEach((p) => { p.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((n) => n.removeAttribute("aria-invalid"));
  // Without a list of errors, a detail that starts with a field's name ("permutation_spec names ...") goes there.
  const lead = String(problem.detail || "").match(/^'?([a-z_]+(?:\.[a-z_0-9]+)*)'?[\s:]/);
  const errors = Array.isArray(problem.errors) && problem.errors.length ? problem.errors
    : [{ field: lead ? lead[1] : null, message: problem.detail }];
  for (const error of errors) {
    const path = error.field ?? (Array.isArray(error.loc) ? error.loc.filter((p) => p !== "body").join(".") : null)
      ?? (error.pointer ? error.pointer.replace(/^#?\//, "").replaceAll("/", ".") : "");
    let slot = null;
    for (let parts = String(path || "").split("."); parts.length && !slot; parts.pop()) {
      slot = form.querySelector(`[data-error-for="${CSS.escape(parts.join("."))}"]`);
    }
    slot = slot || form.querySelector('[data-error-for="request"]');
    const text = error.message || error.detail || problem.detail;
    slot.textContent = slot.textContent ? `${slot.textContent} ${text}` : text;
    const input = slot.closest(".field")?.querySelector("input, select, textarea");
    if (input) input.setAttribute("aria-invalid", "true");
  }
  const title = form.querySelector('[data-error-for="request"]');
  if (!title.textContent) title.textContent = `${problem.title}: see the fields above.`;
  form.querySelector('[aria-invalid="true"]')?.focus();
}

function optionInput(name, spec, value) {
  if (Array.isArray(spec.enum)) {
    const noDefault = value === undefined && (spec.default === undefined || spec.default === null);
    const select = h("select", {}, noDefault ? h("option", { value: "" }, "server default") : null,
      spec.enum.map((v) => h("option", { value: v }, v)));
    select.value = value ?? spec.default ?? "";
    return select;
  }
  if (spec.type === "bool" || spec.type === "boolean") {  // a true/false choice, sent as a JSON boolean
    const select = h("select", {}, ["true", "false"].map((v) => h("option", { value: v }, v)));
    select.value = String(value ?? spec.default ?? true);
    select.dataset.kind = "bool";
    return select;
  }
  const type = spec.type === "integer" || spec.type === "int" ? "int" : spec.type === "number" || spec.type === "float" ? "float" : "text";
  const attrs = { type: type === "text" ? "text" : "number", inputmode: type === "text" ? null : "decimal" };
  if (type !== "text") {
    attrs.step = type === "int" ? 1 : "any";
    attrs.min = spec.minimum ?? (spec.exclusiveMinimum !== undefined ? spec.exclusiveMinimum : null);
    attrs.max = spec.maximum ?? spec.exclusiveMaximum ?? null;
  }
  const input = h("input", attrs);
  input.dataset.kind = spec.type === "list[int]" ? "list" : spec.type === "array" ? "json" : type;
  if (spec.type === "array") input.placeholder = "JSON, e.g. [[0,1,2,3,4],[5,6,7,8,9]]";
  if (value !== undefined && value !== null) input.value = Array.isArray(value) ? value.join(",") : value;
  return input;
}

function optionValue(input) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  const kind = input.dataset.kind;
  if (kind === "bool") return raw === "true";
  if (kind === "int") return Number.isInteger(Number(raw)) ? Number(raw) : raw;
  if (kind === "float") return Number.isFinite(Number(raw)) ? Number(raw) : raw;
  if (kind === "json") {  // sent as typed when it is not JSON: the server names the field
    try { return JSON.parse(raw); } catch { return raw; }
  }
  if (kind === "list") return raw.split(/[\s,]+/).filter(Boolean).map((v) => (Number.isFinite(Number(v)) ? Number(v) : v));
  return raw;
}

function range(spec) {
  const parts = [];
  if (spec.minimum !== undefined) parts.push(`≥ ${spec.minimum}`);
  if (spec.exclusiveMinimum !== undefined) parts.push(`> ${spec.exclusiveMinimum}`);
  if (spec.maximum !== undefined) parts.push(`≤ ${spec.maximum}`);
  if (spec.exclusiveMaximum !== undefined) parts.push(`< ${spec.exclusiveMaximum}`);
  return parts.join(", ");
}

async function newJobView() {
  main.replaceChildren(title("New merge"), h("p", { class: "muted" }, "Loading checkpoints, datasets and architectures…"));
  let checkpoints, datasets, architectures, doc;
  try {
    [checkpoints, datasets, architectures, doc] = await Promise.all([
      allPages("/v1/checkpoints"), allPages("/v1/datasets"), api("GET", "/v1/architectures"), api("GET", "/openapi.json")]);
  } catch (e) {
    main.replaceChildren(title("New merge"), problemBox(e));
    return;
  }
  const jobSchema = resolve(doc.paths["/v1/jobs"].post.requestBody.content["application/json"].schema, doc);
  const props = jobSchema.properties;
  const optionsSchema = resolve(props.options, doc);

  const methodEnum = resolve(props.method, doc).enum || ["weight_matching"];
  const methodDefault = resolve(props.method, doc).default || "weight_matching";
  let methodPicked = false; // the user chose a method: choosing a dataset does not change it
  const methodSelect = h("select", { name: "method", onchange: () => { methodPicked = true; } });
  // auto compares the methods on the dataset's held-out split: offered, first and chosen, once a dataset is chosen;
  // zip (which merges features by their correlations on the dataset) is offered once a dataset is chosen
  function renderMethods() {
    const withData = Boolean(datasetSelect.value) && methodEnum.includes("auto");
    const names = withData ? ["auto", ...methodEnum.filter((m) => m !== "auto")] : methodEnum.filter((m) => m !== "auto" && m !== "zip");
    const current = methodSelect.value;
    methodSelect.replaceChildren(...names.map((m) => h("option", { value: m }, m.replace("_", " "))));
    methodSelect.value = methodPicked && names.includes(current) ? current : (withData ? "auto" : methodDefault);
  }

  // Checkpoints: one select per model, A first.
  const checkpointOptions = () => [h("option", { value: "" }, "— choose —"),
    ...checkpoints.map((c) => h("option", { value: c.id }, `${c.name} (${bytes(c.size_bytes)}, ${c.id})`))];
  const models = h("ol", { class: "models" });
  const addModel = () => {
    const n = models.children.length;
    const select = h("select", { name: `checkpoint-${n}`, "aria-label": `Model ${String.fromCharCode(65 + n)}`, onchange: inferDefaults }, checkpointOptions());
    const remove = h("button", { type: "button", class: "link", onclick: () => { item.remove(); inferDefaults(); } }, "remove");
    const item = h("li", {}, h("span", { class: "model-label" }, `Model ${String.fromCharCode(65 + n)}`), select,
      n >= 2 ? remove : null, fieldError(`checkpoints.${n}`));
    models.appendChild(item);
  };
  addModel(); addModel();
  const modelsField = h("div", { class: "field", "data-field": "checkpoints" },
    h("span", { class: "label" }, "Checkpoints (A first; more than two: MergeMany)"), models,
    h("button", { type: "button", onclick: addModel }, "+ Add a model"), fieldError("checkpoints"));

  // Architecture or permutation spec.
  // A free name with suggestions: torchvision/<name>, timm/<name> and plugins are valid too.
  const archSelect = h("input", { name: "architecture", list: "architecture-names", value: architectures.items[0]?.name || "",
    autocomplete: "off", onchange: () => {
      // the input fires change again when focus leaves it: keep the options shown (and what was typed in them)
      if (archSelect.value.trim() === archShown) return;
      renderArchOptions();
      inferDefaults();
    } });
  const archNames = h("datalist", { id: "architecture-names" }, architectures.items.map((a) => h("option", { value: a.name })));
  const archHelp = h("p", { class: "help" });
  const archOptions = h("div", { class: "grid" });
  let archInputs = {};
  let archShown = null;
  function renderArchOptions(inferred = {}) {
    archShown = archSelect.value.trim();
    const arch = architectures.items.find((a) => a.name === archShown);
    archHelp.textContent = arch ? arch.description : "Options as the library's constructor takes them, as JSON (num_classes is inferred).";
    archInputs = {};
    if (!arch) {
      const json = h("textarea", { rows: 2, placeholder: '{"drop_rate": 0.0}' });
      json.dataset.kind = "json";
      archInputs[""] = json;
      archOptions.replaceChildren(field("architecture.options", "Options (JSON)", json));
      return;
    }
    archOptions.replaceChildren(...Object.entries(arch ? arch.options : {}).map(([name, spec]) => {
      const input = optionInput(name, spec, inferred[name]);
      input.placeholder = inferred[name] === undefined ? `default ${Array.isArray(spec.default) ? spec.default.join(",") : spec.default}` : "";
      archInputs[name] = input;
      return field(`architecture.options.${name}`, name, input, `${spec.description}${inferred[name] !== undefined ? " · value implied by model A" : ""}`);
    }));
  }
  let inferring = 0;
  async function inferDefaults() {
    // Answers can arrive out of order (model A chosen, then the architecture typed): only the latest is shown.
    const asked = ++inferring;
    const first = models.querySelector("select")?.value;
    if (!first) { renderArchOptions(); return; }
    let inferred = {};
    try {
      const answer = await api("GET", `/v1/architectures/inferred-options?name=${encodeURIComponent(archSelect.value)}&checkpoint=${encodeURIComponent(first)}`);
      inferred = answer.options;
    } catch { /* no implied values: the defaults show */ }
    if (asked === inferring) renderArchOptions(inferred);
  }
  renderArchOptions();
  const specFile = h("input", { type: "file", accept: ".json,application/json" });
  const useArch = h("input", { type: "radio", name: "model-kind", value: "architecture", id: "kind-arch", checked: true, onchange: toggleKind });
  const useSpec = h("input", { type: "radio", name: "model-kind", value: "spec", id: "kind-spec", onchange: toggleKind });
  const archBlock = h("div", {}, field("architecture", "Architecture", archSelect), archNames, archHelp, archOptions);
  const specBlock = h("div", { hidden: true }, field("permutation_spec", "Permutation spec (JSON, from rebasin spec)", specFile));
  function toggleKind() { archBlock.hidden = !useArch.checked; specBlock.hidden = useArch.checked; }

  const datasetOptions = () => [h("option", { value: "" }, "none"),
    ...datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.num_examples} examples, ${d.id})`))];
  const datasetSelect = h("select", { name: "dataset", onchange: renderMethods }, datasetOptions());
  renderMethods();
  const evalSelect = h("select", { name: "eval_dataset" }, datasetOptions());

  // Job options straight from the OpenAPI schema: new options appear without this code changing.
  const optionInputs = {};
  const optionFields = Object.entries(optionsSchema.properties || {}).map(([name, raw]) => {
    const spec = resolve(raw, doc);
    const input = optionInput(name, spec, spec.default);
    if (spec.default === undefined || spec.default === null) input.placeholder = "server default";
    optionInputs[name] = input;
    const help = [spec.description, range(spec)].filter(Boolean).join(" · ");
    return field(`options.${name}`, raw.title || spec.title || name, input, help);
  });
  const deviceSpec = resolve(props.device || {}, doc);
  const device = h("input", { type: "text", name: "device", value: deviceSpec.default || "auto" });

  let lastAttempt = null;
  const submit = h("button", { type: "submit", class: "primary" }, "Start merge");
  const form = h("form", { class: "card", id: "job-form", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    let body;
    try {
      body = await collect();
    } catch (problem) {
      showProblem(form, problem);
      return;
    }
    // The same body again (after a network error, say) reuses its Idempotency-Key: at most one job.
    const text = JSON.stringify(body);
    if (!lastAttempt || lastAttempt.text !== text) lastAttempt = { text, key: newKey() };
    submit.disabled = true;
    try {
      const job = await api("POST", "/v1/jobs", body, { "Idempotency-Key": lastAttempt.key });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      showProblem(form, e.problem || { title: "Error", detail: String(e) });
    } finally {
      submit.disabled = false;
    }
  } },
  h("fieldset", {}, h("legend", {}, "Models"), field("method", "Method", methodSelect), modelsField),
  h("fieldset", {}, h("legend", {}, "Permutation symmetries"),
    h("div", { class: "radios" }, useArch, h("label", { for: "kind-arch" }, "Architecture"), useSpec, h("label", { for: "kind-spec" }, "Permutation spec file")),
    archBlock, specBlock),
  h("fieldset", {}, h("legend", {}, "Data"),
    field("dataset", "Dataset (activation, STE matching and auto; BN reset)", datasetSelect),
    field("eval_dataset", "Evaluation dataset (enables the barrier report)", evalSelect)),
  h("fieldset", {}, h("legend", {}, "Options"), h("div", { class: "grid" }, optionFields, field("device", "Device", device, "auto, cpu or cuda:N"))),
  fieldError("request"), submit);

  async function collect() {
    const body = { method: methodSelect.value, checkpoints: [...models.querySelectorAll("select")].map((s) => s.value) };
    const missing = body.checkpoints.findIndex((v) => !v);
    if (missing >= 0) throw { title: "Invalid request", errors: [{ field: `checkpoints.${missing}`, message: "Choose a checkpoint." }] };
    if (useArch.checked) {
      const options = {};
      for (const [name, input] of Object.entries(archInputs)) {
        if (input.dataset.kind === "json") {
          try {
            Object.assign(options, input.value.trim() ? JSON.parse(input.value) : {});
          } catch (e) {
            throw { title: "Invalid request", errors: [{ field: "architecture.options", message: `Not JSON: ${e.message}` }] };
          }
          continue;
        }
        const value = optionValue(input);
        if (value !== undefined) options[name] = value;
      }
      body.architecture = { name: archSelect.value.trim(), options };
    } else {
      if (!specFile.files.length) throw { title: "Invalid request", errors: [{ field: "permutation_spec", message: "Choose a spec JSON file." }] };
      try {
        body.permutation_spec = JSON.parse(await specFile.files[0].text());
      } catch (e) {
        throw { title: "Invalid request", errors: [{ field: "permutation_spec", message: `Not JSON: ${e.message}` }] };
      }
    }
    if (datasetSelect.value) body.dataset = datasetSelect.value;
    if (evalSelect.value) body.eval_dataset = evalSelect.value;
    body.options = {};
    for (const [name, input] of Object.entries(optionInputs)) {
      const value = optionValue(input);
      if (value !== undefined) body.options[name] = value;
    }
    body.device = device.value.trim() || "auto";
    return body;
  }

  const hint = h("p", { class: "problem", hidden: checkpoints.length >= 2 },
    "Upload at least two checkpoints first: ", h("a", { href: "#/files" }, "Checkpoints & datasets"), ".");
  main.replaceChildren(title("New merge"), hint, form);
}

// --- one job -----------------------------------------------------------------------------------------------

function jobView(jobId) {
  const head = h("div", { class: "job-head" });
  const live = h("section", { class: "card", "aria-live": "polite" });
  const outcome = h("div");
  const request = h("details", { class: "card" });
  main.replaceChildren(title(`Job ${jobId}`), head, live, outcome, request);
  let job = null;

  const stage = h("p", { id: "stage" });
  const bar = h("progress", { id: "progress", max: 1, value: 0, "aria-label": "Job progress" });
  const elapsed = h("span", { id: "elapsed" });
  const attempts = h("span", { id: "attempts" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel", onclick: async () => {
    cancel.disabled = true;
    try {
      render(await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/cancel`));
    } catch (e) {
      live.appendChild(problemBox(e));
    }
  } }, "Cancel job");
  live.replaceChildren(stage, bar, h("p", {}, "Elapsed: ", elapsed, " · Attempts: ", attempts), cancel);

  function tick() {
    if (!job) return;
    const start = Date.parse(job.started_at || job.created_at);
    const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
    elapsed.textContent = duration((end - start) / 1000);
  }
  const timer = setInterval(tick, 1000);
  onCleanup(() => clearInterval(timer));

  let rendered = null;
  function render(next) {
    job = next;
    head.replaceChildren(badge(job.status), " ", h("span", {}, job.method.replace("_", " ")), " · created ", age(job.created_at));
    const p = job.progress || { stage: job.status, completed: 0, total: 0, message: "" };
    stage.textContent = `Stage: ${p.stage}${p.message ? ` · ${p.message}` : ""}${p.total ? ` (${p.completed}/${p.total})` : ""}`;
    if (job.status === "succeeded") { bar.max = 1; bar.value = 1; }
    else if (p.total) { bar.max = p.total; bar.value = p.completed; } else bar.removeAttribute("value");
    attempts.textContent = String(job.attempts ?? 0);
    cancel.hidden = !["queued", "running"].includes(job.status);
    if (job.status === "running" && job.cancel_requested) cancel.disabled = true;
    tick();
    request.replaceChildren(h("summary", {}, "Request"), h("pre", {}, JSON.stringify(job.request, null, 2)));
    if (rendered === job.status || !["succeeded", "failed", "cancelled"].includes(job.status)) return;
    rendered = job.status;
    if (job.status === "failed" && job.error) {
      outcome.replaceChildren(h("section", { class: "card problem", id: "job-error", role: "alert" },
        h("h2", {}, job.error.title || "Failed"), h("p", {}, job.error.detail || "")));
    } else if (job.status === "cancelled") {
      outcome.replaceChildren(h("p", { class: "card", id: "job-cancelled" }, "This job was cancelled."));
    } else if (job.status === "succeeded") {
      outcome.replaceChildren(resultView(job));
    }
  }

  let left = false;
  onCleanup(() => { left = true; });
  api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`).then((first) => {
    if (left) return;  // the page was left before the job arrived: open no stream
    render(first);
    if (["succeeded", "failed", "cancelled"].includes(first.status)) return;
    // Live updates from the server's event stream (it sends the job on every change, then "end").
    const source = new EventSource(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
    const onEvent = (event) => render(JSON.parse(event.data));
    source.addEventListener("progress", onEvent);
    source.addEventListener("end", (event) => { onEvent(event); source.close(); });
    onCleanup(() => source.close());
  }).catch((e) => main.replaceChildren(title(`Job ${jobId}`), problemBox(e)));
}

function resultView(job) {
  const result = job.result || {};
  const section = h("section", { class: "card", id: "result" }, h("h2", {}, "Result"));
  const m = result.matching;
  if (m) {
    section.appendChild(h("p", {}, `Matching: objective ${num(m.objective_initial)} → ${num(m.objective_final)} in ${m.iterations} iterations, ${num(m.seconds)} s.`));
  }
  if (result.barrier) {
    const split = result.evaluation ? `${result.evaluation.split}, ${result.evaluation.num_examples} examples` : "";
    section.appendChild(h("h3", {}, "Loss barrier", split ? h("span", { class: "muted" }, ` (held-out split: ${split})`) : ""));
    const rows = Object.entries(result.barrier).map(([name, b]) => h("tr", { "data-pair": name },
      h("th", { scope: "row" }, name),
      h("td", { "data-metric": "loss" }, num(b.loss)),
      h("td", { "data-metric": "accuracy" }, num(b.accuracy))));
    section.appendChild(h("table", { id: "barrier" }, h("thead", {}, h("tr", {}, h("th", {}, "Pair"), h("th", {}, "Loss barrier"), h("th", {}, "Accuracy barrier"))), h("tbody", {}, rows)));
    if (result.merged) section.appendChild(h("p", { id: "merged-metrics" }, `Merged model: loss ${num(result.merged.loss)}, accuracy ${num(result.merged.accuracy)}.`));
  } else {
    section.appendChild(h("p", { class: "muted" }, "No evaluation dataset was given, so there is no barrier report."));
  }
  if (result.auto) {
    // every candidate auto ran, the kept one marked; those it did not run, with why
    const rows = Object.entries(result.auto.candidates).map(([name, c]) => h("tr", { "data-candidate": name },
      h("th", { scope: "row" }, name.replace("_", " "), name === result.auto.chosen ? " (kept)" : ""),
      h("td", { "data-metric": "score" }, num(c.score)), h("td", {}, `${num(c.seconds)} s`)));
    const skipped = Object.entries(result.auto.skipped || {}).map(([name, why]) => h("tr", { "data-candidate": name },
      h("th", { scope: "row" }, name.replace("_", " ")), h("td", { colspan: 2, class: "muted" }, `not run: ${why}`)));
    section.appendChild(h("h3", {}, "Candidates (auto)"));
    section.appendChild(h("table", { id: "candidates" }, h("thead", {}, h("tr", {}, h("th", {}, "Method"), h("th", {}, "Held-out barrier"), h("th", {}, "Time"))),
      h("tbody", {}, rows, skipped)));
  }
  if (result.joint_accuracy) {
    const joint = result.joint_accuracy;
    const rows = ["ensemble", "full_merge", "zipped"].filter((k) => joint[k] !== undefined).map((k) => h("tr", { "data-model": k },
      h("th", { scope: "row" }, k.replace("_", " ")), h("td", { "data-metric": "joint_accuracy" }, num(joint[k]))));
    section.appendChild(h("h3", {}, "Joint accuracy", h("span", { class: "muted" }, ` (label sets ${JSON.stringify(joint.label_sets)})`)));
    section.appendChild(h("table", { id: "joint-accuracy" }, h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", {}, "Joint accuracy"))), h("tbody", {}, rows)));
  }
  const partial = result.partial;
  if (partial && partial.cut) {
    section.appendChild(h("p", { id: "partial" }, `Partial merge: merged up to ${partial.cut}; ${partial.shared.length} tensors shared, `
      + `${partial.heads.length} per head; ${num(partial.flops.zipped)} FLOPs against ${num(partial.flops.two_models)} for the two models.`));
  }
  if (partial && partial.cuts) drawSweep(section, partial, result.joint_accuracy);
  if (result.curves) drawCurves(section, result.curves, `Interpolation from model A (λ = 0) to model B (λ = 1)${result.evaluation ? `, on ${result.evaluation.split}` : ""}`);
  section.appendChild(h("h3", {}, "Downloads"));
  section.appendChild(h("ul", { class: "artifacts" }, job.artifacts.map((a) => h("li", {},
    h("a", { class: "button", href: `/v1/jobs/${encodeURIComponent(job.id)}/artifacts/${encodeURIComponent(a.name)}`, download: a.name, "data-artifact": a.name },
      `Download ${a.name}`), ` ${bytes(a.size_bytes)}`, h("span", { class: "mono muted small", title: a.sha256 }, ` sha256 ${a.sha256.slice(0, 12)}…`)))));
  section.appendChild(h("details", {}, h("summary", {}, "Full report"), h("pre", {}, JSON.stringify(result, null, 2))));
  return section;
}

// --- routing -----------------------------------------------------------------------------------------------

async function route() {
  cleanups.forEach((fn) => fn());
  cleanups = [];
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("#nav a").forEach((a) => a.toggleAttribute("aria-current", a.getAttribute("href") === `#${path}`));
  if (!session.signed_in) { signInView(); return; }
  if (path === "/signin") { location.hash = "#/jobs"; return; }
  const job = path.match(/^\/jobs\/([^/]+)$/);
  if (job) jobView(decodeURIComponent(job[1]));
  else if (path === "/new") await newJobView();
  else if (path === "/files") filesView();
  else jobsView(params);
  main.focus({ preventScroll: true });
}

window.addEventListener("hashchange", route);
loadSession().then(route).catch((e) => main.replaceChildren(problemBox(e)));
