// wanserve web page: submit a prompt, follow its progress, play the video, list the jobs; and a CausVid session
// panel: open a session, extend it fragment by fragment (switching its prompt), play the growing video.
// Plain JavaScript against the public API (/v1/models, /v1/videos, /v1/sessions); no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let current = null;   // id of the job shown in the "Job" card
let shownVideo = null;

function headers(extra = {}) {
  const token = $("token").value || localStorage.getItem("wanserve-token") || "";
  return token ? { ...extra, Authorization: "Bearer " + token } : extra;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!res.ok) {
    let message = res.status + " " + res.statusText;
    try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    if (res.status === 401) $("auth").open = true;
    const err = new Error(message);
    err.status = res.status;
    throw err;
  }
  return res;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  try {
    models = (await (await api("/v1/models")).json()).data;
  } catch (e) { showError(e.message); return; }
  const select = $("model");
  select.innerHTML = "";
  for (const m of models.filter((m) => m.task === "t2v")) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = `${m.id} (${m.model_cls}, ${m.replicas} replica${m.replicas === 1 ? "" : "s"})`;
    select.appendChild(opt);
  }
  modelDefaults();
  sessionModels();
}

function modelDefaults() {
  const m = models.find((x) => x.id === $("model").value);
  if (!m) return;
  $("size").placeholder = m.default_size;
  $("frames").placeholder = m.default_num_frames;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const body = { prompt: $("prompt").value, model: $("model").value || undefined };
  if ($("size").value) body.size = $("size").value.trim();
  if ($("frames").value) body.num_frames = parseInt($("frames").value, 10);
  if ($("seed").value) body.seed = parseInt($("seed").value, 10);
  if ($("token").value) localStorage.setItem("wanserve-token", $("token").value);
  $("submit").disabled = true;
  try {
    const job = await (await api("/v1/videos", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    follow(job.id);
    refreshJobs();
  } catch (e) {
    showError(e.message);
  } finally {
    $("submit").disabled = false;
  }
}

function render(job) {
  $("current").hidden = false;
  $("job-id").textContent = job.id;
  $("bar-fill").style.width = job.progress + "%";
  let text = job.status.replace("_", " ");
  if (job.status === "in_progress" && job.stage) text += ` — ${job.stage} ${job.step}/${job.total_steps}`;
  if (job.status === "in_progress" || job.status === "completed") text += ` (${job.progress}%)`;
  if (job.status === "completed" && job.timings.total) text += ` in ${job.timings.total.toFixed(2)} s`;
  if (job.error) text += ": " + job.error.message;
  $("status").textContent = text;
  $("status").className = "status s-" + job.status;
}

async function follow(id) {
  current = id;
  $("video").hidden = true;
  $("download").hidden = true;
  while (current === id) {
    let job;
    try {
      job = await (await api(`/v1/videos/${id}`)).json();
    } catch (e) { showError(e.message); return; }
    render(job);
    if (job.status === "completed") { await showVideo(job); refreshJobs(); return; }
    if (["failed", "cancelled"].includes(job.status)) { refreshJobs(); return; }
    await new Promise((r) => setTimeout(r, 300));
  }
}

async function showVideo(job) {
  // fetched with the token (a <video src> cannot send one), then played from a blob URL
  const blob = await (await api(`/v1/videos/${job.id}/content`)).blob();
  if (shownVideo) URL.revokeObjectURL(shownVideo);
  shownVideo = URL.createObjectURL(blob);
  const video = $("video");
  video.src = shownVideo;
  video.hidden = false;
  video.play().catch(() => { /* autoplay refused: the controls are there */ });
  $("download").href = shownVideo;
  $("download").download = job.id + ".mp4";
  $("download").hidden = false;
}

async function refreshJobs() {
  let list;
  try {
    list = (await (await api("/v1/videos?limit=20")).json()).data;
  } catch (e) { return; }
  const body = $("jobs").querySelector("tbody");
  body.innerHTML = "";
  for (const job of list) {
    const tr = document.createElement("tr");
    tr.className = "pick";
    tr.dataset.id = job.id;
    const cells = [job.id.slice(0, 12) + "…", job.model, job.prompt || "", job.status.replace("_", " "),
                   job.progress + "%", new Date(job.created_at * 1000).toLocaleTimeString()];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 2) td.className = "prompt";
      if (i === 3) td.className = "s-" + job.status;
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => follow(job.id));
    body.appendChild(tr);
  }
}

// ---- the session panel: one CausVid session, extended fragment by fragment ------------------------------------
// While a fragment is made its blocks stream in (the job's server-sent events, read with fetch so the token goes
// along) and play one after the other; once it is done the whole video so far (GET /v1/sessions/{id}/video,
// joined on the server's disk) replaces them, from the new fragment's first frame on, looping.
const TERMINAL = ["completed", "failed", "cancelled"];
const sess = {
  id: null, fps: 16, prompt: "", busy: false,
  frames: 0,          // frames of the session before the fragment being made
  queue: [],          // blob URLs of streamed blocks not played yet
  playing: 0,         // > 0: a streamed block is on screen (its play number, for the watchdog)
  live: 0,            // streamed blocks played so far
  pendingWhole: null, // {url, start, fragments, frames}: shown once the streamed blocks have played
};

function sessionError(message) {
  $("session-error").textContent = message;
  $("session-error").hidden = !message;
}

function sessionModels() {
  const list = models.filter((m) => m.sessions);
  const select = $("session-model");
  const keep = select.value;
  select.innerHTML = "";
  for (const m of list) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = `${m.id} (${m.replicas} replica${m.replicas === 1 ? "" : "s"})`;
    select.appendChild(opt);
  }
  if (list.some((m) => m.id === keep)) select.value = keep;
  $("session-none").hidden = list.length > 0;
  $("session-form").hidden = list.length === 0 || sess.id !== null;
  const m = list.find((x) => x.id === select.value);
  if (m) $("session-size").placeholder = m.default_size;
}

const mib = (bytes) => (bytes / 1048576).toFixed(2) + " MiB";
const seconds = (frames) => (frames / sess.fps).toFixed(2) + " s";

function showSession(s) {
  $("session-info").textContent = `— ${s.fragments} fragment${s.fragments === 1 ? "" : "s"}, ${s.frames} frames ` +
    `(${seconds(s.frames)} at ${sess.fps} fps), ${s.latent_frames} latent frames; cache ${mib(s.cache_bytes)}, ` +
    `session memory ${mib(s.memory_bytes)}${s.tier ? ` (${s.tier})` : ""}`;
  $("session-card").dataset.fragments = s.fragments;
  $("session-card").dataset.frames = s.frames;
}

async function openSession(event) {
  event.preventDefault();
  sessionError("");
  const body = { prompt: $("session-prompt").value.trim(), model: $("session-model").value || undefined };
  if ($("session-size").value) body.size = $("session-size").value.trim();
  if ($("session-seed").value) body.seed = parseInt($("session-seed").value, 10);
  $("session-open").disabled = true;
  try {
    const s = await (await api("/v1/sessions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    const m = models.find((x) => x.id === s.model);
    Object.assign(sess, { id: s.id, fps: m ? m.fps : 16, prompt: s.prompt, frames: 0, live: 0 });
    $("session-id").textContent = s.id;
    $("session-next-prompt").value = s.prompt;
    $("session-fragments").querySelector("tbody").innerHTML = "";
    $("session-status").textContent = "no fragment yet: “Next fragment” makes the first";
    $("session-bar").style.width = "0";
    $("session-form").hidden = true;
    $("session-live").hidden = false;
    showSession(s);
    setSessionBusy(false);
  } catch (e) {
    sessionError(e.message);
  } finally {
    $("session-open").disabled = false;
  }
}

function setSessionBusy(busy) {
  sess.busy = busy;
  $("session-next").disabled = busy;
  $("session-switch").disabled = busy;
}

// Server-sent events of a job, parsed from a fetch body (EventSource cannot send the Authorization header).
async function* jobEvents(id) {
  const res = await api(`/v1/videos/${id}/events`, { headers: { Accept: "text/event-stream" } });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function fragmentRow(index, prompt) {
  const tr = document.createElement("tr");
  for (const text of [index + 1, prompt, "0", "", "", "queued"]) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  tr.cells[1].className = "prompt";
  $("session-fragments").querySelector("tbody").appendChild(tr);
  return tr;
}

function renderFragment(job, tr) {
  tr.cells[2].textContent = job.blocks;
  if (job.timings && job.timings.total) tr.cells[4].textContent = job.timings.total.toFixed(2);
  tr.cells[5].textContent = job.status.replace("_", " ") + (job.error ? ": " + job.error.message : "");
  tr.cells[5].className = "s-" + job.status;
  $("session-bar").style.width = job.progress + "%";
  let text = `fragment ${job.fragment + 1}: ${job.status.replace("_", " ")}`;
  if (job.status === "in_progress" && job.stage) text += ` — ${job.stage} ${job.step}/${job.total_steps}`;
  $("session-status").textContent = text + `, ${job.blocks} block${job.blocks === 1 ? "" : "s"} streamed`;
}

async function followFragment(job, tr) {
  let fetched = 0;
  const fetchBlocks = async (upto) => {
    while (fetched < upto) {
      const i = fetched++;
      try {
        enqueueBlock(URL.createObjectURL(await (await api(`/v1/videos/${job.id}/blocks/${i}`)).blob()));
      } catch (e) { /* a retried attempt rewrites its blocks: the whole video comes anyway */ }
    }
  };
  try {
    for await (const ev of jobEvents(job.id)) {
      if (ev.type === "job") {
        job = ev.job;
        renderFragment(job, tr);
        await fetchBlocks(job.blocks);
      } else if (ev.type === "block") {
        await fetchBlocks(ev.index + 1);
      } else if (ev.type === "progress" && ev.total) {
        $("session-bar").style.width = Math.round((100 * ev.step) / ev.total) + "%";
      }
    }
  } catch (e) { /* the stream broke off: poll below */ }
  while (!TERMINAL.includes(job.status)) {
    await new Promise((r) => setTimeout(r, 300));
    job = await (await api(`/v1/videos/${job.id}`)).json();
    renderFragment(job, tr);
    await fetchBlocks(job.blocks);
  }
  return job;
}

async function extend(prompt) {
  if (!sess.id || sess.busy) return;
  sessionError("");
  setSessionBusy(true);
  const index = $("session-fragments").querySelector("tbody").rows.length;
  try {
    let job = await (await api(`/v1/sessions/${sess.id}/fragments`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(prompt ? { prompt } : {}),
    })).json();
    if (prompt) sess.prompt = prompt;
    const tr = fragmentRow(index, sess.prompt);
    job = await followFragment(job, tr);
    refreshJobs();
    if (job.status !== "completed") throw new Error(`fragment ${index + 1} ${job.status}` +
                                                    (job.error ? ": " + job.error.message : ""));
    const info = await (await api(`/v1/sessions/${sess.id}`)).json();
    tr.cells[3].textContent = info.frames - sess.frames;
    showSession(info);
    const blob = await (await api(`/v1/sessions/${sess.id}/video`)).blob();
    if (sess.pendingWhole) URL.revokeObjectURL(sess.pendingWhole.url);
    sess.pendingWhole = { url: URL.createObjectURL(blob), start: sess.frames / sess.fps, fragments: info.fragments,
                          frames: info.frames };
    sess.frames = info.frames;
    if (!sess.playing) showWhole();
  } catch (e) {
    sessionError(e.message);
    if (e.status === 404 || e.status === 410) endSession();
  } finally {
    setSessionBusy(false);
  }
}

function setSource(url) {
  const v = $("session-video");
  const old = v.src;
  v.src = url;
  if (old && old.startsWith("blob:") && old !== url) URL.revokeObjectURL(old);
}

function enqueueBlock(url) {
  sess.queue.push(url);
  if (!sess.playing) playNext();
}

function playNext() {
  const url = sess.queue.shift();
  if (!url) {
    sess.playing = 0;
    if (sess.pendingWhole) showWhole();
    return;
  }
  const v = $("session-video");
  const turn = (sess.playing = ++sess.live);
  setSource(url);
  v.loop = false;
  v.dataset.liveBlocks = sess.live;
  v.play().catch(() => { /* autoplay refused: the watchdog moves on */ });
  $("session-playing").textContent = `live: block ${sess.live} of the session, as it was made`;
  setTimeout(() => { if (sess.playing === turn) playNext(); }, 4000);  // a block that never ends
}

function showWhole() {
  const w = sess.pendingWhole;
  sess.pendingWhole = null;
  const v = $("session-video");
  setSource(w.url);
  v.loop = true;
  v.addEventListener("loadedmetadata", () => {
    v.currentTime = Math.min(w.start, v.duration || 0);
    v.dataset.fragments = w.fragments;
    v.dataset.frames = w.frames;
  }, { once: true });
  v.play().catch(() => { /* the controls are there */ });
  $("session-playing").textContent = `whole video: ${w.frames} frames, ${seconds(w.frames)} — from fragment ` +
    `${w.fragments}'s first frame (${w.start.toFixed(2)} s), then looping`;
}

function endSession() {
  sess.id = null;
  sess.queue.forEach((u) => URL.revokeObjectURL(u));
  sess.queue = [];
  sess.playing = 0;
  if (sess.pendingWhole) URL.revokeObjectURL(sess.pendingWhole.url);
  sess.pendingWhole = null;
  const v = $("session-video");
  if (v.src.startsWith("blob:")) URL.revokeObjectURL(v.src);
  v.removeAttribute("src");
  v.load();
  $("session-live").hidden = true;
  $("session-form").hidden = false;
}

async function closeSession() {
  if (!sess.id) return;
  sessionError("");
  try {
    await api(`/v1/sessions/${sess.id}`, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 404 && e.status !== 410) { sessionError(e.message); return; }
  }
  endSession();
}

$("session-form").addEventListener("submit", openSession);
$("session-model").addEventListener("change", sessionModels);
$("session-next").addEventListener("click", () => extend(null));
$("session-switch").addEventListener("click", () => {
  const prompt = $("session-next-prompt").value.trim();
  if (!prompt) { sessionError("type the prompt to switch to first"); return; }
  extend(prompt);
});
$("session-close").addEventListener("click", closeSession);
$("session-video").addEventListener("ended", () => { if (sess.playing) playNext(); });
$("session-video").addEventListener("error", () => { if (sess.playing) playNext(); });

$("form").addEventListener("submit", submit);
$("model").addEventListener("change", modelDefaults);
$("token").addEventListener("change", () => {
  localStorage.setItem("wanserve-token", $("token").value);
  showError("");
  loadModels();
  refreshJobs();
});
$("token").value = localStorage.getItem("wanserve-token") || "";
loadModels();
refreshJobs();
setInterval(refreshJobs, 2000);
