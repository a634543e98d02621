// Flywheel rater workbench. Plain JS, no dependencies, no build step.
// Rule: text from models and raters only ever reaches the page as text nodes (never innerHTML).
"use strict";

const state = { me: null, task: null, leasedAt: 0, expiresAt: 0, ranks: {}, done: 0, flagTarget: null };
const $ = (id) => document.getElementById(id);
const PENDING = "fw_pending_submission";

// ---- API ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.me) headers["X-CSRF-Token"] = state.me.csrf;
  let response;
  try {
    response = await fetch(path, { method, headers, credentials: "same-origin",
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError("The service cannot be reached (it may be restarting).", 0);
  }
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  if (!response.ok) {
    let message = data.error || `The service answered ${response.status}.`;
    if (response.status === 503 || response.status === 502 || response.status === 504) {
      message = "The service is restarting or catching up. " + (data.error ? "(" + data.error + ")" : "");
    }
    throw new ApiError(message, response.status);
  }
  return data;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function notice(message) {
  const el = $("notice");
  el.textContent = message;
  el.hidden = !message;
}

function fail(e) {
  if (e.status === 401) { signedOut(e.message); return; }
  showError(e.message);
}

// ---- safe markdown: paragraphs, fenced code, inline code, bold, lists; all as text nodes -------
function inline(parent, text) {
  const parts = text.split(/(`[^`]+`|\*\*[^*]+\*\*)/);
  for (const part of parts) {
    if (!part) continue;
    if (part.startsWith("`") && part.endsWith("`") && part.length > 1) {
      const code = document.createElement("code");
      code.textContent = part.slice(1, -1);
      parent.appendChild(code);
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 3) {
      const strong = document.createElement("strong");
      strong.textContent = part.slice(2, -2);
      parent.appendChild(strong);
    } else {
      parent.appendChild(document.createTextNode(part));
    }
  }
}

function renderMarkdown(container, text) {
  container.replaceChildren();
  const lines = String(text).split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim().startsWith("```")) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith("```")) { body.push(lines[i]); i += 1; }
      i += 1;
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      pre.appendChild(code);
      container.appendChild(pre);
    } else if (/^\s*[-*] /.test(line)) {
      const ul = document.createElement("ul");
      while (i < lines.length && /^\s*[-*] /.test(lines[i])) {
        const li = document.createElement("li");
        inline(li, lines[i].replace(/^\s*[-*] /, ""));
        ul.appendChild(li);
        i += 1;
      }
      container.appendChild(ul);
    } else if (line.trim() === "") {
      i += 1;
    } else {
      const p = document.createElement("p");
      const para = [];
      while (i < lines.length && lines[i].trim() !== "" && !lines[i].trim().startsWith("```")
             && !/^\s*[-*] /.test(lines[i])) { para.push(lines[i].replace(/^#+\s*/, "")); i += 1; }
      inline(p, para.join("\n"));
      container.appendChild(p);
    }
  }
}

// ---- views -------------------------------------------------------------------------------
function show(view) {
  for (const v of ["login", "task", "me", "admin"]) $("view-" + v).hidden = v !== view;
  if (location.pathname !== "/" + view && view !== "login") history.replaceState(null, "", "/" + view);
  showError("");
  if (view === "me") loadMe();
  if (view === "admin") loadAdmin();
}

function signedOut(message) {
  state.me = null;
  $("nav").hidden = true;
  show("login");
  if (message) showError(message);
}

function signedIn(me) {
  state.me = me;
  $("nav").hidden = false;
  $("who").textContent = `${me.rater_id} (${me.scope})`;
  $("nav-admin").hidden = me.scope !== "admin";
  const path = location.pathname.replace("/", "");
  show(["me", "admin"].includes(path) ? path : "task");
  resendPending();
}

// ---- tasks -------------------------------------------------------------------------------
async function nextTask() {
  showError("");
  try {
    const { task } = await api("POST", "/api/lease", { kind: $("mode").value });
    state.task = task;
    renderTask();
  } catch (e) { fail(e); }
}

function renderTask() {
  const task = state.task;
  $("task").hidden = !task;
  $("empty").hidden = !!task;
  if (!task) { $("timer").textContent = ""; return; }
  state.leasedAt = Date.now();
  state.expiresAt = Date.now() + task.expires_in_s * 1000;
  state.ranks = {};
  renderMarkdown($("prompt"), task.prompt_text || "(prompt text unavailable)");
  $("progress").textContent = `Done this session: ${state.done} · open tasks for you: ${task.remaining}`;
  const list = $("candidates");
  list.replaceChildren();
  const compare = task.kind === "compare";
  task.candidates.forEach((c, i) => list.appendChild(card(c, i, compare)));
  $("compare-buttons").hidden = !compare;
  $("submit-rank").hidden = task.kind !== "rank";
  const demo = task.kind === "demonstrate";
  $("demo").hidden = !demo;
  $("demo-text").value = "";
  $("help").textContent = compare
    ? "Which answer is better? Press a, b or t (tie)."
    : demo ? "Write the answer you would want, or edit a candidate below."
    : "Rank the answers: focus one and press its rank (1 = best; equal numbers are ties), or drag to reorder. Enter submits.";
  const first = list.querySelector(".card");
  if (first && !demo) first.focus();
  if (demo) $("demo-text").focus();
}

function card(candidate, index, compare) {
  const li = document.createElement("li");
  li.className = "card";
  li.tabIndex = 0;
  li.draggable = true;
  li.dataset.responseId = candidate.response_id;
  const head = document.createElement("div");
  head.className = "head";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = compare ? (index === 0 ? "A" : "B") : "–";
  head.appendChild(rank);
  const edit = document.createElement("button");
  edit.type = "button";
  edit.textContent = "Edit as demonstration";
  edit.addEventListener("click", () => {
    $("demo").hidden = false;
    $("demo-text").value = candidate.text;
    $("demo-text").focus();
  });
  const flag = document.createElement("button");
  flag.type = "button";
  flag.textContent = "Flag";
  flag.addEventListener("click", () => {
    state.flagTarget = candidate.response_id;
    $("flag-target").textContent = `Flag answer ${index + 1}:`;
    $("flag-form").hidden = false;
  });
  head.append(edit, flag);
  const body = document.createElement("div");
  body.className = "text";
  renderMarkdown(body, candidate.text);
  li.append(head, body);
  li.addEventListener("keydown", (ev) => onCardKey(ev, li));
  li.addEventListener("dragstart", () => li.classList.add("dragging"));
  li.addEventListener("dragend", () => { li.classList.remove("dragging"); ranksFromOrder(); });
  li.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    const dragging = $("candidates").querySelector(".dragging");
    if (!dragging || dragging === li) return;
    const after = ev.clientY > li.getBoundingClientRect().top + li.offsetHeight / 2;
    li.parentNode.insertBefore(dragging, after ? li.nextSibling : li);
  });
  return li;
}

function cards() { return Array.from($("candidates").querySelectorAll(".card")); }

function setRank(li, rank) {
  state.ranks[li.dataset.responseId] = rank;
  li.querySelector(".rank").textContent = String(rank);
}

function ranksFromOrder() {  // dragging orders the cards: their positions are the ranks
  cards().forEach((li, i) => setRank(li, i + 1));
}

function onCardKey(ev, li) {
  if (!state.task || state.task.kind !== "rank") return;
  const all = cards();
  const i = all.indexOf(li);
  if (/^[1-9]$/.test(ev.key)) {
    ev.preventDefault();
    setRank(li, Number(ev.key));
    const next = all[i + 1] || all.find((c) => !(c.dataset.responseId in state.ranks));
    if (next) next.focus();
  } else if (ev.key === "ArrowRight" || ev.key === "ArrowDown") {
    ev.preventDefault();
    if (all[i + 1]) all[i + 1].focus();
  } else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") {
    ev.preventDefault();
    if (all[i - 1]) all[i - 1].focus();
  } else if (ev.key === "Enter") {
    ev.preventDefault();
    submitRanking();
  }
}

function denseRanks(values) {  // any numbers the rater typed -> 1..m, equal numbers stay ties
  const distinct = Array.from(new Set(values)).sort((a, b) => a - b);
  return values.map((v) => distinct.indexOf(v) + 1);
}

function newEventId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function baseSubmission(kind) {
  const task = state.task;
  return { kind, event_id: newEventId(), lease_id: task.lease_id, prompt_id: task.prompt_id,
           lead_time_ms: Date.now() - state.leasedAt };
}

function submitRanking() {
  const all = cards();
  const missing = all.filter((li) => !(li.dataset.responseId in state.ranks));
  if (missing.length) {
    showError(`Give every answer a rank first (${missing.length} still without one).`);
    missing[0].focus();
    return;
  }
  const ids = all.map((li) => li.dataset.responseId);
  send({ ...baseSubmission("rank"), response_ids: ids, ranks: denseRanks(ids.map((id) => state.ranks[id])) });
}

function submitChoice(choice) {
  if (!state.task || state.task.kind !== "compare") return;
  send({ ...baseSubmission("compare"), response_ids: state.task.candidates.map((c) => c.response_id), choice });
}

function submitDemonstration() {
  const text = $("demo-text").value;
  if (!text.trim()) { showError("Write an answer first."); return; }
  send({ ...baseSubmission("demonstrate"), text });
}

// A submission is kept in localStorage until the service acknowledged it, and resent with the same
// event id after a failure (e.g. a restart): the service counts an event id once.
async function send(submission) {
  localStorage.setItem(PENDING, JSON.stringify(submission));
  await deliver(submission);
}

async function deliver(submission, attempt = 0) {
  try {
    const ack = await api("POST", "/api/submit", submission);
    localStorage.removeItem(PENDING);
    state.done += ack.duplicate ? 0 : 1;
    showError("");
    notice(ack.late ? "Saved. (Your time on that task had run out; it still counts, marked late.)"
                    : ack.duplicate ? "Saved (it had already arrived)." : "Saved.");
    state.task = null;
    await nextTask();
  } catch (e) {
    if (e.status === 0 || e.status >= 502) {
      showError(e.message + " Your answer is kept and will be sent again automatically.");
      setTimeout(() => deliver(submission, attempt + 1), Math.min(5000, 500 * 2 ** attempt));
    } else {
      if (e.status !== 401) localStorage.removeItem(PENDING);
      fail(e);
    }
  }
}

function resendPending() {
  const raw = localStorage.getItem(PENDING);
  if (!raw) return;
  try { deliver(JSON.parse(raw)); } catch (e) { localStorage.removeItem(PENDING); }
}

async function skip() {
  if (!state.task) return;
  try {
    await api("POST", "/api/release", { lease_id: state.task.lease_id });
    notice("Skipped.");
    await nextTask();
  } catch (e) { fail(e); }
}

async function flag(ev) {
  ev.preventDefault();
  try {
    await api("POST", "/api/flag", { lease_id: state.task.lease_id, response_id: state.flagTarget,
                                     reason: $("flag-reason").value, note: $("flag-note").value });
    $("flag-form").hidden = true;
    $("flag-note").value = "";
    notice("Flagged. Thank you: it is left out of training data. You can still rank the task or skip it.");
  } catch (e) { fail(e); }
}

function tick() {
  if (!state.task) return;
  const left = Math.max(0, Math.round((state.expiresAt - Date.now()) / 1000));
  $("timer").textContent = left > 0 ? `Time left on this task: ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`
                                    : "Time is up on this task: you can still submit (it counts as late).";
}

// ---- rater and admin pages -----------------------------------------------------------------
function table(el, headers, rows) {
  el.replaceChildren();
  const head = document.createElement("tr");
  for (const h of headers) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
  el.appendChild(head);
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const cell of row) { const td = document.createElement("td"); td.textContent = cell; tr.appendChild(td); }
    el.appendChild(tr);
  }
}

const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(0) + "%");
const num = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2));

async function loadMe() {
  try {
    const me = await api("GET", "/api/me");
    const s = me.stats;
    table($("me-table"), ["", ""], [
      ["Rater", me.rater_id], ["Judged pairs", s.judgements], ["Agreement with consensus", pct(s.agreement)],
      ["Gold accuracy", s.gold_total ? `${pct(s.gold_accuracy)} (${s.gold_correct}/${s.gold_total})` : "–"],
      ["Late submissions", s.late], ["Skipped", s.released], ["Flags", s.flags]]);
  } catch (e) { fail(e); }
}

async function loadAdmin() {
  try {
    const o = await api("GET", "/api/admin/overview");
    table($("queue"), ["Policy version", "Open slots"], Object.entries(o.queue_depth));
    const bars = $("per-hour");
    bars.replaceChildren();
    const max = Math.max(1, ...o.judgements_per_hour);
    for (const n of o.judgements_per_hour) {
      const bar = document.createElement("div");
      bar.style.height = `${(70 * n) / max}px`;
      bar.title = `${n}`;
      bars.appendChild(bar);
    }
    coverageChart(o.coverage);
    table($("raters"), ["Rater", "Pairs", "Weight", "Gold accuracy", "Agreement", "Flags", "Late", "Skipped"],
          o.raters.map((r) => [r.rater_id, r.judgements, num(r.weight), pct(r.gold_accuracy), pct(r.agreement),
                               r.flags, r.late, r.released]));
    table($("tokens"), ["Token", "Rater", "Scope", "Revoked", "Label"],
          o.tokens.map((t) => [t.prefix + "…", t.rater_id, t.scope, t.revoked ? "yes" : "", t.label]));
  } catch (e) { fail(e); }
}

function coverageChart(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", "600");
  svg.setAttribute("height", "120");
  if (points.length) {
    const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
    const xy = points.map((p) => `${(590 * (p.t - t0)) / (t1 - t0) + 5},${115 - 110 * (p.total ? p.covered / p.total : 0)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", xy.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#2a7ae2");
    line.setAttribute("stroke-width", "2");
    svg.appendChild(line);
    const last = points[points.length - 1];
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", "8");
    label.setAttribute("y", "14");
    label.textContent = `${last.covered} of ${last.total} tasks fully covered`;
    svg.appendChild(label);
  }
  $("coverage").replaceChildren(svg);
}

async function adminAction(ev, path, body, show) {
  ev.preventDefault();
  try { show(await api("POST", path, body)); } catch (e) { fail(e); }
}

async function loadGold(ev) {
  ev.preventDefault();
  try {
    const p = await api("GET", "/api/admin/prompt?prompt_id=" + encodeURIComponent($("gold-prompt").value));
    const list = $("gold-responses");
    list.replaceChildren();
    for (const r of p.responses) {
      const li = document.createElement("li");
      const input = document.createElement("input");
      input.type = "number";
      input.min = "1";
      input.dataset.responseId = r.response_id;
      input.setAttribute("aria-label", "correct rank");
      const text = document.createElement("div");
      text.className = "text";
      renderMarkdown(text, r.text);
      li.append(input, text);
      list.appendChild(li);
    }
    $("gold-form").hidden = !p.responses.length;
    if (!p.responses.length) showError("That prompt has no known responses.");
  } catch (e) { fail(e); }
}

// ---- wiring --------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const me = await api("POST", "/api/login", { token: $("token").value });
      $("token").value = "";
      signedIn(me);
    } catch (e) { showError(e.message); }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout", {}); } catch (e) { /* signed out either way */ }
    signedOut("");
  });
  for (const a of document.querySelectorAll("nav a")) {
    a.addEventListener("click", (ev) => { ev.preventDefault(); show(a.dataset.view); });
  }
  $("next").addEventListener("click", nextTask);
  $("submit-rank").addEventListener("click", submitRanking);
  $("demo-submit").addEventListener("click", submitDemonstration);
  $("write").addEventListener("click", () => { $("demo").hidden = false; $("demo-text").focus(); });
  $("skip").addEventListener("click", skip);
  $("flag-form").addEventListener("submit", flag);
  $("flag-cancel").addEventListener("click", () => { $("flag-form").hidden = true; });
  for (const b of document.querySelectorAll("#compare-buttons button")) {
    b.addEventListener("click", () => submitChoice(b.dataset.choice));
  }
  document.addEventListener("keydown", (ev) => {
    if (!state.task || state.task.kind !== "compare" || ev.target.tagName === "TEXTAREA"
        || ev.target.tagName === "INPUT") return;
    const choice = { a: "A", b: "B", t: "tie" }[ev.key];
    if (choice) { ev.preventDefault(); submitChoice(choice); }
  });
  $("issue-form").addEventListener("submit", (ev) => adminAction(ev, "/api/admin/tokens",
    { rater_id: $("issue-rater").value, scope: $("issue-scope").value },
    (r) => { $("issued").textContent = `Token for ${r.rater_id} (shown once): ${r.token}`; loadAdmin(); }));
  $("revoke-form").addEventListener("submit", (ev) => adminAction(ev, "/api/admin/revoke",
    { rater_id: $("revoke-rater").value }, (r) => { notice(`Revoked ${r.revoked} token(s).`); loadAdmin(); }));
  $("gold-load").addEventListener("submit", loadGold);
  $("gold-form").addEventListener("submit", (ev) => {
    const inputs = Array.from($("gold-responses").querySelectorAll("input"));
    adminAction(ev, "/api/admin/gold", { prompt_id: $("gold-prompt").value,
      response_ids: inputs.map((i) => i.dataset.responseId), ranks: inputs.map((i) => Number(i.value)) },
    () => notice("Gold ranking saved."));
  });
  $("export").addEventListener("click", (ev) => adminAction(ev, "/api/admin/export", { format: "jsonl" },
    (r) => { $("exported").textContent = `Exported ${r.num_pairs} pairs and ${r.num_demonstrations} demonstrations `
                                          + `(${r.dataset_version}) to ${r.pairs_uri}`; }));
  setInterval(tick, 1000);
  try { signedIn(await api("GET", "/api/me")); } catch (e) { signedOut(e.status === 401 ? "" : e.message); }
});
