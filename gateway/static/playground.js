// The gateway's playground: plain JavaScript, no framework, nothing from another host.
// It speaks to this gateway only: GraphQL over fetch (POST /graphql) and live job updates
// over a WebSocket with the graphql-transport-ws protocol, written out below.
"use strict";

const ENDPOINT = "/graphql";
const KEY_STORE = "gateway.playground.key";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const JOB_FIELDS = `id status provider url width height metadata creditCost createdAt
  completedAt error duration`;

const DOCS = {
  providers: `query Providers { providers { name kind enabled reason backends circuit } }`,
  me: `query Me { me { id name plan credits limits { name limit used remaining reset } } }`,
  jobs: `query RecentJobs($first: Int!) { jobs(first: $first) { nodes { ${JOB_FIELDS} } } }`,
  generate: `mutation GenerateImage($input: ImageGenerationInput!) {
  generateImage(input: $input) { ${JOB_FIELDS} } }`,
  updates: `subscription JobUpdates($id: ID!) { jobUpdates(id: $id) { ${JOB_FIELDS} } }`,
  job: `query Job($id: ID!) { job(id: $id) { ${JOB_FIELDS} } }`,
  estimate: `query Estimate($input: GenerateInput!) { estimate(input: $input) { credits backends } }`,
};

// What a person can do about each error code the API gives (docs/api.md#errors).
const HINTS = {
  UNAUTHENTICATED: "Check the key or token: it is unknown, revoked or expired.",
  FORBIDDEN: "This key or token may not do that (a client token is limited to its services and origins).",
  INSUFFICIENT_CREDITS: "Add credits to the key, or pick a smaller size.",
  RATE_LIMITED: "The plan's limit was reached.",
  BAD_USER_INPUT: "Fix the highlighted field and try again.",
  PAYLOAD_TOO_LARGE: "The request is too large.",
  SERVICE_UNAVAILABLE: "The gateway cannot reach its store right now.",
  INTERNAL_SERVER_ERROR: "Something broke on the gateway's side; it has been logged.",
  NETWORK: "Is the gateway running?",
  CONNECTION_REJECTED: "The live connection refused the key or token.",
  NO_KEY: "Paste an API key or a client token above first.",
};

const $ = (selector, root = document) => root.querySelector(selector);

/** An element: h("span", {class: "chip", dataset: {status}}, "text", child, ...). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name in el && name !== "list") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  return append(el, children);
}

/** Append children to el: nested lists flattened, null, undefined and false skipped. */
function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replace el's children (as `append` takes them). */
function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

class GatewayError extends Error {
  constructor(code, message, extensions = {}) {
    super(message);
    this.code = code;
    this.extensions = extensions;
  }
}

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  providers: [],
  running: null, // {id, started, stop}
  rate: null,
};

// ---------------------------------------------------------------- GraphQL over HTTP

async function gql(query, variables = {}) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let response;
  try {
    response = await fetch(ENDPOINT, {
      method: "POST",
      headers,
      body: JSON.stringify({ query, variables }),
    });
  } catch (err) {
    throw new GatewayError("NETWORK", `The gateway could not be reached (${err.message}).`);
  }
  noteRateHeaders(response.headers);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new GatewayError(`HTTP_${response.status}`, `The gateway answered ${response.status}.`);
  }
  if (body.errors && body.errors.length) throw errorOf(body.errors[0]);
  return body.data;
}

function errorOf(error) {
  const extensions = (error && error.extensions) || {};
  return new GatewayError(extensions.code || "ERROR", (error && error.message) || "Error", extensions);
}

function noteRateHeaders(headers) {
  const remaining = headers.get("X-RateLimit-Remaining");
  if (remaining !== null) {
    state.rate = { limit: headers.get("X-RateLimit-Limit"), remaining };
  }
}

// ------------------------------------------- graphql-transport-ws, by hand (one socket each)

function wsUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${ENDPOINT}`;
}

/**
 * Run one subscription: connection_init (the key as the Authorization payload), wait for
 * connection_ack, subscribe, then `next` results until `complete`. Answers pings.
 * sink: {next(data), error(GatewayError), complete()}. Returns a function that stops it.
 */
function subscribe(query, variables, sink) {
  const socket = new WebSocket(wsUrl(), "graphql-transport-ws");
  const id = crypto.randomUUID ? crypto.randomUUID() : String(Date.now() + Math.random());
  let acknowledged = false;
  let done = false;
  const send = (message) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  };
  const finish = (callback, arg) => {
    if (done) return;
    done = true;
    clearTimeout(ackTimer);
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000, "Normal Closure");
    if (callback) callback(arg);
  };
  const ackTimer = setTimeout(() => {
    if (!acknowledged) finish(sink.error, new GatewayError("TIMEOUT", "No connection_ack from the gateway."));
  }, 10000);

  socket.onopen = () => {
    const payload = state.key ? { Authorization: `Bearer ${state.key}` } : {};
    send({ type: "connection_init", payload });
  };
  socket.onmessage = (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      finish(sink.error, new GatewayError("PROTOCOL", "The gateway sent a frame that is not JSON."));
      return;
    }
    switch (message.type) {
      case "connection_ack":
        acknowledged = true;
        clearTimeout(ackTimer);
        send({ id, type: "subscribe", payload: { query, variables } });
        break;
      case "ping":
        send({ type: "pong" });
        break;
      case "next":
        if (message.id !== id) break;
        if (message.payload.errors && message.payload.errors.length) {
          finish(sink.error, errorOf(message.payload.errors[0]));
        } else {
          sink.next(message.payload.data);
        }
        break;
      case "error":
        if (message.id === id) finish(sink.error, errorOf((message.payload || [])[0]));
        break;
      case "complete":
        if (message.id === id) finish(sink.complete);
        break;
      default:
        break;
    }
  };
  socket.onclose = (event) => {
    if (done) return;
    finish(sink.error, closeError(event, acknowledged));
  };
  return () => {
    send({ id, type: "complete" });
    finish(null);
  };
}

function closeError(event, acknowledged) {
  // A refused connection_init says why in its reason, "CODE: message" (docs/api.md#auth):
  // 4403, or 1013 (try again later) for a limit or the gateway's store away.
  const refused = /^([A-Z_]+): ([\s\S]*)$/.exec(event.reason || "");
  if ((event.code === 4403 || event.code === 1013) && refused) {
    return new GatewayError(refused[1], refused[2]);
  }
  if (event.code === 4403 || event.code === 4401) {
    return new GatewayError("CONNECTION_REJECTED", "The live connection was refused.");
  }
  if (event.code >= 4400 && event.code < 4500) {
    return new GatewayError("PROTOCOL", `The live connection was closed: ${event.code} ${event.reason}`);
  }
  const when = acknowledged ? "closed" : "could not be opened";
  return new GatewayError("WS_CLOSED", `The live connection ${when} (${event.code}).`);
}

// ---------------------------------------------------------------- error banner

function showError(err) {
  const banner = $("#error");
  const code = err instanceof GatewayError ? err.code : "ERROR";
  const ext = (err && err.extensions) || {};
  let hint = HINTS[code] || "";
  if (code === "RATE_LIMITED" && ext.retryAfter !== undefined) {
    const limit = ext.limit ? ` (${ext.limit})` : "";
    hint = `The plan's limit${limit} was reached: try again in ${ext.retryAfter} s.`;
  }
  if (code === "INSUFFICIENT_CREDITS" && ext.creditsAvailable !== undefined) {
    hint = `This needs ${ext.creditsRequired ?? "more"} credits; ${ext.creditsAvailable} available.`;
  }
  $("[data-field=code]", banner).textContent = code;
  $("[data-field=message]", banner).textContent = err.message;
  $("[data-field=hint]", banner).textContent = hint;
  banner.dataset.code = code;
  banner.hidden = false;
  if (code === "BAD_USER_INPUT" && ext.field) markInvalid(ext.field);
}

function clearError() {
  $("#error").hidden = true;
  for (const el of document.querySelectorAll("[aria-invalid=true]")) el.removeAttribute("aria-invalid");
}

function markInvalid(field) {
  const name = String(field).split(".").pop().toLowerCase();
  const ids = { prompt: "prompt", text: "prompt", width: "size", height: "size", service: "service",
    provider: "service", seed: "seed", outputformat: "format" };
  const el = ids[name] && document.getElementById(ids[name]);
  if (el) {
    el.setAttribute("aria-invalid", "true");
    el.focus();
  }
}

// ---------------------------------------------------------------- key and account

function setKey(key) {
  state.key = key.trim();
  if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
  else sessionStorage.removeItem(KEY_STORE);
  $("#key").value = state.key;
  $("#key-forget").hidden = !state.key;
}

async function loadAccount() {
  const account = $("#account");
  if (!state.key) {
    account.hidden = true;
    return false;
  }
  try {
    const { me } = await gql(DOCS.me);
    renderAccount(me);
    return true;
  } catch (err) {
    account.hidden = true;
    showError(err);
    return false;
  }
}

function renderAccount(me) {
  const account = $("#account");
  const token = state.key.startsWith("gct_");
  $("[data-field=kind]", account).textContent = token ? "Client token" : "API key";
  $("[data-field=name]", account).textContent = me.name || me.id;
  $("[data-field=plan]", account).textContent = me.plan;
  $("[data-field=credits]", account).textContent = me.credits.toLocaleString();
  $("[data-field=credits-label]", account).textContent = token ? "credits left to spend" : "credits";
  const labels = { minute: "this minute", day: "today", concurrency: "running", read: "reads/min" };
  const meters = me.limits
    .filter((l) => l.name !== "read" && l.limit !== null)
    .map((l) => {
      const share = l.limit ? Math.min(100, (100 * l.used) / l.limit) : 0;
      const bar = h("span", { class: "bar" }, h("span"));
      bar.firstChild.style.width = `${share}%`;
      return h("span", { class: "meter", title: `${l.name}: ${l.used} of ${l.limit}` },
        bar, `${l.used}/${l.limit} ${labels[l.name] || l.name}`);
    });
  fill($("[data-field=limits]", account), ...meters);
  account.hidden = false;
}

// ---------------------------------------------------------------- services and sizes

async function loadProviders() {
  try {
    const { providers } = await gql(DOCS.providers);
    state.providers = providers;
  } catch {
    return; // keep the built-in `local` option
  }
  const select = $("#service");
  const previous = select.value || "local";
  const group = (label, kind) =>
    h("optgroup", { label },
      state.providers
        .filter((p) => p.kind === kind)
        .map((p) => h("option", { value: p.name, disabled: !p.enabled, title: p.reason },
          p.enabled ? p.name : `${p.name} (off)`)));
  fill(select, group("Services", "service"), group("Backends (pinned)", "backend"));
  const names = state.providers.filter((p) => p.enabled).map((p) => p.name);
  select.value = names.includes(previous) ? previous : names.includes("local") ? "local" : names[0] || "";
  describeService();
}

function describeService() {
  const name = $("#service").value;
  const info = state.providers.find((p) => p.name === name && p.kind === "service")
    || state.providers.find((p) => p.name === name);
  let note = "";
  if (info && info.kind === "service") note = `Routes to ${info.backends.join(" → ")}.`;
  if (info && info.kind === "backend") note = `Pinned to the ${info.name} backend.`;
  if (name === "local") note = "Offline preview renderer: an abstract picture, never Flux.";
  if (info && info.circuit && info.circuit !== "closed") note += ` Circuit ${info.circuit}.`;
  $("#service-note").textContent = note;
}

function size() {
  const [width, height] = $("#size").value.split("x").map(Number);
  return { width, height };
}

let estimateTimer = 0;
function scheduleEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(estimate, 250);
}

async function estimate() {
  const out = $("#estimate");
  if (!state.key) {
    out.textContent = "";
    return;
  }
  const { width, height } = size();
  const input = {
    provider: $("#service").value,
    input: { text: $("#prompt").value.trim() || "estimate" },
    options: { width, height },
  };
  try {
    const { estimate: e } = await gql(DOCS.estimate, { input });
    out.textContent = `${e.credits} credits`;
  } catch {
    out.textContent = "";
  }
}

// ---------------------------------------------------------------- generate, live status

function setStatus(status, source) {
  const el = $("#status");
  el.textContent = status;
  el.dataset.status = status;
  el.dataset.source = source || "";
}

function addTimeline(status, source) {
  const list = $("#timeline");
  const last = list.lastElementChild;
  if (last && last.dataset.status === status) return;
  const seconds = state.running ? (performance.now() - state.running.started) / 1000 : 0;
  list.append(h("li", { dataset: { status, source }, title: `via ${source}` },
    status, " ", h("time", {}, `${seconds.toFixed(2)} s`)));
}

function tickElapsed() {
  if (!state.running) return;
  const seconds = (performance.now() - state.running.started) / 1000;
  $("#elapsed").textContent = `${seconds.toFixed(1)} s`;
  state.running.frame = requestAnimationFrame(tickElapsed);
}

async function onGenerate(event) {
  event.preventDefault();
  clearError();
  if (!state.key) {
    showError(new GatewayError("NO_KEY", "No key or token yet."));
    $("#key").focus();
    return;
  }
  const prompt = $("#prompt").value.trim();
  if (!prompt) {
    showError(new GatewayError("BAD_USER_INPUT", "Write a prompt first.", { field: "prompt" }));
    return;
  }
  stopRunning();
  const { width, height } = size();
  const input = { service: $("#service").value, prompt, width, height };
  const seed = $("#seed").value.trim();
  if (seed !== "") input.seed = Number(seed);
  if ($("#format").value !== "png") input.outputFormat = $("#format").value;

  const button = $("#generate");
  button.disabled = true;
  fill($("#timeline"));
  state.running = { id: null, started: performance.now(), stop: null, frame: 0 };
  tickElapsed();
  setStatus("submitting", "");
  showStage("running", width, height);
  fill($("#job-meta"));
  try {
    const { generateImage: job } = await gql(DOCS.generate, { input });
    state.running.id = job.id;
    update(job, "mutation");
    if (!TERMINAL.has(job.status)) follow(job.id);
  } catch (err) {
    setStatus("idle", "");
    showStage("empty");
    stopRunning();
    showError(err);
    loadAccount();
  } finally {
    button.disabled = false;
  }
}

/** Follow a job live; if the WebSocket cannot be used at all, poll instead. */
function follow(id) {
  let heard = false;
  state.running.stop = subscribe(DOCS.updates, { id }, {
    next(data) {
      heard = true;
      update(data.jobUpdates, "live");
    },
    error(err) {
      if (!state.running || state.running.id !== id) return;
      if (err.code === "WS_CLOSED" && !heard) {
        poll(id);
        return;
      }
      showError(err);
      finishRun();
    },
    complete() {
      if (state.running && state.running.id === id) finishRun();
    },
  });
}

async function poll(id) {
  $("#service-note").textContent = "Live updates are unavailable here: checking every second.";
  while (state.running && state.running.id === id) {
    try {
      const { job } = await gql(DOCS.job, { id });
      if (job) update(job, "poll");
      if (!job || TERMINAL.has(job.status)) break;
    } catch (err) {
      showError(err);
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  finishRun();
}

function update(job, source) {
  setStatus(job.status, source);
  addTimeline(job.status, source);
  renderMeta(job);
  if (job.status === "completed" && job.url) showImage(job);
  if (job.status === "failed" || job.status === "cancelled") {
    showStage("empty");
    $("#placeholder").textContent = job.error ? `Failed: ${job.error}` : `The job was ${job.status}.`;
  }
  if (TERMINAL.has(job.status)) finishRun();
}

function finishRun() {
  if (!state.running) return;
  const seconds = (performance.now() - state.running.started) / 1000;
  $("#elapsed").textContent = `${seconds.toFixed(2)} s`;
  cancelAnimationFrame(state.running.frame);
  state.running = null;
  refresh();
}

function stopRunning() {
  if (!state.running) return;
  if (state.running.stop) state.running.stop();
  cancelAnimationFrame(state.running.frame);
  state.running = null;
}

function showStage(mode, width, height) {
  const stage = $("#stage");
  stage.dataset.state = mode;
  if (width && height) stage.style.aspectRatio = `${width} / ${height}`;
  if (mode !== "done") {
    $("#result").hidden = true;
    $("#placeholder").hidden = false;
    $("#placeholder").textContent = mode === "running" ? "Generating…" : "Your image appears here";
  }
}

function showImage(job) {
  const img = $("#result");
  const prompt = promptOf(job);
  img.onload = () => {
    img.dataset.loaded = "true";
    $("#stage").dataset.state = "done";
    $("#placeholder").hidden = true;
    img.hidden = false;
  };
  img.onerror = () => {
    $("#placeholder").textContent = "The image could not be loaded.";
  };
  delete img.dataset.loaded;
  img.alt = prompt ? `Generated: ${prompt}` : "Generated image";
  if (job.width && job.height) $("#stage").style.aspectRatio = `${job.width} / ${job.height}`;
  img.src = job.url;
}

function promptOf(job) {
  const meta = job.metadata || {};
  return (meta.sent && meta.sent.prompt) || meta.prompt || "";
}

function backendOf(job) {
  const meta = job.metadata || {};
  return meta.backend || job.provider;
}

function renderMeta(job) {
  const meta = job.metadata || {};
  const rows = [
    ["Job", h("code", {}, job.id)],
    ["Backend", backendOf(job)],
    ["Cost", costText(job)],
    ["Size", job.width ? `${job.width} × ${job.height}` : "—"],
    ["Seed", meta.seed ?? "—"],
    ["Took", job.duration != null ? `${Number(job.duration).toFixed(2)} s` : "—"],
  ];
  if (meta.cached) rows.push(["Cache", "hit"]);
  if (job.url) rows.push(["Image", h("a", { href: job.url, target: "_blank", rel: "noopener" }, "open")]);
  fill($("#job-meta"),
    ...rows.map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))));
}

function costText(job) {
  if (job.creditCost === 0 && (job.status === "failed" || job.status === "cancelled")) return "refunded";
  return `${job.creditCost} credit${job.creditCost === 1 ? "" : "s"}`;
}

// ---------------------------------------------------------------- gallery

async function loadGallery() {
  const list = $("#gallery");
  if (!state.key) {
    fill(list, h("li", { class: "empty muted" }, "Use a key to see its recent jobs."));
    return;
  }
  try {
    const { jobs } = await gql(DOCS.jobs, { first: 12 });
    fill(list, ...(jobs.nodes.length
      ? jobs.nodes.map(card)
      : [h("li", { class: "empty muted" }, "No jobs yet: generate one.")]));
  } catch (err) {
    fill(list, h("li", { class: "empty muted" }, `Could not list jobs (${err.code}).`));
  }
}

function card(job) {
  const prompt = promptOf(job);
  const done = job.status === "completed" && job.url;
  const thumb = h("div", { class: "thumb" },
    done ? h("img", { src: job.url, alt: prompt || "generated image", loading: "lazy", decoding: "async" })
      : job.status);
  const open = () => {
    clearError();
    stopRunning();
    fill($("#timeline"));
    $("#elapsed").textContent = "";
    setStatus(job.status, "gallery");
    renderMeta(job);
    if (done) {
      showImage(job);
    } else {
      showStage("empty", job.width, job.height);
    }
    window.scrollTo({ top: 0, behavior: "smooth" });
  };
  return h("li", {
    class: "job", tabIndex: 0, dataset: { id: job.id, status: job.status },
    onclick: open, onkeydown: (e) => { if (e.key === "Enter") open(); },
  },
  thumb,
  h("div", { class: "info" },
    h("p", { class: "prompt", title: prompt }, prompt || h("span", { class: "muted" }, job.provider)),
    h("div", { class: "chips" },
      h("span", { class: "chip", dataset: { status: job.status } }, job.status),
      h("span", { class: "chip cost", title: "credits charged" }, costText(job)),
      h("span", { class: "chip backend", title: "backend that made the image" }, backendOf(job)),
      job.width ? h("span", { class: "chip" }, `${job.width}×${job.height}`) : null),
    h("time", { dateTime: job.createdAt, title: job.createdAt }, ago(job.createdAt))));
}

function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(seconds)) return "";
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

async function refresh() {
  await Promise.all([loadAccount(), loadGallery()]);
}

// ---------------------------------------------------------------- console

const EXAMPLES = [
  ["Me: plan, credits, limits", `query Me {
  me {
    name plan credits
    limits { name limit used remaining reset }
  }
}`, {}],
  ["Recent jobs", `query RecentJobs($first: Int!) {
  jobs(first: $first) {
    nodes { id status url creditCost metadata createdAt }
    pageInfo { hasNextPage endCursor }
  }
}`, { first: 5 }],
  ["Providers", `query Providers {
  providers { name kind enabled reason backends circuit }
}`, {}],
  ["Estimate a request", `query Estimate($input: GenerateInput!) {
  estimate(input: $input) { credits width height numImages backends }
}`, { input: { provider: "local", input: { text: "a red fox" }, options: { width: 1024, height: 1024 } } }],
  ["Generate (Doitong style)", `mutation Generate($input: GenerateInput!) {
  generate(input: $input) { id status provider url creditCost metadata }
}`, { input: { type: "IMAGE", provider: "local", input: { text: "a red fox in the snow" },
    options: { width: 1024, height: 1024 } } }],
  ["Job updates (subscription)", `subscription JobUpdates($id: ID!) {
  jobUpdates(id: $id) { id status url creditCost metadata }
}`, { id: "JOB_ID" }],
];

let stopConsole = null;

function setupConsole() {
  const select = $("#examples");
  fill(select, h("option", { value: "" }, "Examples…"),
    ...EXAMPLES.map(([label], i) => h("option", { value: String(i) }, label)));
  select.addEventListener("change", () => {
    if (select.value === "") return;
    const [, query, variables] = EXAMPLES[Number(select.value)];
    $("#query").value = query;
    $("#variables").value = JSON.stringify(variables, null, 2);
    select.value = "";
  });
  $("#query").value = EXAMPLES[0][1];
  $("#variables").value = "{}";
  $("#run").addEventListener("click", runConsole);
  for (const area of [$("#query"), $("#variables")]) {
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        runConsole();
      } else if (event.key === "Tab" && !event.shiftKey) {
        event.preventDefault();
        area.setRangeText("  ", area.selectionStart, area.selectionEnd, "end");
      }
    });
  }
}

/** The kind of the document's first operation; fragments may come before it. */
function operationType(query) {
  let text = query.replace(/#[^\n]*/g, "").trim();
  while (/^fragment\b/.test(text)) {
    let depth = 0;
    let end = text.indexOf("{");
    for (; end >= 0 && end < text.length; end++) {
      if (text[end] === "{") depth++;
      else if (text[end] === "}" && --depth === 0) break;
    }
    if (end < 0 || end >= text.length) break;
    text = text.slice(end + 1).trim();
  }
  const match = /^(query|mutation|subscription)\b/.exec(text);
  return match ? match[1] : "query";
}

async function runConsole() {
  const out = $("#response");
  const meta = $("#run-meta");
  let variables = {};
  const raw = $("#variables").value.trim();
  if (raw) {
    try {
      variables = JSON.parse(raw);
    } catch (err) {
      $("#variables").setAttribute("aria-invalid", "true");
      meta.textContent = "";
      fill(out, `Variables are not JSON: ${err.message}`);
      return;
    }
  }
  $("#variables").removeAttribute("aria-invalid");
  const query = $("#query").value;
  if (stopConsole) {
    stopConsole();
    stopConsole = null;
  }
  const started = performance.now();
  if (operationType(query) === "subscription") {
    const results = [];
    meta.textContent = "subscribed…";
    fill(out);
    stopConsole = subscribe(query, variables, {
      next(data) {
        results.push({ data });
        fill(out, highlight(results));
      },
      error(err) {
        results.push({ errors: [{ message: err.message, extensions: { code: err.code, ...err.extensions } }] });
        fill(out, highlight(results));
        meta.textContent = "ended with an error";
      },
      complete() {
        meta.textContent = `complete · ${results.length} result(s) · ${((performance.now() - started) / 1000).toFixed(2)} s`;
      },
    });
    return;
  }
  meta.textContent = "running…";
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  try {
    const response = await fetch(ENDPOINT, {
      method: "POST", headers, body: JSON.stringify({ query, variables }),
    });
    const text = await response.text();
    let shown;
    try {
      shown = highlight(JSON.parse(text));
    } catch {
      shown = text;
    }
    fill(out, shown);
    const ms = Math.round(performance.now() - started);
    const remaining = response.headers.get("X-RateLimit-Remaining");
    // A key with no minute limit says the largest 32-bit integer (docs/api.md#rate-limit-headers).
    const limited = remaining !== null && response.headers.get("X-RateLimit-Limit") !== "2147483647";
    meta.textContent = `HTTP ${response.status} · ${ms} ms${limited ? ` · ${remaining} left this minute` : ""}`;
  } catch (err) {
    meta.textContent = "";
    fill(out, `The gateway could not be reached (${err.message}).`);
  }
}

/** JSON, coloured, as DOM nodes (never innerHTML). */
function highlight(value) {
  const text = JSON.stringify(value, null, 2);
  const fragment = document.createDocumentFragment();
  const token = /("(?:\\u[a-fA-F0-9]{4}|\\[^u]|[^\\"])*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (const m of text.matchAll(token)) {
    fragment.append(text.slice(last, m.index));
    if (m[1]) {
      fragment.append(h("span", { class: m[2] ? "j-key" : "j-str" }, m[1]));
      if (m[2]) fragment.append(m[2]);
    } else {
      fragment.append(h("span", { class: m[3] ? "j-lit" : "j-num" }, m[0]));
    }
    last = m.index + m[0].length;
  }
  fragment.append(text.slice(last));
  return fragment;
}

// The schema panel: one introspection query, then types as clickable names.
const TYPE_REF = "kind name ofType { kind name ofType { kind name ofType { kind name } } }";
const INTROSPECTION = `query Schema { __schema {
  queryType { name } mutationType { name } subscriptionType { name }
  types { kind name description
    fields { name description args { name defaultValue type { ${TYPE_REF} } } type { ${TYPE_REF} } }
    inputFields { name defaultValue type { ${TYPE_REF} } }
    enumValues { name description } } } }`;

const docs = { schema: null, types: new Map(), stack: [] };

async function loadDocs() {
  if (docs.schema) return;
  try {
    const data = await gql(INTROSPECTION);
    docs.schema = data.__schema;
    for (const type of docs.schema.types) docs.types.set(type.name, type);
    renderDocs();
  } catch (err) {
    fill($("#docs"), h("p", { class: "muted" }, `Could not load the schema (${err.code}).`));
  }
}

function typeRef(ref) {
  if (ref.kind === "NON_NULL") return [typeRef(ref.ofType), "!"];
  if (ref.kind === "LIST") return ["[", typeRef(ref.ofType), "]"];
  return h("button", { type: "button", class: "type", onclick: () => openType(ref.name) }, ref.name);
}

function fieldItem(field) {
  const args = field.args && field.args.length
    ? ["(", field.args.map((a, i) => [i ? ", " : "", a.name, ": ", typeRef(a.type)]), ")"]
    : [];
  return h("li", { dataset: { name: field.name.toLowerCase() } },
    h("div", { class: "sig" }, h("span", { class: "fname" }, field.name), args, ": ", typeRef(field.type)),
    field.description ? h("div", { class: "desc" }, field.description) : null);
}

function renderDocs() {
  const body = $("#docs");
  const filter = $("#docs-search").value.trim().toLowerCase();
  const top = docs.stack[docs.stack.length - 1];
  if (top) {
    const type = docs.types.get(top);
    const items = (type.fields || type.inputFields || []).map((f) => fieldItem({ args: [], ...f }));
    const values = (type.enumValues || []).map((v) => h("li", {}, h("span", { class: "sig fname" }, v.name)));
    fill(body,
      h("button", { type: "button", class: "ghost back", onclick: () => { docs.stack.pop(); renderDocs(); } }, "← Back"),
      h("h3", {}, `${type.kind.toLowerCase().replace("_", " ")} ${type.name}`),
      type.description ? h("p", { class: "desc" }, type.description) : null,
      h("ul", {}, items, values));
    return;
  }
  const roots = [
    ["Queries", docs.schema.queryType], ["Mutations", docs.schema.mutationType],
    ["Subscriptions", docs.schema.subscriptionType],
  ].filter(([, t]) => t);
  const sections = roots.map(([label, ref]) => {
    const fields = docs.types.get(ref.name).fields.filter((f) => !filter || f.name.toLowerCase().includes(filter));
    return fields.length ? [h("h3", {}, label), h("ul", {}, fields.map(fieldItem))] : null;
  });
  const named = [...docs.types.values()]
    .filter((t) => !t.name.startsWith("__") && !roots.some(([, r]) => r.name === t.name))
    .filter((t) => !filter || t.name.toLowerCase().includes(filter))
    .sort((a, b) => a.name.localeCompare(b.name));
  fill(body, ...sections,
    h("h3", {}, "Types"),
    h("ul", {}, named.map((t) => h("li", {}, typeRef(t), " ", h("span", { class: "muted" }, t.kind.toLowerCase())))));
}

function openType(name) {
  if (!docs.types.has(name)) return;
  docs.stack.push(name);
  renderDocs();
}

// ---------------------------------------------------------------- tabs and start-up

function showTab(tab) {
  document.body.dataset.tab = tab;
  for (const button of document.querySelectorAll("[role=tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
  }
  $("#view-generate").hidden = tab !== "generate";
  $("#view-console").hidden = tab !== "console";
  if (tab === "console") loadDocs();
}

function start() {
  const initial = location.hash === "#console" ? "console"
    : location.hash === "#generate" ? "generate" : document.body.dataset.tab || "generate";
  for (const button of document.querySelectorAll("[role=tab]")) {
    button.addEventListener("click", () => {
      history.replaceState(null, "", `#${button.dataset.tab}`);
      showTab(button.dataset.tab);
    });
  }
  showTab(initial);
  setupConsole();

  setKey(state.key);
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    setKey($("#key").value);
    if (!state.key) {
      showError(new GatewayError("NO_KEY", "No key or token yet."));
      return;
    }
    if (await loadAccount()) {
      loadGallery();
      scheduleEstimate();
    }
  });
  $("#key-forget").addEventListener("click", () => {
    setKey("");
    clearError();
    $("#account").hidden = true;
    $("#estimate").textContent = "";
    loadGallery();
  });
  $("#key-show").addEventListener("click", () => {
    const input = $("#key");
    const shown = input.type === "text";
    input.type = shown ? "password" : "text";
    $("#key-show").setAttribute("aria-pressed", String(!shown));
  });
  $("#error [data-action=dismiss]").addEventListener("click", clearError);
  $("#gen-form").addEventListener("submit", onGenerate);
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#gen-form").requestSubmit();
  });
  $("#service").addEventListener("change", () => { describeService(); scheduleEstimate(); });
  $("#size").addEventListener("change", () => {
    const { width, height } = size();
    if (!state.running && $("#stage").dataset.state !== "done") $("#stage").style.aspectRatio = `${width} / ${height}`;
    scheduleEstimate();
  });
  $("#refresh").addEventListener("click", refresh);
  $("#docs-search").addEventListener("input", () => { docs.stack = []; if (docs.schema) renderDocs(); });

  loadProviders();
  if (state.key) {
    refresh();
    scheduleEstimate();
  }
  document.documentElement.dataset.ready = "true";
}

start();
