// midfill's page: a FIM playground with ghost text, a streaming chat, and the server's status.
// Plain browser JavaScript, no build step and no CDN, so it works wherever the server does.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "midfill-api-key";

// ---- API access: every call carries the key once the user gave it; a 401 asks for it. ----

let keyPrompt = null;

function askForKey(rejected) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      $("key-error").hidden = !rejected;
      $("key-input").value = "";
      $("key-dialog").showModal();
      $("key-form").onsubmit = () => {
        localStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
        keyPrompt = null;
        resolve();
      };
    });
  }
  return keyPrompt;
}

async function api(path, body, signal) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, {
      method: body === undefined ? "GET" : "POST", headers, signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status !== 401) return response;
    await askForKey(attempt > 0 || Boolean(key));
  }
}

function escapeHtml(text) {
  return text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// ---- Views, switched by the tabs or Alt+1/2/3. ----

function show(view) {
  for (const tab of document.querySelectorAll("nav button")) {
    const selected = tab.dataset.view === view;
    tab.setAttribute("aria-selected", String(selected));
    $(tab.dataset.view).hidden = !selected;
  }
  if (view === "playground") $("code").focus();
  if (view === "chat") $("chat-input").focus();
  if (view === "status") refreshStatus();
}

for (const tab of document.querySelectorAll("nav button")) tab.addEventListener("click", () => show(tab.dataset.view));
document.addEventListener("keydown", (event) => {
  const views = { "1": "playground", "2": "chat", "3": "status" };
  if (event.altKey && views[event.key]) {
    event.preventDefault();
    show(views[event.key]);
  }
});

// ---- Playground: completions at the cursor as grey ghost text. ----

const code = $("code");
const mirror = $("mirror");
const DEBOUNCE_MS = 150;
let ghost = "";
let ghostAt = -1;
let pending = null; // AbortController of the request in flight
let timer = null;
let version = 0;

function renderMirror() {
  const text = code.value;
  const at = ghost ? ghostAt : text.length;
  mirror.innerHTML = escapeHtml(text.slice(0, at)) + `<span class="ghost">${escapeHtml(ghost)}</span>` +
    escapeHtml(text.slice(at)) + "\n";
  mirror.scrollTop = code.scrollTop;
  mirror.scrollLeft = code.scrollLeft;
}

function dismiss() {
  ghost = "";
  ghostAt = -1;
  renderMirror();
}

function cursorOf(text, offset) {
  const before = text.slice(0, offset).split("\n");
  return { line: before.length - 1, character: Array.from(before[before.length - 1]).length };
}

async function requestCompletion() {
  if (pending) pending.abort(); // a newer keystroke makes the older request stale
  const at = code.selectionStart;
  if (at !== code.selectionEnd) return;
  const mine = ++version;
  pending = new AbortController();
  const multiline = document.querySelector('input[name="mode"]:checked').value === "multi";
  const started = performance.now();
  try {
    const response = await api("/v1/code-completion", {
      inputs: { sources: { "playground.py": code.value }, cursor: { file: "playground.py", ...cursorOf(code.value, at) }, multiline },
      parameters: { max_new_tokens: multiline ? 96 : 40, temperature: 0 },
    }, pending.signal);
    const reply = await response.json();
    if (mine !== version || code.selectionStart !== at) return;
    if (!response.ok) {
      $("latency").textContent = reply.detail || reply.error?.message || `error ${response.status}`;
      return;
    }
    ghost = reply.choices[0].code_completion;
    ghostAt = at;
    $("latency").textContent = `${Math.round(performance.now() - started)} ms` + (ghost ? "" : " (nothing to add)");
    renderMirror();
  } catch (error) {
    if (error.name !== "AbortError") $("latency").textContent = String(error);
  }
}

function scheduleCompletion() {
  dismiss();
  clearTimeout(timer);
  timer = setTimeout(requestCompletion, DEBOUNCE_MS);
}

code.addEventListener("input", scheduleCompletion);
code.addEventListener("scroll", renderMirror);
code.addEventListener("click", scheduleCompletion);
code.addEventListener("keydown", (event) => {
  if (event.key === "Tab" && !event.shiftKey && !event.altKey) {
    event.preventDefault();
    if (ghost && code.selectionStart === ghostAt) {
      code.setRangeText(ghost, ghostAt, ghostAt, "end");
      dismiss();
      scheduleCompletion();
    } else {
      code.setRangeText("    ", code.selectionStart, code.selectionEnd, "end");
      scheduleCompletion();
    }
  } else if (event.key === "Escape") {
    if (pending) pending.abort();
    clearTimeout(timer);
    dismiss();
  } else if (event.key.startsWith("Arrow") || event.key === "Home" || event.key === "End") {
    setTimeout(scheduleCompletion, 0);
  }
});
for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", () => code.focus());

// ---- Chat: streamed answers; fenced code rendered as code. ----

const history = [];
let context = 2048; // the server's, once /v1/status has said it: answers must leave room for the prompt

function renderAnswer(element, text) {
  const parts = text.split(/```[^\n]*\n?/);
  element.innerHTML = parts.map((part, i) => (i % 2 ? `<pre><code>${escapeHtml(part)}</code></pre>` : part.trim() ? `<p>${escapeHtml(part.trim())}</p>` : "")).join("");
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  box.innerHTML = `<div class="role">${role}</div><div class="body"></div>`;
  renderAnswer(box.querySelector(".body"), text);
  $("messages").append(box);
  $("messages").scrollTop = $("messages").scrollHeight;
  return box.querySelector(".body");
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const body = addMessage("assistant", "…");
  $("send").disabled = true;
  let answer = "";
  try {
    const response = await api("/v1/chat/completions", { messages: history, stream: true, max_tokens: Math.min(256, Math.floor(context / 4)) });
    if (!response.ok) {
      const reply = await response.json();
      throw new Error(reply.error?.message || `error ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "").trim();
        if (!data || data === "[DONE]") continue;
        const delta = JSON.parse(data).choices?.[0]?.delta?.content;
        if (delta) {
          answer += delta;
          renderAnswer(body, answer);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    if (!answer) renderAnswer(body, "(no answer)");
    history.push({ role: "assistant", content: answer });
  } catch (error) {
    body.innerHTML = `<p class="error">${escapeHtml(String(error.message || error))}</p>`;
    history.pop();
  } finally {
    $("send").disabled = false;
    $("chat-input").focus();
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || $("send").disabled) return;
  $("chat-input").value = "";
  send(text);
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

// ---- Status: the server's numbers, and a finetune's progress and loss curve. ----

const number = (value, digits = 1, unit = "") => (value === null || value === undefined ? "–" : `${Number(value).toFixed(digits)}${unit}`);

function fill(grid, rows) {
  grid.innerHTML = rows.map(([label, value, id]) => `<div><dt>${label}</dt><dd data-stat="${id}">${escapeHtml(String(value))}</dd></div>`).join("");
}

function drawCurve(curve) {
  const svg = $("curve");
  const series = [["train", "#9a9aa2", curve.train], ["test", "#2f5fd0", curve.test]].filter(([, , points]) => points.length);
  const all = series.flatMap(([, , points]) => points);
  if (!all.length) { svg.innerHTML = ""; return; }
  const [steps, losses] = [all.map((p) => p[0]), all.map((p) => p[1])];
  const [x0, x1, y0, y1] = [Math.min(...steps), Math.max(...steps) || 1, Math.min(...losses), Math.max(...losses)];
  const x = (s) => 40 + ((s - x0) / (x1 - x0 || 1)) * 540;
  const y = (l) => 200 - ((l - y0) / (y1 - y0 || 1)) * 180;
  svg.innerHTML = series.map(([name, color, points]) =>
    `<polyline fill="none" stroke="${color}" stroke-width="${name === "test" ? 2.5 : 1}" points="${points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}"><title>${name} loss</title></polyline>`,
  ).join("") + `<text x="40" y="215" font-size="11">step ${x0}</text><text x="520" y="215" font-size="11">step ${x1}</text>` +
    `<text x="2" y="20" font-size="11">${y1.toFixed(2)}</text><text x="2" y="200" font-size="11">${y0.toFixed(2)}</text>`;
}

async function refreshStatus() {
  try {
    const response = await api("/v1/status");
    if (!response.ok) return;
    const s = await response.json();
    context = s.context;
    $("model-name").textContent = `${s.model} · ${s.weights} · ${s.device}`;
    fill($("status-grid"), [
      ["model", s.model, "model"], ["weights / dtype", `${s.weights} / ${s.dtype}`, "weights"], ["device", s.device, "device"],
      ["parameters", s.parameters.toLocaleString("en"), "parameters"], ["context", s.context, "context"],
      ["why these weights", s.path.why, "path-why"], ["decode path", s.path.decode, "path-decode"], ["prefill path", s.path.prefill, "path-prefill"],
      ["decode tokens/s", number(s.tokens_per_s), "tokens_per_s"], ["time to first token", number(s.ttft_ms, 0, " ms"), "ttft_ms"],
      ["prefix-cache hit rate", s.prefix_cache_hit_rate === null ? "–" : `${(100 * s.prefix_cache_hit_rate).toFixed(0)}%`, "hit_rate"],
      ["queue depth", s.queue_depth, "queue_depth"], ["running", s.active, "active"],
      ["generations (recent)", s.generations, "generations"], ["tokens generated", s.completion_tokens_total, "tokens_total"],
      ["drafted / accepted (recent)", `${s.drafted_tokens} / ${s.accepted_tokens}`, "drafts"],
    ]);
    const run = s.finetune;
    $("finetune").hidden = !run;
    if (run) {
      fill($("finetune-grid"), [
        ["state", run.state, "ft_state"], ["step", `${run.step} / ${run.total}`, "ft_step"],
        ["train loss", number(run.loss, 3), "ft_loss"], ["test loss", number(run.test_loss, 3), "ft_test_loss"],
        ["time left", run.state === "done" ? "done" : number(run.eta_s, 0, " s"), "ft_eta"],
      ]);
      drawCurve(run.curve);
    }
  } catch (error) {
    $("model-name").textContent = "server unreachable";
  }
}

setInterval(() => { if (!$("status").hidden) refreshStatus(); }, 2000);
refreshStatus();
renderMirror();
code.focus();
code.setSelectionRange(code.value.length, code.value.length);
