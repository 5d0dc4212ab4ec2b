// The aios console: a framework-free page over the documented API (the same routes the CLI
// uses). The token stays in this tab's sessionStorage and goes only in Authorization headers.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("aios-token") || "";
let me = null;
let stream = null;
const events = [];  // the newest syscall and approval events, newest first

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new Error(error.message || `HTTP ${response.status}`);
  }
  return data;
}

function cell(row, value, cls) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "-" : String(value);
  if (cls) td.className = cls;
  return td;
}

function table(id, header, rows, fill) {
  const t = $(id);
  t.replaceChildren();
  const head = t.createTHead().insertRow();
  for (const name of header) {
    const th = document.createElement("th");
    th.textContent = name;
    head.appendChild(th);
  }
  const body = t.createTBody();
  for (const item of rows) fill(body.insertRow(), item);
}

async function refresh() {
  const [cores, processes] = await Promise.all([
    api("GET", "/api/v1/cores"), api("GET", "/api/v1/processes"),
  ]);
  table("cores", ["core", "kind", "running", "queued", "cached", "parked", "KV cells used",
                  "decode tokens", "pre-emptions", "done", "failed"], cores, (r, c) => {
    cell(r, c.name); cell(r, c.kind);
    cell(r, c.slots ? `${c.active}/${c.slots}` : c.active); cell(r, c.queued);
    cell(r, c.cached); cell(r, c.parked);
    cell(r, c.kv_cells ? `${c.kv_cells_used} / ${c.kv_cells}` : null);
    cell(r, c.decode_tokens); cell(r, c.preemptions); cell(r, c.completed); cell(r, c.failed);
  });
  table("agents", ["process", "agent", "state", "current syscall", "calls", "tokens in",
                   "tokens out", "waited s"], processes, (r, p) => {
    cell(r, p.id); cell(r, p.owner || p.name); cell(r, p.state, `state-${p.state}`);
    cell(r, p.inflight.length ? p.inflight[p.inflight.length - 1] : null);
    cell(r, p.syscalls); cell(r, p.prompt_tokens); cell(r, p.completion_tokens);
    cell(r, p.waited_s.toFixed(2));
  });
  if (me.admin) {
    const waiting = await api("GET", "/api/v1/approvals");
    table("approvals", ["id", "agent", "process", "capability", "reason", ""], waiting, (r, a) => {
      cell(r, a.id); cell(r, a.principal); cell(r, a.process); cell(r, a.capability);
      cell(r, a.reason);
      const td = r.insertCell();
      for (const verdict of ["allow", "deny"]) {
        const button = document.createElement("button");
        button.textContent = verdict === "allow" ? "Allow" : "Deny";
        button.dataset.approval = a.id;
        button.dataset.verdict = verdict;
        button.onclick = () => decide(a.id, verdict);
        td.appendChild(button);
      }
    });
  } else {
    const files = await api("POST", "/api/v1/storage/ls", { path: "" });
    table("files", ["path", "size", "version"], files.result || [], (r, f) => {
      cell(r, f.path); cell(r, f.size); cell(r, f.version);
    });
  }
  const audit = await api("GET", "/api/v1/audit?limit=20");
  table("audit", ["seq", "when", "agent", "process", "call", "resource", "decision", "outcome"],
        audit.reverse(), (r, a) => {
    cell(r, a.seq); cell(r, new Date(a.at * 1000).toLocaleTimeString()); cell(r, a.principal);
    cell(r, a.process); cell(r, `${a.kind}.${a.op}`); cell(r, a.resource); cell(r, a.decision);
    cell(r, a.outcome);
  });
  table("timeline", ["seq", "kind", "state", "agent", "process", "syscall", "what"],
        events, (r, e) => {
    cell(r, e.seq); cell(r, e.data.kind || e.kind); cell(r, e.state, `state-${e.state}`);
    cell(r, e.principal); cell(r, e.process); cell(r, e.syscall);
    cell(r, e.data.capability || e.data.op || e.data.count);
  });
}

async function decide(id, verdict) {
  try {
    await api("POST", `/api/v1/approvals/${encodeURIComponent(id)}/${verdict}`);
  } catch (error) {
    alert(error.message);
  }
  refresh().catch(show);
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function follow() {
  stream = new AbortController();
  const response = await fetch("/api/v1/events", {
    headers: { Authorization: `Bearer ${token}` }, signal: stream.signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").find((line) => line.startsWith("data: "));
      if (!data || frame.startsWith("event: ready")) continue;
      events.unshift(JSON.parse(data.slice(6)));
      events.length = Math.min(events.length, 200);
      soon();
    }
  }
}

let pending = null;
function soon() {  // refresh once shortly after a burst of events
  if (pending === null) {
    pending = setTimeout(() => { pending = null; refresh().catch(show); }, 200);
  }
}

function show(error) {
  $("who").textContent = error.message;
}

async function start() {
  try {
    me = await api("GET", "/api/v1/whoami");
  } catch (error) {
    $("login-error").textContent = error.message;
    sessionStorage.removeItem("aios-token");
    return;
  }
  sessionStorage.setItem("aios-token", token);
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = me.admin ? "admin (every agent)" : `agent ${me.name}`;
  $("approvals-section").hidden = !me.admin;
  $("files-section").hidden = me.admin;
  follow().catch(() => {});
  refresh().catch(show);
  setInterval(() => refresh().catch(show), 5000);  // counters no event announces
}

$("login").onsubmit = (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  start();
};
$("logout").onclick = () => {
  sessionStorage.removeItem("aios-token");
  if (stream) stream.abort();
  location.reload();
};
if (token) start();
