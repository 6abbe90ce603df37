// The chat page: talks to this server's /v1 API, streams answers, keeps the conversation in the page.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop"), picker = $("model");
let messages = [];       // the conversation sent with each request
let controller = null;   // aborts the answer being streamed
let conversation = 0;    // counts "New": an answer stopped by it does not join the next conversation
let key = localStorage.getItem("jishi-key") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(cls, text) {
  $("hint").hidden = true;
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.appendChild(span);
}

function needKey() {
  $("keyrow").hidden = false;
  $("key").focus();
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) return needKey();
  const body = await r.json();
  picker.textContent = "";
  for (const m of body.data) {
    const opt = document.createElement("option");
    const colon = m.id.indexOf(":");
    opt.value = m.id;
    opt.textContent = colon < 0 ? "general" : m.id.slice(colon + 1);
    picker.appendChild(opt);
  }
  $("title").textContent = body.data.length ? body.data[0].id : "jishi";
  picker.value = localStorage.getItem("jishi-model") || picker.value;
  if (!picker.value && picker.options.length) picker.selectedIndex = 0;
}

function busy(on) {
  send.hidden = on;
  stop.hidden = !on;
  input.disabled = false;
}

// Reads server-sent events: calls onData with each parsed "data:" object until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function ask(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant busy", "");
  busy(true);
  controller = new AbortController();
  const mine = conversation;
  let answer = "";
  try {
    for (;;) {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        body: JSON.stringify({ model: picker.value, messages, stream: true }),
      });
      if (r.ok) {
        await readEvents(r, (chunk) => {
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices.length ? chunk.choices[0].delta : null;
          if (delta && delta.content) {
            answer += delta.content;
            out.textContent = answer;
            log.scrollTop = log.scrollHeight;
          }
          if (chunk.choices.length && chunk.choices[0].finish_reason === "length") note(out, "(cut at the length limit)");
        });
        break;
      }
      const err = (await r.json().catch(() => ({}))).error || { message: r.statusText };
      if (r.status === 401) { needKey(); throw new Error(err.message); }
      // Too long for the model's memory: forget the oldest exchange and try again.
      if (err.code === "context_length_exceeded" && messages.length > 1) {
        messages.splice(0, messages[0].role === "user" && messages.length > 1 ? 2 : 1);
        continue;
      }
      if (r.status === 429) {
        const wait = Number(r.headers.get("Retry-After") || 2);
        out.textContent = "The server is busy; trying again in " + wait + " s…";
        await new Promise((ok) => setTimeout(ok, wait * 1000));
        out.textContent = "";
        continue;
      }
      throw new Error(err.message);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      note(out, "(stopped)");
    } else {
      out.classList.add("error");
      out.textContent = answer;
      note(out, e.message);
    }
  } finally {
    out.classList.remove("busy");
    if (mine === conversation) messages.push({ role: "assistant", content: answer });
    controller = null;
    busy(false);
    input.focus();
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  ask(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
stop.addEventListener("click", () => controller && controller.abort());
$("new").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation += 1;
  messages = [];
  log.querySelectorAll(".msg").forEach((m) => m.remove());
  $("hint").hidden = false;
  input.focus();
});
picker.addEventListener("change", () => localStorage.setItem("jishi-model", picker.value));
$("savekey").addEventListener("click", () => {
  key = $("key").value.trim();
  localStorage.setItem("jishi-key", key);
  $("keyrow").hidden = true;
  loadModels();
});

loadModels().catch((e) => bubble("error", "Cannot reach the server: " + e.message));
