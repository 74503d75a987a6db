// The playground page: sign-in, streamed prompting, the labeling queue, and its quality figures.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("rlhf-token") || "",
  config: null,
  history: [],          // chat turns kept when "Keep the conversation" is on
  streaming: null,      // AbortController of the running stream
  task: null,           // the leased task being labeled (from GET /api/task)
  leaseTimer: null,
  retryTimer: null,     // polls an empty queue while the Label tab is open
};

// ---------------------------------------------------------------- helpers
function randomId() {
  // crypto.getRandomValues works on plain http too (randomUUID needs https).
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function describeError(err) {
  // {status, code, message, service} from the backend, or a network failure.
  if (err && err.code) {
    const who = err.service && err.service !== "playground" ? `${err.service} service` : "playground";
    return `${who}: ${err.code}${err.status ? " (HTTP " + err.status + ")" : ""}: ${err.message}`;
  }
  return `Request failed: ${err && err.message ? err.message : err}`;
}

async function errorFrom(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  const e = (body && body.error) || { code: "HTTP_" + resp.status, message: resp.statusText || "request failed" };
  return { ...e, status: resp.status };
}

async function api(path, body, method = "POST") {
  const resp = await fetch(path, {
    method,
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + state.token },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw await errorFrom(resp);
  return resp.json();
}

function numberOrNull(input) {
  return input.value === "" ? null : Number(input.value);
}

function generationSettings(maxInput, tempInput) {
  const out = { max_new_tokens: numberOrNull(maxInput) || 0 };
  const t = numberOrNull(tempInput);
  if (t !== null) out.temperature = t;
  return out;
}

function setModelVersion(version) {
  if (!version) return;
  $("model-version").textContent = version;
  $("model-line").hidden = false;
}

// ---------------------------------------------------------------- sign-in
async function signIn(token) {
  state.token = token;
  const who = await api("/api/session", {});
  sessionStorage.setItem("rlhf-token", token);
  $("whoami-user").textContent = who.user_id;
  $("whoami-role").textContent = who.role;
  $("whoami").hidden = false;
  $("signin").hidden = true;
  $("workspace").hidden = false;
  for (const tab of [$("tab-label"), $("tab-quality")]) {
    tab.disabled = !who.labeler;
    tab.title = who.labeler ? "" : "Labeling needs a labeler token";
  }
  state.config = await api("/api/config", undefined, "GET");
  api("/api/model", undefined, "GET").then((m) => setModelVersion(m.version)).catch(() => {});
  $("prompt").focus();
}

function signOut() {
  sessionStorage.removeItem("rlhf-token");
  state.token = "";
  location.reload();
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  show($("signin-error"), "");
  const token = $("token").value.trim();
  if (!token) { show($("signin-error"), "Enter your access token."); $("token").focus(); return; }
  try {
    await signIn(token);
  } catch (err) {
    show($("signin-error"), describeError(err));
    $("token").focus();
  }
});
$("sign-out").addEventListener("click", signOut);

// ---------------------------------------------------------------- tabs
const tabs = [$("tab-prompt"), $("tab-label"), $("tab-quality")];
function selectTab(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
  if (tab === $("tab-label") && !state.task) nextTask();  // nothing to type: the queue serves the task
  if (tab === $("tab-quality")) loadStats();
}
tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (ev) => {
    if (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft") return;
    const next = tabs[(i + (ev.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
    if (!next.disabled) selectTab(next);
  });
});

// ---------------------------------------------------------------- prompting
function addTurn(role, text) {
  const li = document.createElement("li");
  li.className = "turn " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Policy";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("transcript").append(li);
  return li;
}

// Parse a text/event-stream body, calling onEvent(name, data) per event.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      onEvent(name, data ? JSON.parse(data) : {});
    }
  }
}

async function sendPrompt() {
  const text = $("prompt").value.trim();
  show($("prompt-error"), "");
  if (!text) { show($("prompt-error"), "Type a prompt first."); $("prompt").focus(); return; }
  const chat = $("chat-mode").checked;
  const body = { request_id: randomId(), ...generationSettings($("max-tokens"), $("temperature")) };
  if (chat) body.messages = [...state.history, { role: "user", content: text }];
  else body.prompt = text;

  addTurn("user", text);
  const answer = addTurn("assistant", "");
  const answerText = answer.querySelector(".text");
  answer.classList.add("streaming");
  answer.setAttribute("aria-busy", "true");
  $("send").disabled = true;
  $("stop").disabled = false;
  $("prompt-status").textContent = "Generating…";
  const controller = new AbortController();
  state.streaming = controller;
  let finalText = null;
  try {
    const resp = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + state.token },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw await errorFrom(resp);
    $("prompt").value = "";
    await readEvents(resp, (name, data) => {
      if (name === "prompt") answer.dataset.promptEventId = data.event_id;
      else if (name === "token") { answerText.textContent += data.text; setModelVersion(data.model_version); }
      else if (name === "done") {
        finalText = data.text;
        answerText.textContent = data.text;
        setModelVersion(data.model_version);
        answer.querySelector(".who").textContent = `Policy · ${data.model_version}`;
        $("prompt-status").textContent = `Done (${data.finish_reason.replace("FINISH_REASON_", "").toLowerCase()}, ${data.completion_tokens} tokens) from model ${data.model_version}.`;
      } else if (name === "error") throw { ...data, status: 0 };
    });
    if (chat && finalText !== null) {
      state.history.push({ role: "user", content: text }, { role: "assistant", content: finalText });
    }
  } catch (err) {
    if (err && err.name === "AbortError") {
      $("prompt-status").textContent = "Stopped.";
    } else {
      $("prompt-status").textContent = "";
      show($("prompt-error"), describeError(err));
      if (!answerText.textContent) answer.remove();
    }
  } finally {
    answer.classList.remove("streaming");
    answer.removeAttribute("aria-busy");
    state.streaming = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("prompt-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendPrompt(); });
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); sendPrompt(); }
});
$("stop").addEventListener("click", () => state.streaming && state.streaming.abort());
$("new-chat").addEventListener("click", () => {
  state.history = [];
  $("transcript").replaceChildren();
  $("prompt-status").textContent = "New conversation.";
  $("prompt").focus();
});

// ---------------------------------------------------------------- labeling
const LETTERS = "ABCDEFGHI";

function cardOf(index) {
  return document.querySelector(`.sample[data-index="${index}"]`);
}

function buildCard(sample, index) {
  const li = $("card-template").content.firstElementChild.cloneNode(true);
  const name = `Sample ${LETTERS[index]}`;
  li.dataset.index = index;
  li.setAttribute("aria-label", name);
  li.querySelector(".sample-name").textContent = name;
  li.querySelector(".sample-text").textContent = sample.text || "(empty)";
  const likert = li.querySelector(".likert");
  for (let v = state.config.likert_min; v <= state.config.likert_max; v++) likert.add(new Option(String(v), String(v)));
  likert.setAttribute("aria-label", `Likert score for ${name} (1 worst, 7 best)`);
  const flags = li.querySelector(".flag-list");
  for (const flag of state.config.flags) {
    const label = document.createElement("label");
    label.className = "inline";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = flag.name;
    box.className = "flag";
    label.append(box, " " + flag.label);
    flags.append(label);
  }
  li.querySelector(".flags summary").textContent = `Flags for ${name}`;
  li.querySelector(".tie").setAttribute("aria-label", `${name} is tied with the sample above`);
  li.querySelector(".toggle-rank").addEventListener("click", () => toggleRanked(li));
  li.querySelector(".move-up").addEventListener("click", () => move(li, -1));
  li.querySelector(".move-down").addEventListener("click", () => move(li, +1));
  li.querySelector(".tie").addEventListener("change", renumber);
  li.addEventListener("keydown", (ev) => onCardKey(ev, li));
  li.addEventListener("dragstart", (ev) => {
    ev.dataTransfer.setData("text/plain", String(index));
    ev.dataTransfer.effectAllowed = "move";
    li.classList.add("dragging");
  });
  li.addEventListener("dragend", () => { li.classList.remove("dragging"); clearDropMarks(); });
  return li;
}

function announce(text) { $("rank-live").textContent = text; }

function nameOf(li) { return li.getAttribute("aria-label"); }

// Ranks follow the list order; a card marked "tied" shares the rank above.
function renumber() {
  let rank = 0;
  for (const li of $("ranking").children) {
    const tie = li.querySelector(".tie");
    if (!li.previousElementSibling) tie.checked = false;
    tie.disabled = !li.previousElementSibling;
    if (!tie.checked) rank += 1;
    li.dataset.rank = rank;
    li.classList.toggle("tied", tie.checked);
    li.querySelector(".rank-badge").textContent = String(rank);
    li.querySelector(".toggle-rank").textContent = "Unrank";
  }
  for (const li of $("unranked").children) {
    li.dataset.rank = 0;
    li.querySelector(".tie").checked = false;
    li.classList.remove("tied");
    li.querySelector(".rank-badge").textContent = "–";
    li.querySelector(".toggle-rank").textContent = "Rank next";
  }
  const left = $("unranked").children.length;
  $("task-status").textContent = left ? `${left} output(s) still unranked.` : "All outputs ranked.";
}

function toggleRanked(li) {
  if (li.parentElement === $("ranking")) {
    $("unranked").append(li);
    announce(`${nameOf(li)} removed from the ranking.`);
  } else {
    $("ranking").append(li);
    announce(`${nameOf(li)} ranked at position ${$("ranking").children.length}.`);
  }
  renumber();
  li.focus();
}

function move(li, delta) {
  const list = li.parentElement;
  if (list !== $("ranking")) return;
  const sibling = delta < 0 ? li.previousElementSibling : li.nextElementSibling;
  if (!sibling) return;
  if (delta < 0) list.insertBefore(li, sibling);
  else list.insertBefore(sibling, li);
  renumber();
  li.focus();
  announce(`${nameOf(li)} moved to position ${Array.from(list.children).indexOf(li) + 1}, rank ${li.dataset.rank}.`);
}

function onCardKey(ev, li) {
  if (ev.target !== li) return;  // keys inside the card's own controls behave normally
  const siblings = Array.from(li.parentElement.children);
  const at = siblings.indexOf(li);
  if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); toggleRanked(li); }
  else if (ev.altKey && ev.key === "ArrowUp") { ev.preventDefault(); move(li, -1); }
  else if (ev.altKey && ev.key === "ArrowDown") { ev.preventDefault(); move(li, +1); }
  else if (ev.key === "ArrowUp" && at > 0) { ev.preventDefault(); siblings[at - 1].focus(); }
  else if (ev.key === "ArrowDown" && at < siblings.length - 1) { ev.preventDefault(); siblings[at + 1].focus(); }
  else if (ev.key === "t" || ev.key === "T") {
    const tie = li.querySelector(".tie");
    if (li.parentElement === $("ranking") && !tie.disabled) {
      tie.checked = !tie.checked;
      renumber();
      announce(`${nameOf(li)} ${tie.checked ? "tied with" : "no longer tied with"} the sample above; rank ${li.dataset.rank}.`);
    }
  } else if (/^[0-7]$/.test(ev.key)) {
    li.querySelector(".likert").value = ev.key === "0" ? "" : ev.key;
    announce(ev.key === "0" ? `Likert score of ${nameOf(li)} cleared.` : `${nameOf(li)} Likert score ${ev.key}.`);
  }
}

// Drag and drop: drop on a card to go before/after it, or on a list's empty space to go last.
function clearDropMarks() {
  document.querySelectorAll(".drop-before, .drop-after, .over").forEach((el) => el.classList.remove("drop-before", "drop-after", "over"));
}
function dropTarget(ev) {
  const card = ev.target.closest ? ev.target.closest(".sample") : null;
  if (!card) return { card: null, before: false };
  const box = card.getBoundingClientRect();
  return { card, before: ev.clientY < box.top + box.height / 2 };
}
for (const list of [$("unranked"), $("ranking")]) {
  list.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    ev.dataTransfer.dropEffect = "move";
    clearDropMarks();
    list.classList.add("over");
    const { card, before } = dropTarget(ev);
    if (card) card.classList.add(before ? "drop-before" : "drop-after");
  });
  list.addEventListener("dragleave", (ev) => { if (ev.target === list) list.classList.remove("over"); });
  list.addEventListener("drop", (ev) => {
    ev.preventDefault();
    clearDropMarks();
    const li = cardOf(ev.dataTransfer.getData("text/plain"));
    if (!li) return;
    const { card, before } = dropTarget(ev);
    if (card && card !== li) list.insertBefore(li, before ? card : card.nextElementSibling);
    else if (!card) list.append(li);
    renumber();
    const where = list === $("ranking") ? `rank ${li.dataset.rank}` : "unranked";
    announce(`${nameOf(li)} dropped: ${where}.`);
  });
}

function showLease() {
  if (!state.task) { $("lease").textContent = ""; return; }
  const left = Math.max(0, Math.round((state.task.lease_expires_unix_ms - Date.now()) / 1000));
  const mm = String(Math.floor(left / 60)), ss = String(left % 60).padStart(2, "0");
  $("lease").textContent = left ? `Lease: ${mm}:${ss} left` : "Lease expired: the task went back to the queue.";
  $("lease").classList.toggle("expiring", left < 60);
}

function clearTask() {
  state.task = null;
  clearInterval(state.leaseTimer);
  $("unranked").replaceChildren();
  $("ranking").replaceChildren();
  $("task-area").hidden = true;
  $("demonstration").value = "";
  $("label-result").hidden = true;
  $("label-result").replaceChildren();
  show($("label-error"), "");
  showLease();
}

// An empty queue (or a task still being generated) is asked again every few seconds
// while the Label tab is open, so a prompt logged a moment later shows up by itself.
const QUEUE_RETRY_MS = 2000;
function labelTabOpen() {
  return $("tab-label").getAttribute("aria-selected") === "true";
}
function retryLater(err) {
  const waiting = err && (err.code === "NOT_FOUND" || (err.code === "UNAVAILABLE" && /still being generated/.test(err.message)));
  if (!waiting) return false;
  $("task-status").textContent = err.code === "NOT_FOUND"
    ? "No task is queued now; checking again every few seconds."
    : "The next task is being generated; checking again shortly.";
  state.retryTimer = setTimeout(() => { state.retryTimer = null; if (labelTabOpen() && !state.task) nextTask(); }, QUEUE_RETRY_MS);
  return true;
}

// Ask the queue for the next task: the same one while this labeler's lease is open.
async function nextTask() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  clearTask();
  $("next-task").disabled = true;
  $("task-status").textContent = "Getting the next task…";
  try {
    const task = await api("/api/task", undefined, "GET");
    state.task = task;
    $("task-prompt").textContent = task.prompt_text;
    const comparison = task.kind === "comparison";
    $("task-kind").textContent = comparison ? `rank ${task.samples.length} outputs` : "write a demonstration";
    $("ranking-area").hidden = !comparison;
    $("demo-area").hidden = comparison;
    task.samples.forEach((s, i) => $("unranked").append(buildCard(s, i)));
    $("task-area").hidden = false;
    state.leaseTimer = setInterval(showLease, 1000);
    showLease();
    $("submit-labels").disabled = false;
    if (comparison) { renumber(); $("unranked").firstElementChild.focus(); }
    else { $("task-status").textContent = "Write the answer you would want."; $("demonstration").focus(); }
  } catch (err) {
    $("task-status").textContent = "";
    if (!retryLater(err)) show($("label-error"), describeError(err));
  } finally {
    $("next-task").disabled = false;
  }
}

function confirmLine(reply) {
  const p = document.createElement("p");
  p.append("Recorded: event ");
  const code = Object.assign(document.createElement("code"), { className: "event-id", textContent: reply.event_id });
  p.append(code, reply.duplicate ? " (already recorded; not written twice)." : ".");
  return p;
}

// One submission per task: every output's Likert score, flags and rank, or the
// demonstration. The service checks all of it before writing any, so a refusal
// records nothing, and Submit again never records anything twice.
async function submitTask() {
  show($("label-error"), "");
  const task = state.task;
  if (!task) return;
  const body = { task_id: task.task_id };
  if (task.kind === "comparison") {
    body.judgements = task.samples.map((s, i) => {
      const card = cardOf(i);
      return {
        sample_id: s.sample_id,
        likert: Number(card.querySelector(".likert").value || 0),
        rank: Number(card.dataset.rank || 0),
        flags: Array.from(card.querySelectorAll(".flag:checked"), (b) => b.value),
      };
    });
  } else {
    body.demonstration = $("demonstration").value.trim();
  }
  $("submit-labels").disabled = true;
  try {
    const reply = await api("/api/task", body);
    clearInterval(state.leaseTimer);
    state.task = null;
    $("lease").textContent = "";
    const result = $("label-result");
    result.replaceChildren(confirmLine(reply));
    result.hidden = false;
    $("task-area").hidden = true;
    $("task-status").textContent = "Submitted. Press Next task for another.";
    $("next-task").focus();
  } catch (err) {
    const refused = err && ["INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION"].includes(err.code);
    show($("label-error"), describeError(err) + (refused ? " (nothing was recorded)" : " (press Submit again: nothing is recorded twice)"));
    $("submit-labels").disabled = false;
  }
}
$("submit-labels").addEventListener("click", submitTask);
$("next-task").addEventListener("click", nextTask);

// ---------------------------------------------------------------- quality dashboard
function pct(x) { return `${(100 * x).toFixed(1)}%`; }

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: String(c) }));
  return tr;
}

async function loadStats() {
  show($("stats-error"), "");
  try {
    const s = await api("/api/stats", undefined, "GET");
    const figures = [
      ["Pairwise agreement", s.compared_pairs ? `${pct(s.pairwise_agreement)} of ${s.compared_pairs} response pairs` : "no overlapping tasks yet"],
      ["Kendall's τ-b", s.compared_pairs ? s.kendall_tau_b.toFixed(3) : "–"],
      ["Overlapping tasks", s.overlap_tasks],
      ["Submitted per split", Object.entries(s.submitted_per_split).map(([k, v]) => `${k} ${v}`).join(", ") || "none"],
      ["Open leases", s.open_leases],
      ["Prompts waiting", s.queued_prompts],
    ];
    $("agreement").replaceChildren(...figures.flatMap(([k, v]) => [
      Object.assign(document.createElement("dt"), { textContent: k }),
      Object.assign(document.createElement("dd"), { textContent: String(v), id: "stat-" + k.split(" ")[0].toLowerCase() }),
    ]));
    $("labelers-table").tBodies[0].replaceChildren(...s.labelers.map((l) => row([
      l.labeler_id, l.submitted, l.tasks_per_hour.toFixed(1), l.compared_pairs ? pct(l.agreement_with_others) : "–", l.compared_pairs,
    ])));
    $("versions-table").tBodies[0].replaceChildren(...s.versions.map((v) => row([
      v.policy_version, v.samples, v.likert_mean.toFixed(2),
      Object.entries(v.flag_rates).filter(([, r]) => r > 0).sort((a, b) => b[1] - a[1]).slice(0, 3)
        .map(([f, r]) => `${f.replaceAll("_", " ")} ${pct(r)}`).join(", ") || "none",
    ])));
  } catch (err) {
    show($("stats-error"), describeError(err));
  }
}
$("refresh-stats").addEventListener("click", loadStats);

// ---------------------------------------------------------------- start
if (state.token) {
  signIn(state.token).catch(() => { sessionStorage.removeItem("rlhf-token"); state.token = ""; });
}
