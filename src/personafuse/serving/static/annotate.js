// Pairwise comparison page: plain JavaScript, no libraries.
"use strict";
const $ = (id) => document.getElementById(id);
let annotator = "";
let current = null;
let shownAt = 0;

function show(data) {
  const p = data.progress;
  $("progress").textContent = `${annotator}: ${p.done_by_you} answered · ${p.judgements} of ${p.wanted} judgements collected`;
  current = data.pair;
  $("login").hidden = true;
  $("task").hidden = !current;
  $("finished").hidden = !!current;
  if (!current) return;
  $("prompt").textContent = current.prompt;
  $("resp_a").textContent = current.response_a;
  $("resp_b").textContent = current.response_b;
  $("judge").reset();
  $("judge").dataset.pair = String(current.pair_id);
  shownAt = performance.now();
  window.scrollTo(0, 0);
}

async function call(url, options) {
  const res = await fetch(url, options);
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
  return body;
}

$("loginform").addEventListener("submit", async (e) => {
  e.preventDefault();
  annotator = $("annotator").value.trim();
  localStorage.setItem("pf-annotator", annotator);
  try { show(await call(`/api/next?annotator=${encodeURIComponent(annotator)}`)); }
  catch (err) { alert(err.message); }
});

$("judge").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData($("judge"));
  const body = {
    annotator, pair_id: current.pair_id,
    preferred: form.get("preferred"), confidence: Number(form.get("confidence")),
    usefulness: form.get("usefulness"), social_presence: form.get("social_presence"),
    seconds: Math.round((performance.now() - shownAt) / 100) / 10,
  };
  $("submit").disabled = true;
  $("error").textContent = "";
  try {
    show(await call("/api/judgements", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }));
  } catch (err) {
    $("error").textContent = err.message;
  } finally {
    $("submit").disabled = false;
  }
});

$("annotator").value = localStorage.getItem("pf-annotator") || "";
