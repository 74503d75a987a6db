// The playground page: sign-in, streamed prompting, and K-way ranking.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("rlhf-token") || "",
  config: null,
  history: [],          // chat turns kept when "Keep the conversation" is on
  streaming: null,      // AbortController of the running stream
  label: null,          // the batch being labeled, see newBatch()
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
  $("tab-label").disabled = !who.labeler;
  $("tab-label").title = who.labeler ? "" : "Labeling needs a labeler token";
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
const tabs = [$("tab-prompt"), $("tab-label")];
function selectTab(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
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

function newBatch(prompt, reply) {
  return {
    id: randomId(),           // request ids derive from it: a retry is idempotent
    prompt,
    promptEventId: reply ? reply.prompt_event_id : "",
    modelVersion: reply ? reply.model_version : "",
    samples: reply ? reply.samples : [],
  };
}

function cardOf(index) {
  return document.querySelector(`.sample[data-index="${index}"]`);
}

function buildCard(sample, index) {
  const li = $("card-template").content.firstElementChild.cloneNode(true);
  const name = `Sample ${LETTERS[index]}`;
  li.dataset.index = index;
  li.setAttribute("aria-label", name);
  li.querySelector(".sample-name").textContent = name;
  li.querySelector(".sample-meta").textContent = sample.finish_reason.replace("FINISH_REASON_", "").toLowerCase();
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
  li.querySelector(".use-demo").addEventListener("click", () => {
    $("demonstration").value = sample.text;
    $("demonstration").focus();
  });
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
  $("samples-status").textContent = left ? `${left} sample(s) still unranked.` : "All samples ranked.";
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

function resetLabeling(keepPrompt) {
  state.label = null;
  $("unranked").replaceChildren();
  $("ranking").replaceChildren();
  $("ranking-area").hidden = true;
  $("demonstration").value = "";
  $("samples-status").textContent = "";
  $("label-result").hidden = true;
  $("label-result").replaceChildren();
  show($("label-error"), "");
  $("submit-labels").disabled = false;
  if (!keepPrompt) $("label-prompt").value = "";
}

$("samples-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const prompt = $("label-prompt").value.trim();
  resetLabeling(true);
  if (!prompt) { show($("label-error"), "Type the prompt to label first."); $("label-prompt").focus(); return; }
  const k = Number($("k").value);
  $("get-samples").disabled = true;
  $("samples-status").textContent = `Generating ${k} samples…`;
  try {
    const reply = await api("/api/samples", {
      prompt, k, request_id: randomId(), ...generationSettings($("label-max-tokens"), $("label-temperature")),
    });
    state.label = newBatch(prompt, reply);
    setModelVersion(reply.model_version);
    reply.samples.forEach((s, i) => $("unranked").append(buildCard(s, i)));
    $("ranking-area").hidden = false;
    renumber();
    $("unranked").firstElementChild.focus();
  } catch (err) {
    $("samples-status").textContent = "";
    show($("label-error"), describeError(err));
  } finally {
    $("get-samples").disabled = false;
  }
});

function confirmLine(what, reply) {
  const li = document.createElement("li");
  li.append(`${what}: event `);
  const code = document.createElement("code");
  code.className = "event-id";
  code.textContent = reply.event_id;
  li.append(code, reply.duplicate ? " (already recorded; not written twice)" : ` (${reply.topic} #${reply.offset})`);
  return li;
}

// Submit the ranking, the per-sample labels and the demonstration as one
// submission: the service checks every part before it writes any, so a bad
// field writes nothing. Request ids derive from the batch, so pressing Submit
// again after a failure never records anything twice.
async function submitLabels() {
  show($("label-error"), "");
  const prompt = $("label-prompt").value.trim();
  const demo = $("demonstration").value.trim();
  if (!state.label) state.label = newBatch(prompt, null);
  const batch = state.label;
  const body = { labels: [] };
  const parts = [];  // what each reply confirms, in the order the service answers
  if (batch.samples.length) {
    const responses = batch.samples.map((s, i) => ({
      text: s.text, policy_version: batch.modelVersion, rank: Number(cardOf(i).dataset.rank || 0),
    }));
    body.comparison = { request_id: batch.id + "-cmp", prompt_id: batch.promptEventId, prompt_text: batch.prompt, responses };
    parts.push("Ranking");
    batch.samples.forEach((s, i) => {
      const card = cardOf(i);
      const likert = Number(card.querySelector(".likert").value || 0);
      const flags = Array.from(card.querySelectorAll(".flag:checked"), (b) => b.value);
      if (!likert && !flags.length) return;
      body.labels.push({
        request_id: `${batch.id}-lab-${i}`, prompt_id: batch.promptEventId, prompt_text: batch.prompt,
        response: s.text, policy_version: batch.modelVersion, likert, flags,
      });
      parts.push(`Labels for sample ${LETTERS[i]}`);
    });
  }
  if (demo) {
    body.demonstration = {
      request_id: batch.id + "-demo", prompt_id: batch.promptEventId, prompt_text: batch.prompt || prompt, response: demo,
    };
    parts.push("Demonstration");
  }
  if (!parts.length) { show($("label-error"), "Nothing to submit: get samples to rank, or write a demonstration."); return; }

  const result = $("label-result");
  $("submit-labels").disabled = true;
  try {
    const { replies } = await api("/api/submission", body);
    const list = document.createElement("ul");
    replies.forEach((reply, i) => list.append(confirmLine(parts[i], reply)));
    result.replaceChildren(Object.assign(document.createElement("strong"), { textContent: "Submitted." }), list);
    result.hidden = false;
    result.focus();
  } catch (err) {
    // A refused field writes nothing; after a fault, part may be recorded, and Submit again completes it once.
    const refused = err && (err.code === "INVALID_ARGUMENT" || err.code === "PERMISSION_DENIED");
    show($("label-error"), describeError(err) + (refused ? " (nothing was recorded)" : " (press Submit again: nothing is recorded twice)"));
    $("submit-labels").disabled = false;
  }
}
$("submit-labels").addEventListener("click", submitLabels);
$("reset-labels").addEventListener("click", () => { resetLabeling(false); $("label-prompt").focus(); });

// ---------------------------------------------------------------- start
if (state.token) {
  signIn(state.token).catch(() => { sessionStorage.removeItem("rlhf-token"); state.token = ""; });
}
