// The renderfarm web page: plain JS, no framework, no build step. Served by the scheduler (cluster/web.py).
//
// The token is asked for once and kept in sessionStorage (this tab only); every API call sends it as
// `Authorization: Bearer TOKEN`, images too (fetched, then shown as blob: URLs). A 401 forgets it and asks
// again. Routes are hashes: #/ the job list, #/jobs/ID a job.
"use strict";

const TOKEN_KEY = "renderfarm.token";
const LIST_REFRESH_MS = 2000;
const RETRY_MS = 2000;
// Thumbnails fetched at once.
const THUMB_FETCHES = 4;
const JOB_ROUTE = /^#\/jobs\/([A-Za-z0-9_-]{1,64})$/;

const $ = (id) => document.getElementById(id);

// null: none entered yet; "": entered blank (a farm without tokens takes any).
let token = sessionStorage.getItem(TOKEN_KEY);
let view = null;

class Unauthorized extends Error {}

function element(tag, properties = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, properties);
  node.append(...children);
  return node;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token ?? ""}` };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    signOut("That token was refused: enter a valid one.");
    throw new Unauthorized();
  }
  return response;
}

async function problem(response) {
  const body = await response.json().catch(() => ({}));
  return new Error(body.error || `${response.status} ${response.statusText}`);
}

async function apiJSON(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await problem(response);
  return response.json();
}

async function blobURL(path, signal) {
  const response = await api(path, { signal });
  if (!response.ok) throw await problem(response);
  return URL.createObjectURL(await response.blob());
}

function notice(message) {
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

function show(id) {
  for (const section of ["login-view", "list-view", "job-view"]) $(section).hidden = section !== id;
}

function stopView() {
  if (view) view.stop();
  view = null;
}

// -- the token ------------------------------------------------------------------------------------------------

function signOut(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  stopView();
  // Nothing the last token saw stays on the page.
  $("jobs").tBodies[0].replaceChildren();
  $("who").textContent = "";
  $("sign-out").hidden = true;
  notice("");
  $("login-error").textContent = message || "";
  show("login-view");
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  token = $("token").value.trim();
  try {
    await whoAmI();
  } catch (error) {
    if (!(error instanceof Unauthorized)) $("login-error").textContent = error.message;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login-error").textContent = "";
  route();
}

async function whoAmI() {
  const me = await apiJSON("/api/me");
  $("who").textContent = `${me.name} (${me.role})`;
  $("sign-out").hidden = false;
}

// -- routes ---------------------------------------------------------------------------------------------------

function route() {
  stopView();
  notice("");
  if (token === null) {
    signOut("");
    return;
  }
  if (!$("who").textContent) whoAmI().catch(() => {});
  const match = location.hash.match(JOB_ROUTE);
  view = match ? jobView(match[1]) : listView();
}

// -- the job list ---------------------------------------------------------------------------------------------

function when(seconds) {
  return new Date(seconds * 1000).toLocaleString();
}

function stateBadge(state) {
  return element("span", { className: `state state-${state}`, textContent: state });
}

function progressCell(completed, total) {
  return element(
    "span",
    { className: "progress-cell" },
    element("progress", { max: Math.max(total, 1), value: completed }),
    element("span", { className: "count", textContent: ` ${completed} / ${total}` }),
  );
}

function jobRow(job) {
  const link = element("a", { href: `#/jobs/${job.id}`, textContent: job.id });
  const row = element(
    "tr",
    { className: "job-row" },
    element("td", {}, link),
    element("td", { textContent: job.kind }),
    element("td", {}, stateBadge(job.state)),
    element("td", { textContent: job.owner }),
    element("td", {}, progressCell(job.completed, job.total)),
    element("td", { textContent: when(job.created_at) }),
  );
  row.dataset.jobId = job.id;
  row.dataset.state = job.state;
  row.addEventListener("click", () => (location.hash = `#/jobs/${job.id}`));
  return row;
}

function listView() {
  show("list-view");
  let stopped = false;
  let timer = null;
  async function refresh() {
    try {
      const body = await apiJSON("/api/jobs");
      if (stopped) return;
      $("jobs").tBodies[0].replaceChildren(...body.jobs.map(jobRow));
      $("no-jobs").hidden = body.jobs.length > 0;
      notice("");
    } catch (error) {
      if (error instanceof Unauthorized) return;
      notice(`Could not list the jobs: ${error.message}`);
    }
    if (!stopped) timer = setTimeout(refresh, LIST_REFRESH_MS);
  }
  refresh();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

// -- one job --------------------------------------------------------------------------------------------------

function jobView(id) {
  show("job-view");
  const base = `/api/jobs/${id}`;
  const controller = new AbortController();
  const urls = [];
  const shown = new Set();
  const previews = new Map();
  const thumbQueue = [];
  let thumbsRunning = 0;
  let lastSeq = 0;
  let finished = false;
  let stopped = false;
  let grid = { sheet: 0, sheets: 0 };

  $("job-id").textContent = id;
  for (const field of ["job-kind", "job-owner", "job-created", "job-priority", "job-step", "job-request-json"])
    $(field).textContent = "";
  $("job-state").replaceChildren();
  $("results").replaceChildren();
  $("previews").replaceChildren();
  $("previews-box").hidden = true;
  $("no-results").hidden = false;
  $("grid-box").hidden = true;
  $("grid-image").hidden = true;
  $("grid-pager").hidden = true;
  $("grid-message").textContent = "";
  $("job-error").hidden = true;
  $("cancel").hidden = true;
  setProgress(0, 0);

  function setProgress(completed, total) {
    $("job-progress").max = Math.max(total, 1);
    $("job-progress").value = completed;
    $("job-progress-text").textContent = `${completed} / ${total}`;
  }

  function setState(state, error) {
    $("job-state").replaceChildren(stateBadge(state));
    $("job-state").dataset.state = state;
    finished = ["succeeded", "failed", "cancelled"].includes(state);
    $("cancel").hidden = finished;
    if (error) {
      $("job-error").textContent = error;
      $("job-error").hidden = false;
    }
    if (finished) {
      $("job-step").textContent = "";
      previews.clear();
      $("previews").replaceChildren();
      $("previews-box").hidden = true;
    }
  }

  function render(job) {
    $("job-kind").textContent = job.kind;
    $("job-owner").textContent = job.owner;
    $("job-created").textContent = when(job.created_at);
    $("job-priority").textContent = job.priority;
    $("job-request-json").textContent = JSON.stringify(job.request, null, 2);
    setProgress(job.completed, job.total);
    setState(job.state, job.error);
    setAxes(job.axes);
  }

  // Thumbnails, a few fetches at a time, in the order the results came.
  function addResult(name) {
    if (shown.has(name)) return;
    shown.add(name);
    const image = element("img", { alt: name, title: name, className: "loading" });
    const button = element("button", { type: "button", className: "thumb" }, image);
    button.addEventListener("click", () => openViewer(name));
    $("results").append(button);
    $("no-results").hidden = true;
    thumbQueue.push({ name, image });
    pumpThumbs();
    const preview = previews.get(name);
    if (preview) preview.remove();
    previews.delete(name);
    $("previews-box").hidden = previews.size === 0;
  }

  function pumpThumbs() {
    while (thumbsRunning < THUMB_FETCHES && thumbQueue.length && !stopped) {
      const { name, image } = thumbQueue.shift();
      thumbsRunning += 1;
      blobURL(`${base}/images/${encodeURIComponent(name)}?thumb=1`, controller.signal)
        .then((url) => {
          urls.push(url);
          image.src = url;
          image.classList.remove("loading");
        })
        .catch(() => image.classList.replace("loading", "broken"))
        .finally(() => {
          thumbsRunning -= 1;
          pumpThumbs();
        });
    }
  }

  function showPreview(event) {
    if (shown.has(event.name)) return;
    let preview = previews.get(event.name);
    if (!preview) {
      preview = element("img", { className: "preview", alt: `${event.name} as it renders` });
      previews.set(event.name, preview);
      $("previews").append(preview);
    }
    preview.src = `data:image/png;base64,${event.png}`;
    preview.title = `${event.name}: step ${event.step} of ${event.steps}`;
    $("previews-box").hidden = false;
  }

  function handle(event) {
    if (event.seq) lastSeq = event.seq;
    switch (event.kind) {
      case "state":
        setState(event.state, event.error);
        if (event.finished) load(); // the final counts and the grid's axes
        break;
      case "progress":
        setProgress(event.completed, event.total);
        break;
      case "result":
        addResult(event.name);
        break;
      case "step_progress":
        if (!finished) {
          const images = event.names.length === 1 ? "1 image" : `${event.names.length} images`;
          $("job-step").textContent = `step ${event.step} of ${event.steps} (${images} in this batch)`;
        }
        break;
      case "preview":
        if (!finished) showPreview(event);
        break;
    }
  }

  // The job's events from the last seq seen, until its final state; resumed after a drop or a restart.
  async function follow() {
    while (!stopped && !(finished && lastSeq > 0)) {
      try {
        const response = await api(`${base}/events?after_seq=${lastSeq}`, { signal: controller.signal });
        if (!response.ok) throw await problem(response);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, end).trim();
            buffer = buffer.slice(end + 1);
            if (line) handle(JSON.parse(line));
          }
        }
        if (finished) return;
      } catch (error) {
        if (stopped || error instanceof Unauthorized) return;
        notice(`Lost the job's events (${error.message}); trying again`);
      }
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  }

  async function load() {
    try {
      render(await apiJSON(base));
      notice("");
    } catch (error) {
      if (!(error instanceof Unauthorized) && !stopped) notice(error.message);
      return false;
    }
    return true;
  }

  // -- the full image and its spec

  async function openViewer(name) {
    const image = $("viewer-image");
    image.removeAttribute("src");
    $("viewer-name").textContent = name;
    $("viewer-parameters").textContent = "";
    $("viewer-spec").textContent = "";
    $("viewer").showModal();
    try {
      const spec = await apiJSON(`${base}/specs/${encodeURIComponent(name)}`);
      $("viewer-parameters").textContent = spec.parameters;
      $("viewer-spec").textContent = JSON.stringify(spec.spec, null, 2);
      if (spec.url) {
        image.src = spec.url; // an object store's presigned URL
      } else {
        const url = await blobURL(`${base}/images/${encodeURIComponent(name)}`, controller.signal);
        urls.push(url);
        image.src = url;
      }
    } catch (error) {
      if (!(error instanceof Unauthorized)) $("viewer-parameters").textContent = error.message;
    }
  }

  // -- the grid

  function setAxes(axes) {
    const choices = axes && axes.length ? axes : [];
    $("grid-box").hidden = choices.length === 0;
    const across = $("grid-x");
    const down = $("grid-y");
    const keep = [across.value, down.value];
    across.replaceChildren(...choices.map((axis) => element("option", { value: axis, textContent: axis })));
    down.replaceChildren(
      element("option", { value: "", textContent: "(none)" }),
      ...choices.map((axis) => element("option", { value: axis, textContent: axis })),
    );
    if (choices.includes(keep[0])) across.value = keep[0];
    if (keep[1] === "" || choices.includes(keep[1])) down.value = keep[1];
    else if (choices.length > 1) down.value = choices[1];
  }

  async function showGrid(sheet) {
    const query = new URLSearchParams({ x: $("grid-x").value, sheet });
    if ($("grid-y").value) query.set("y", $("grid-y").value);
    $("grid-message").textContent = "Making the grid...";
    try {
      const response = await api(`${base}/grid.png?${query}`, { signal: controller.signal });
      if (!response.ok) throw await problem(response);
      const url = URL.createObjectURL(await response.blob());
      urls.push(url);
      grid = { sheet, sheets: Number(response.headers.get("X-Sheets") || 1) };
      $("grid-image").src = url;
      $("grid-image").hidden = false;
      $("grid-sheet").textContent = `sheet ${sheet + 1} of ${grid.sheets}`;
      $("grid-pager").hidden = grid.sheets < 2;
      $("grid-prev").disabled = sheet === 0;
      $("grid-next").disabled = sheet + 1 >= grid.sheets;
      $("grid-message").textContent = "";
    } catch (error) {
      if (!(error instanceof Unauthorized) && !stopped) $("grid-message").textContent = error.message;
    }
  }

  const onGrid = (event) => {
    event.preventDefault();
    showGrid(0);
  };
  const onPrev = () => showGrid(Math.max(grid.sheet - 1, 0));
  const onNext = () => showGrid(Math.min(grid.sheet + 1, grid.sheets - 1));
  const onCancel = async () => {
    $("cancel").disabled = true;
    try {
      await apiJSON(`${base}/cancel`, { method: "POST" });
      notice("Cancelling: images already running finish; no more start.");
    } catch (error) {
      if (!(error instanceof Unauthorized)) notice(`Could not cancel: ${error.message}`);
    } finally {
      $("cancel").disabled = false;
    }
  };
  $("grid-form").addEventListener("submit", onGrid);
  $("grid-prev").addEventListener("click", onPrev);
  $("grid-next").addEventListener("click", onNext);
  $("cancel").addEventListener("click", onCancel);

  load().then((found) => {
    if (found) follow();
  });

  return {
    stop() {
      stopped = true;
      controller.abort();
      $("grid-form").removeEventListener("submit", onGrid);
      $("grid-prev").removeEventListener("click", onPrev);
      $("grid-next").removeEventListener("click", onNext);
      $("cancel").removeEventListener("click", onCancel);
      thumbQueue.length = 0;
      for (const url of urls) URL.revokeObjectURL(url);
      $("results").replaceChildren();
      $("previews").replaceChildren();
      $("grid-image").removeAttribute("src");
    },
  };
}

window.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);
  route();
});
