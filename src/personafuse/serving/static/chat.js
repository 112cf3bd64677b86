// PersonaFuse chat page: plain JavaScript, no libraries (the server may have no internet access).
"use strict";

const POLES = ["high_O", "low_O", "high_C", "low_C", "high_E", "low_E", "high_A", "low_A", "high_N", "low_N"];
const TRAIT = { O: "Openness", C: "Conscientiousness", E: "Extraversion", A: "Agreeableness", N: "Neuroticism" };
const label = (p) => `${p.startsWith("high") ? "+" : "−"} ${TRAIT[p.slice(-1)]}`;

const $ = (id) => document.getElementById(id);
const conversation = [];   // {role, content} sent to the server: the router reads all of it
const state = { busy: false, lastPersona: null };
window.personafuse = state; // handy in the browser console (and for the page's tests)

// ---------------------------------------------------------------- persona controls
function buildSliders() {
  const box = $("sliders");
  for (const p of POLES) {
    const row = document.createElement("div");
    row.className = "slider";
    row.innerHTML = `<label for="s_${p}">${label(p)}</label>
      <input type="range" id="s_${p}" data-pole="${p}" min="0" max="100" value="${p === "high_A" || p === "low_N" ? 50 : 0}">
      <output id="o_${p}"></output>`;
    box.appendChild(row);
    const input = row.querySelector("input");
    const show = () => { $(`o_${p}`).textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function syncControls() {
  const m = mode();
  $("sliders").classList.toggle("inactive", !(m === "fixed" || m === "blend"));
  $("blendrow").style.display = m === "blend" ? "flex" : "none";
  $("krow").style.display = m === "random" ? "flex" : "none";
}

function personaRequest() {
  const m = mode();
  if (m === "router") return { mode: "router" };
  if (m === "random") return { mode: "random", k: Number($("k").value) };
  const weights = {};
  for (const p of POLES) weights[p] = Number($(`s_${p}`).value);
  if (m === "fixed") return { mode: "fixed", weights };
  return { mode: "blend", weights, alpha: Number($("alpha").value) / 100 };
}

// ---------------------------------------------------------------- trait display (SVG bars)
const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawTraits(weights, caption) {
  const svg = $("traits");
  svg.replaceChildren();
  const left = 118, width = 160, rowH = 23, max = Math.max(0.25, ...POLES.map((p) => (weights ? weights[p] : 0)));
  POLES.forEach((p, i) => {
    const y = 8 + i * rowH + (i % 2 === 0 && i > 0 ? 0 : 0) + Math.floor(i / 2) * 4;
    const w = weights ? weights[p] : 0;
    svg.appendChild(el("text", { x: 0, y: y + 13 }, label(p)));
    svg.appendChild(el("rect", { x: left, y: y + 2, width, height: 15, fill: "#eef0f4", rx: 3 }));
    svg.appendChild(el("rect", {
      x: left, y: y + 2, width: Math.max(0, (w / max) * width), height: 15, rx: 3,
      fill: p.startsWith("high") ? "#4c6ef5" : "#f08c00", "data-pole": p, "data-weight": w.toFixed(4),
    }));
    svg.appendChild(el("text", { x: left + width + 4, y: y + 13, class: "val" }, weights ? w.toFixed(2) : "–"));
  });
  $("shownfor").textContent = caption || "";
}

function miniBars(weights) {
  const span = document.createElement("span");
  span.className = "mini";
  span.title = POLES.map((p) => `${p} ${weights[p].toFixed(2)}`).join("\n");
  // Scaled to this reply's largest weight, so near-uniform mixtures still show their shape.
  const top = Math.max(...POLES.map((p) => weights[p]), 1e-6);
  for (const p of POLES) {
    const b = document.createElement("span");
    b.className = p.startsWith("low") ? "low" : "";
    b.style.height = `${Math.max(1, Math.round((weights[p] / top) * 16))}px`;
    span.appendChild(b);
  }
  return span;
}

// ---------------------------------------------------------------- conversation
function addMessage(role, text) {
  const hint = document.querySelector("#messages .hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function selectReply(div) {
  document.querySelectorAll(".msg.assistant.selected").forEach((d) => d.classList.remove("selected"));
  div.classList.add("selected");
  drawTraits(div._persona.weights, `(${div._persona.mode}, reply ${div.dataset.turn})`);
}

function showReplyPersona(div, persona) {
  div._persona = persona;
  let meta = div.querySelector(".meta");
  if (!meta) { meta = document.createElement("div"); meta.className = "meta"; div.appendChild(meta); }
  meta.replaceChildren(miniBars(persona.weights), document.createTextNode(persona.mode));
  selectReply(div);
}

async function send(text) {
  $("error").textContent = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "…");
  reply.dataset.turn = String(conversation.filter((m) => m.role === "user").length);
  reply.addEventListener("click", () => reply._persona && selectReply(reply));
  const body = {
    model: "personafuse", messages: conversation, stream: true,
    max_tokens: Number($("maxtokens").value), temperature: Number($("temperature").value),
    persona: personaRequest(),
  };
  const headers = { "Content-Type": "application/json" };
  if ($("apikey").value) headers.Authorization = `Bearer ${$("apikey").value}`;
  let text_ = "";
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!res.ok) {
      let msg = `HTTP ${res.status}`;
      try { msg = (await res.json()).error.message; } catch (_) { /* keep the status */ }
      throw new Error(msg);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const obj = JSON.parse(line.slice(6));
        if (obj.error) throw new Error(obj.error.message);
        if (obj.persona) { state.lastPersona = obj.persona; showReplyPersona(reply, obj.persona); }
        const delta = obj.choices && obj.choices[0] && obj.choices[0].delta.content;
        if (delta) { text_ += delta; reply.querySelector(".text").textContent = text_; }
      }
    }
    if (!text_) reply.querySelector(".text").textContent = "(empty reply)";
    conversation.push({ role: "assistant", content: text_ });
    reply.classList.add("done");
  } catch (err) {
    conversation.pop(); // the failed turn is not part of the conversation
    reply.remove();
    document.querySelectorAll(".msg.user:last-of-type").forEach((d) => d.remove());
    $("error").textContent = err.message;
  }
}

function init() {
  buildSliders();
  drawTraits(null, "");
  syncControls();
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", syncControls));
  $("alpha").addEventListener("input", () => { $("alphaval").textContent = (Number($("alpha").value) / 100).toFixed(2); });
  $("apikey").value = localStorage.getItem("personafuse-key") || "";
  $("apikey").addEventListener("change", () => localStorage.setItem("personafuse-key", $("apikey").value));
  $("composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.busy) return;
    state.busy = true;
    $("send").disabled = true;
    $("input").value = "";
    try { await send(text); } finally { state.busy = false; $("send").disabled = false; $("input").focus(); }
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("clear").addEventListener("click", () => {
    conversation.length = 0;
    $("messages").replaceChildren();
    drawTraits(null, "");
  });
}

init();
