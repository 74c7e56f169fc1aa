// wanserve web page: submit a prompt, follow its progress, play the video, list the jobs.
// Plain JavaScript against the public API (/v1/models, /v1/videos); no build step.
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
