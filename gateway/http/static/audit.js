// The auditor's page: reads GET /v1/decisions, /v1/decisions/{id} and /v1/decisions/verify
// with the API key the auditor typed. Read-only; every logged value is shown as text.
"use strict";

const KEY = "agent-gateway.audit.key";
const $ = (id) => document.getElementById(id);
let nextCursor = null;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path) {
  const key = sessionStorage.getItem(KEY) || "";
  let resp;
  try {
    resp = await fetch(path, { headers: { Authorization: "Bearer " + key }, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "unreachable", "the hub cannot be reached: " + e.message);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  if (!resp.ok) {
    const err = (body && body.error) || {};
    throw new ApiError(resp.status, err.code || "http_error", err.message || resp.statusText);
  }
  return body;
}

function describe(err) {
  if (err instanceof ApiError && err.status) {
    return `Refused (${err.status} ${err.code}): ${err.message}`;
  }
  return err.message || String(err);
}

function show(el, visible) {
  el.hidden = !visible;
}

function setError(el, text) {
  el.textContent = text || "";
  show(el, Boolean(text));
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
}

function add(parent, tag, text, className) {
  const el = document.createElement(tag);
  if (text !== undefined && text !== null) el.textContent = String(text);
  if (className) el.className = className;
  parent.appendChild(el);
  return el;
}

function splitRevision(revision) {
  // "policies=R schemas=R agents=R"; an older record holds the policy revision alone.
  const parts = {};
  for (const token of String(revision || "").split(/\s+/)) {
    const at = token.indexOf("=");
    if (at > 0) parts[token.slice(0, at)] = token.slice(at + 1);
  }
  if (!Object.keys(parts).length && revision) parts.policies = revision;
  return parts;
}

function fillDl(dl, entries) {
  clear(dl);
  for (const [name, value] of entries) {
    add(dl, "dt", name);
    add(dl, "dd", value === undefined || value === null ? "-" : value);
  }
}

function verdictOf(rec) {
  const allow = rec.result && rec.result.allow === true;
  return allow ? "allow" : "deny";
}

function reasonsOf(rec) {
  const reasons = (rec.result && rec.result.reasons) || [];
  return Array.isArray(reasons) ? reasons.map(String) : [String(reasons)];
}

// --- login -----------------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  setError($("login-error"), "");
  sessionStorage.setItem(KEY, key);
  try {
    await api("/v1/decisions?limit=1");
  } catch (err) {
    sessionStorage.removeItem(KEY);
    setError($("login-error"), describe(err));
    return;
  }
  $("key").value = "";
  enter();
}

function logout() {
  sessionStorage.removeItem(KEY);
  show($("main"), false);
  show($("detail"), false);
  show($("logout"), false);
  show($("login"), true);
}

function enter() {
  show($("login"), false);
  show($("main"), true);
  show($("logout"), true);
  verify();
  load(false);
}

function refused(err) {
  // A key revoked (401) or stripped of its role (403) while the page is open.
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
    logout();
    setError($("login-error"), describe(err));
    return true;
  }
  return false;
}

// --- the chain -------------------------------------------------------------------------

async function verify() {
  const chain = $("chain");
  chain.className = "chain pending";
  chain.textContent = "Verifying the chain…";
  clear($("chain-problems"));
  let report;
  try {
    report = await api("/v1/decisions/verify");
  } catch (err) {
    if (refused(err)) return;
    chain.className = "chain tampered";
    chain.textContent = "Could not verify: " + describe(err);
    return;
  }
  if (report.ok) {
    chain.className = "chain ok";
    chain.textContent = `Chain verified: ${report.checked} records, head ${String(report.head).slice(0, 16)}…`;
  } else {
    chain.className = "chain tampered";
    chain.textContent = `Chain TAMPERED: ${report.problems_total} problem(s) in ${report.checked} records`;
    for (const p of report.problems) {
      add($("chain-problems"), "li", `${String(p.kind).toUpperCase()}: ${p.message}`);
    }
  }
  const rev = report.revisions || {};
  fillDl($("revisions"), [
    ["policies in force", rev.policies],
    ["schemas in force", rev.schemas],
    ["agents.yaml in force", rev.registry],
    ["verified at", report.verified_at],
  ]);
}

// --- the list --------------------------------------------------------------------------

function utc(value) {
  // datetime-local has no zone; the page works in UTC, as the log does.
  if (!value) return "";
  const d = new Date(value + "Z");
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

function query(cursor) {
  const params = new URLSearchParams();
  const pairs = [
    ["decision", $("f-decision").value],
    ["kind", $("f-kind").value],
    ["agent", $("f-agent").value.trim()],
    ["subject", $("f-subject").value.trim()],
    ["since", utc($("f-since").value)],
    ["until", utc($("f-until").value)],
  ];
  for (const [name, value] of pairs) if (value) params.set(name, value);
  params.set("limit", "50");
  if (cursor) params.set("cursor", cursor);
  return "/v1/decisions?" + params.toString();
}

async function load(more) {
  setError($("list-error"), "");
  const tbody = $("decisions").querySelector("tbody");
  let page;
  try {
    page = await api(query(more ? nextCursor : null));
  } catch (err) {
    if (refused(err)) return;
    setError($("list-error"), describe(err));
    return;
  }
  if (!more) clear(tbody);
  for (const rec of page.decisions) {
    const tr = add(tbody, "tr");
    tr.dataset.id = rec.decision_id;
    tr.dataset.verdict = verdictOf(rec);
    add(tr, "td", rec.timestamp);
    add(tr, "td", verdictOf(rec), "verdict " + verdictOf(rec));
    add(tr, "td", rec.kind);
    add(tr, "td", rec.subject || "-");
    add(tr, "td", rec.agent || "-");
    add(tr, "td", rec.malformed ? "MALFORMED ROW" : reasonsOf(rec).join("; "));
    tr.addEventListener("click", () => open(rec.decision_id));
  }
  nextCursor = page.next_cursor;
  show($("more"), Boolean(nextCursor));
  show($("empty"), tbody.children.length === 0);
}

// --- one decision ----------------------------------------------------------------------

async function open(id) {
  let rec;
  try {
    rec = await api("/v1/decisions/" + encodeURIComponent(id));
  } catch (err) {
    if (refused(err)) return;
    setError($("list-error"), describe(err));
    return;
  }
  $("d-id").textContent = rec.decision_id;
  const verdict = $("d-verdict");
  verdict.textContent = verdictOf(rec);
  verdict.className = "verdict " + verdictOf(rec);
  $("d-kind").textContent = `${rec.kind} (${rec.path})`;
  $("d-time").textContent = rec.timestamp;
  const reasons = $("d-reasons");
  clear(reasons);
  for (const reason of reasonsOf(rec)) add(reasons, "li", reason);
  const rev = splitRevision(rec.revision);
  fillDl($("d-revision"), [
    ["policies", rev.policies],
    ["schemas", rev.schemas],
    ["agents.yaml", rev.agents],
  ]);
  const masked = (rec.masked || []).join(", ") || "none";
  const erased = (rec.erased || []).join(", ") || "none";
  $("d-masking").textContent = `masked: ${masked}; erased: ${erased}`;
  $("d-input").textContent = JSON.stringify(rec.input, null, 2);
  $("d-result").textContent = JSON.stringify(rec.result, null, 2);
  fillDl($("d-chain"), [
    ["seq", rec.seq],
    ["prev_hash", rec.prev_hash],
    ["hash", rec.hash],
    ["subject", rec.subject],
    ["agent", rec.agent],
    ["task", rec.task_id],
  ]);
  show($("detail"), true);
  $("detail").scrollIntoView();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("verify-button").addEventListener("click", verify);
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    show($("detail"), false);
    load(false);
  });
  $("more").addEventListener("click", () => load(true));
  $("d-close").addEventListener("click", () => show($("detail"), false));
  if (sessionStorage.getItem(KEY)) enter();
  document.body.dataset.ready = "true";
});
