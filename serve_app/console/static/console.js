// The imageserve console (docs/console.md): a playground over the OpenAI images API and a view of the fleet.
// It calls only the public API, relative to where the page is served (<root>/ui -> <root>/v1/...), with the key
// the user typed, kept in this tab's sessionStorage. It never writes the key anywhere else, nor logs it.
"use strict";

const KEY_STORE = "imageserve.apiKey";
const FLEET_REFRESH_MS = 3000;
const MAX_EDIT_IMAGES = 3;
const COMMON_SIZES = ["512x512", "768x768", "1024x1024", "1024x1536", "1536x1024", "auto"];
const API_ROOT = new URL(".", window.location.href);  // the page is <root>/ui: the API is <root>/v1/...

const $ = (id) => document.getElementById(id);
const state = { models: [], images: [], fleetTimer: null, busy: false };

// ---- calls to the API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  // The error in words, from the service's JSON body: {"error": {"code", "message", ...}}. A stream's error
  // event has no status of its own (the stream began with 200).
  describe() {
    const where = [this.code, this.status ? `HTTP ${this.status}` : null].filter(Boolean).join(", ");
    const retry = this.retryAfter ? `; retry after ${this.retryAfter} s` : "";
    return `${this.message} (${where}${retry})`;
  }
}

async function errorOf(response) {
  let code = null;
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || null;
      message = body.error.message || message;
    }
  } catch (_) {
    // not JSON (a proxy's page): the status says it
  }
  return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
}

async function call(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(new URL(path, API_ROOT), { ...init, headers, cache: "no-store", credentials: "omit" });
  if (!response.ok) {
    const error = await errorOf(response);
    if (error.status === 401) askForKey(error.message);
    throw error;
  }
  return response;
}

// ---- keys ------------------------------------------------------------------------------------------------

function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-error").textContent = message || "";
  showKeyState();
}

function showKeyState() {
  const held = Boolean(sessionStorage.getItem(KEY_STORE));
  $("key-state").textContent = held ? "using an API key" : "";
  $("forget-key").hidden = !held;
}

function setUpKeys() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-panel").hidden = true;
    $("key-error").textContent = "";
    showKeyState();
    start();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    showKeyState();
    start();
  });
  showKeyState();
}

// ---- models ------------------------------------------------------------------------------------------

function task() {
  return document.querySelector("input[name=task]:checked").value;
}

async function loadModels() {
  const answer = await (await call("v1/models")).json();
  state.models = answer.data;
  fillModels();
}

function fillModels() {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const card of state.models) {
    const tasks = card.tasks || [card.task];
    if (!card.served || !tasks.includes(task())) continue;
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.alias_for ? `${card.id} (alias)` : card.id;
    select.append(option);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  describeModel();
}

function cardOf(id) {
  return state.models.find((card) => card.id === id);
}

const MODE_WORDS = { none: "resident", model: "with model offload", sequential: "with sequential offload" };

// What the picked model needs (VRAM per offload mode, the GPU classes it fits) and which pools serve it now.
function describeModel() {
  const card = cardOf($("model").value);
  const loras = $("lora");
  loras.replaceChildren(new Option("none", ""));
  $("model-gpus").hidden = true;
  if (!card) {
    $("model-info").textContent = "No served model takes this task.";
    return;
  }
  const variant = card.alias_for ? cardOf(card.alias_for[0]) || card : card;
  const parts = [];
  if (card.alias_for) parts.push(`alias for ${card.alias_for.join(", ")}`);
  if (variant.vram_gib) {
    const needs = Object.entries(variant.vram_gib).map(([mode, gib]) => `${gib} GiB ${MODE_WORDS[mode] || mode}`);
    parts.push(`needs ${needs.join(", ")} at ${variant.vram_planned_at.size}`);
  }
  if (card.pools) {
    const pools = card.pools.map((p) => `${p.pool} (${p.gpu_class || "cpu"}), ${p.replicas} running`).join("; ");
    parts.push(`served now on ${pools || "no pool"}`);
  } else if (card.resolves_to) {
    parts.push(`lands on ${Object.entries(card.resolves_to).map(([pool, v]) => `${v} on ${pool}`).join(", ")}`);
  }
  if (variant.default_steps) parts.push(`${variant.default_steps} steps by default`);
  $("model-info").textContent = parts.join(" · ");
  if (variant.gpu_classes) {
    $("model-gpus").hidden = false;
    $("model-gpus-count").textContent = String(variant.gpu_classes.length);
    $("model-gpus-list").textContent = variant.gpu_classes
      .map((g) => `${g.gpu_class} (${g.peak_vram_gib} GiB ${MODE_WORDS[g.offload_mode] || g.offload_mode})`)
      .join(", ");
  }
  $("size").placeholder = variant.default_size ? `default ${variant.default_size}` : "model default";
  const sizes = $("sizes");
  sizes.replaceChildren(...[variant.default_size, ...COMMON_SIZES].filter(Boolean).map((s) => new Option(s)));
  for (const name of variant.loras || []) loras.append(new Option(name, name));
}

// ---- the request -------------------------------------------------------------------------------------

function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

// The request's fields, by the names of the OpenAI images API (and imageserve's additions), unset ones left out.
function fields() {
  const stream = $("stream").checked;
  const wanted = {
    prompt: $("prompt").value,
    model: $("model").value || null,
    size: $("size").value.trim() || null,
    num_inference_steps: numberOf("steps"),
    seed: numberOf("seed"),
    n: numberOf("n"),
    output_format: $("output-format").value,
    quality: $("quality").value,
    stream: stream || null,
    partial_images: stream ? numberOf("partial-images") : null,
  };
  return Object.fromEntries(Object.entries(wanted).filter(([, value]) => value !== null));
}

function requestInit() {
  const body = fields();
  const lora = $("lora").value;
  const scale = numberOf("lora-scale");
  if (task() === "generate") {
    if (lora) body.lora = { name: lora, scale: scale === null ? 1 : scale };
    return ["v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }];
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) form.append(name, String(value));
  if (lora) {
    form.append("lora", lora);
    if (scale !== null) form.append("lora_scale", String(scale));
  }
  for (const file of state.images) form.append("image[]", file, file.name);
  return ["v1/images/edits", { method: "POST", body: form }];
}

async function submit(event) {
  event.preventDefault();
  if (state.busy) return;
  if (task() === "edit" && state.images.length === 0) {
    showError("An edit needs 1 to 3 input images: drop them here or pick them.");
    return;
  }
  showError(null);
  $("results").replaceChildren();
  $("event-log").replaceChildren();
  setBusy(true);
  const started = performance.now();
  try {
    const response = await call(...requestInit());
    if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      await readStream(response);
    } else {
      const answer = await response.json();
      answer.data.forEach((image, index) => showFinal(index, image.b64_json, {
        seed: image.seed, model: answer.model, format: answer.output_format, internals: "pool" in answer,
        pool: answer.pool, gpu_class: answer.gpu_class }));
    }
    $("progress").textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (error) {
    showError(error instanceof ApiError ? error.describe() : `the request failed: ${error.message}`);
    $("progress").textContent = "";
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("submit").disabled = busy;
  if (busy) $("progress").textContent = "waiting for the service…";
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

// Server-Sent Events from a POST (EventSource can only GET): read the body as it arrives, one event per blank line.
async function readStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      handleEvent(block);
    }
  }
}

function handleEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;  // a keep-alive comment
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (data.length === 0) return;
  const payload = JSON.parse(data.join("\n"));
  if (name === "error") throw new ApiError(null, payload.error.code, payload.error.message, null);
  const index = payload.image_index || 0;
  if (name.endsWith(".partial_image")) {
    showPreview(index, payload.b64_json, payload.partial_image_index, payload.output_format);
  } else if (name.endsWith(".completed")) {
    showFinal(index, payload.b64_json, {
      seed: payload.seed, model: payload.model, format: payload.output_format, internals: "pool" in payload,
      pool: payload.pool, gpu_class: payload.gpu_class });
  }
}

// ---- results -----------------------------------------------------------------------------------------

function blobOf(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: `image/${format || "png"}` });
}

function slot(index) {
  let card = document.querySelector(`#results .result[data-index="${index}"]`);
  if (!card) {
    card = document.createElement("figure");
    card.className = "result";
    card.dataset.index = String(index);
    card.dataset.previews = "0";
    card.append(document.createElement("img"), document.createElement("p"));
    $("results").append(card);
  }
  return card;
}

function setImage(card, b64, format, alt) {
  const img = card.querySelector("img");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blobOf(b64, format));
  img.alt = alt;
  return img.src;
}

function logEvent(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("event-log").append(item);
}

function showPreview(index, b64, previewIndex, format) {
  const card = slot(index);
  if (card.classList.contains("final")) return;  // a late preview never covers the final image
  card.classList.add("preview");
  card.dataset.previews = String(Number(card.dataset.previews) + 1);
  setImage(card, b64, format, `preview ${previewIndex + 1} of image ${index + 1}`);
  card.querySelector("p").textContent = `preview ${previewIndex + 1}…`;
  logEvent(`preview ${previewIndex + 1} of image ${index + 1}`);
}

function showFinal(index, b64, about) {
  const card = slot(index);
  card.classList.remove("preview");
  card.classList.add("final");
  const format = about.format || "png";
  const url = setImage(card, b64, format, `image ${index + 1}`);
  // Where it ran, when the service shows its internals: a CPU replica outside GPU pools has neither.
  const where = about.internals ? ` · pool ${about.pool || "none"} · ${about.gpu_class || "CPU"}` : "";
  const caption = card.querySelector("p");
  caption.textContent = `${about.model || ""} · seed ${about.seed}${where} · `;
  const link = document.createElement("a");
  link.href = url;
  link.download = `imageserve-${about.model || "image"}-seed${about.seed}${about.pool ? `-${about.pool}` : ""}.${format}`;
  link.textContent = "download";
  caption.append(link);
  card.dataset.seed = String(about.seed);
  logEvent(`final image ${index + 1}`);
}

// ---- edit inputs -------------------------------------------------------------------------------------

function takeImages(files) {
  const images = [...files].filter((f) => /^image\/(png|jpeg|webp)$/.test(f.type));
  if (images.length > MAX_EDIT_IMAGES) {
    showError(`An edit takes at most ${MAX_EDIT_IMAGES} images: the first ${MAX_EDIT_IMAGES} are kept.`);
  }
  state.images = images.slice(0, MAX_EDIT_IMAGES);
  const thumbs = $("thumbs");
  for (const img of thumbs.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  thumbs.replaceChildren(...state.images.map((file) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    return img;
  }));
}

function setUpEditInputs() {
  $("images").addEventListener("change", (event) => takeImages(event.target.files));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    takeImages(event.dataTransfer.files);
  });
  for (const radio of document.querySelectorAll("input[name=task]")) {
    radio.addEventListener("change", () => {
      $("edit-inputs").hidden = task() !== "edit";
      $("submit").textContent = task() === "edit" ? "Edit" : "Generate";
      fillModels();
    });
  }
}

// ---- fleet -------------------------------------------------------------------------------------------

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function placementOf(route) {
  const how = { replicas: "own replicas", swap_group: "swap group", resident_member: "resident member" };
  const parts = [how[route.placement] || route.placement];
  if (route.offload_mode) parts.push(route.offload_mode);
  if (route.parallel) parts.push(route.parallel);
  return parts.join(", ");
}

function renderFleet(fleet) {
  $("fleet-hidden").hidden = fleet.internals;
  $("pools").hidden = !fleet.internals;
  $("pools-title").hidden = !fleet.internals;
  $("pools").tBodies[0].replaceChildren(...(fleet.pools || []).map((pool) => {
    const row = document.createElement("tr");
    row.dataset.pool = pool.pool;
    row.append(cell(pool.pool), cell(pool.gpu_name || pool.gpu_class || "cpu"), cell(pool.vram_gib, "num"),
      cell(pool.variants.join(", ")));
    return row;
  }));
  const rows = [];
  for (const variant of fleet.variants) {
    for (const route of variant.routes || [null]) {
      const row = document.createElement("tr");
      row.dataset.variant = variant.id;
      const latency = variant.latency || {};
      row.append(cell(variant.id), cell(variant.ready ? "ready" : "not ready", variant.ready ? "ready" : "not-ready"));
      if (route) {
        row.dataset.running = String(route.running);
        row.append(cell(`${route.pool} (${route.gpu_class || "cpu"})`), cell(route.running, "num"),
          cell(route.starting, "num"), cell(placementOf(route)), cell(route.queue_depth, "num"),
          cell(latency.p50_s, "num"), cell(latency.p95_s, "num"), cell(latency.count, "num"));
      } else {
        row.append(...Array.from({ length: 8 }, () => cell(null)));
      }
      rows.push(row);
    }
  }
  $("variants").tBodies[0].replaceChildren(...rows);
  $("fleet-updated").textContent = `updated ${new Date().toLocaleTimeString()}, every ${FLEET_REFRESH_MS / 1000} s`;
}

async function refreshFleet() {
  try {
    renderFleet(await (await call("v1/fleet")).json());
    $("fleet-error").hidden = true;
  } catch (error) {
    $("fleet-error").hidden = false;
    $("fleet-error").textContent = error instanceof ApiError ? error.describe() : error.message;
  }
}

// ---- views -------------------------------------------------------------------------------------------

function showView() {
  const view = window.location.hash === "#fleet" ? "fleet" : "playground";
  $("playground").hidden = view !== "playground";
  $("fleet").hidden = view !== "fleet";
  $("tab-playground").classList.toggle("active", view === "playground");
  $("tab-fleet").classList.toggle("active", view === "fleet");
  clearInterval(state.fleetTimer);
  state.fleetTimer = null;
  if (view === "fleet") {
    refreshFleet();
    state.fleetTimer = setInterval(refreshFleet, FLEET_REFRESH_MS);  // only while the view is open
  }
}

async function start() {
  try {
    await loadModels();
    $("key-panel").hidden = true;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      showError(error instanceof ApiError ? error.describe() : `the service did not answer: ${error.message}`);
    }
  }
  showView();
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeys();
  setUpEditInputs();
  $("model").addEventListener("change", describeModel);
  $("request-form").addEventListener("submit", submit);
  window.addEventListener("hashchange", showView);
  start();
});
