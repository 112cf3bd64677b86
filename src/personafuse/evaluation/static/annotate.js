// Pairwise comparison page: plain JavaScript, no libraries.
"use strict";
const $ = (id) => document.getElementById(id);
let token = "";
let current = null;
let shownAt = 0;

function show(data) {
  const p = data.progress;
  $("progress").textContent = `${data.participant}: ${p.done_by_you} answered · ${p.judgements} of ${p.wanted} judgements collected`;
  current = data.pair;
  $("login").hidden = true;
  $("signout").hidden = false;
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

function signOut(message) {
  token = "";
  localStorage.removeItem("pf-token");
  current = null;
  for (const id of ["task", "finished", "signout"]) $(id).hidden = true;
  $("login").hidden = false;
  $("progress").textContent = "";
  $("loginerror").textContent = message || "";
}

// The token travels in the Authorization header, never in a URL or a cookie, so another site
// cannot act for the participant.
async function call(url, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token}` };
  const res = await fetch(url, { ...options, headers });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) { signOut(body.error ? body.error.message : "please sign in again"); throw new Error("signed out"); }
  if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
  return body;
}

$("loginform").addEventListener("submit", async (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  $("loginerror").textContent = "";
  try {
    show(await call("/api/next"));
    localStorage.setItem("pf-token", token);
  } catch (err) {
    if (err.message !== "signed out") $("loginerror").textContent = err.message;
  }
});

$("judge").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData($("judge"));
  const body = {
    pair_id: current.pair_id,
    preferred: form.get("preferred"), confidence: Number(form.get("confidence")),
    usefulness: form.get("usefulness"), social_presence: form.get("social_presence"),
    seconds: Math.round((performance.now() - shownAt) / 100) / 10,
  };
  $("submit").disabled = true;
  $("error").textContent = "";
  try {
    show(await call("/api/judgements", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }));
  } catch (err) {
    if (err.message !== "signed out") $("error").textContent = err.message;
  } finally {
    $("submit").disabled = false;
  }
});

$("signout").addEventListener("click", () => signOut(""));

// A sign-in link may carry the token after '#' (never sent to the server in the URL).
const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromLink) history.replaceState(null, "", location.pathname);
$("token").value = fromLink || localStorage.getItem("pf-token") || "";
