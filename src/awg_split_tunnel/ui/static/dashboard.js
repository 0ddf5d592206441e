// The dashboard page: state arrives as server-sent events once a second; changes are JSON requests that
// carry the CSRF token. Every value from the daemon is written as text, never as HTML.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const HISTORY = 60;            // chart points per tunnel (one a second)
const LOG_KEEP = 500;
const LEVELS = { debug: 10, info: 20, warning: 30, error: 40 };

const charts = new Map();      // tunnel id -> {plot, times, rx, tx, last}
let logLines = [];
let lastState = null;
let rulesState = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function bytes(n) {
  let value = Number(n) || 0;
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (value < 1024 || unit === "GiB") return unit === "B" ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.floor(seconds);
  return s < 120 ? `${s}s ago` : s < 7200 ? `${Math.floor(s / 60)}m ago` : `${Math.floor(s / 3600)}h ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  const s = Math.floor(seconds);
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`;
}

function showError(id, text) {
  const node = document.getElementById(id);
  node.textContent = text || "";
  node.hidden = !text;
}

async function call(method, path, body) {
  const options = { method, headers: { "X-CSRF-Token": CSRF }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

async function act(method, path, body) {
  try {
    const answer = await call(method, path, body);
    showError("action-error", "");
    return answer;
  } catch (error) {
    showError("action-error", error.message);
    return null;
  }
}

// -- tunnels -------------------------------------------------------------------------------------------

function tunnelCard(t) {
  const up = t.state === "up" || t.state === "connecting";
  const button = el("button", {
    text: up ? "Down" : "Up", "data-tunnel": t.id, "data-action": up ? "down" : "up",
    onclick: () => act("POST", `/api/tunnels/${encodeURIComponent(t.id)}/${up ? "down" : "up"}`),
  });
  const facts = el("dl", { class: "facts" });
  const packet = t.type === "amneziawg" || t.type === "wireguard";
  const rows = [
    ["since", `${age(t.state_age)}${t.reason ? ": " + t.reason : ""}`],
    ["handshake", packet ? age(t.handshake_age) : "-"],
    ["rx / tx", `${bytes(t.rx_bytes)} / ${bytes(t.tx_bytes)}`],
    ["flows", String(t.flows ?? 0)],
  ];
  for (const [name, value] of rows) facts.append(el("dt", { text: name }), el("dd", { text: value }));
  const chart = el("div", { class: "chart" });
  const card = el("div", { class: "tunnel-card", id: `tunnel-${t.id}`, "data-state": t.state },
    el("div", { class: "head" },
      el("span", { class: "id", text: t.id }),
      el("span", { class: "type", text: t.type }),
      el("span", { class: `state ${t.state}`, text: t.state }),
      button),
    facts, chart);
  return { card, chart };
}

function updateChart(t, holder) {
  const now = Date.now() / 1000;
  let entry = charts.get(t.id);
  if (!entry) {
    entry = { times: [], rx: [], tx: [], last: null, plot: null };
    charts.set(t.id, entry);
  }
  if (entry.last) {
    const dt = Math.max(now - entry.last.time, 0.001);
    entry.times.push(now);
    entry.rx.push(Math.max(0, (t.rx_bytes - entry.last.rx) / dt));
    entry.tx.push(Math.max(0, (t.tx_bytes - entry.last.tx) / dt));
    if (entry.times.length > HISTORY) { entry.times.shift(); entry.rx.shift(); entry.tx.shift(); }
  }
  entry.last = { time: now, rx: t.rx_bytes || 0, tx: t.tx_bytes || 0 };
  const width = Math.max(holder.clientWidth, 200);
  const data = [entry.times, entry.rx, entry.tx];
  if (!entry.plot || entry.plot.root.parentNode !== holder) {
    entry.plot = new uPlot({
      width, height: 90, legend: { show: true, live: false }, cursor: { show: false },
      scales: { x: { time: true } },
      axes: [{ show: false }, { size: 72, values: (u, ticks) => ticks.map((v) => bytes(v) + "/s"), font: "10px sans-serif" }],
      series: [{}, { label: "rx", stroke: "#2563eb", width: 1.5, value: (u, v) => v == null ? "-" : bytes(v) + "/s" },
               { label: "tx", stroke: "#15803d", width: 1.5, value: (u, v) => v == null ? "-" : bytes(v) + "/s" }],
    }, data, holder);
  } else {
    entry.plot.setData(data);
  }
}

function renderTunnels(tunnels) {
  const box = document.getElementById("tunnels");
  const ids = new Set(tunnels.map((t) => t.id));
  for (const id of [...charts.keys()]) if (!ids.has(id)) charts.delete(id);
  for (const t of tunnels) {
    const { card, chart } = tunnelCard(t);
    const old = document.getElementById(`tunnel-${t.id}`);
    const entry = charts.get(t.id);
    if (old && entry && entry.plot) {
      // keep the chart element (uPlot draws into it); replace the rest of the card
      const oldChart = old.querySelector(".chart");
      card.replaceChild(oldChart, chart);
      old.replaceWith(card);
      updateChart(t, oldChart);
    } else {
      if (old) old.replaceWith(card); else box.append(card);
      updateChart(t, chart);
    }
  }
  for (const node of [...box.children]) if (!ids.has(node.id.slice(7))) node.remove();
  if (!tunnels.length) box.replaceChildren(el("p", { class: "muted", text: "no tunnels configured" }));
}

// -- connections ---------------------------------------------------------------------------------------

function renderConnections(state) {
  const select = document.getElementById("filter-tunnel");
  const wanted = ["direct", "dropped", ...state.tunnels.map((t) => t.id)];
  const have = [...select.options].slice(1).map((o) => o.value);
  if (wanted.join() !== have.join()) {
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "", text: "every route" }),
      ...wanted.map((w) => el("option", { value: w, text: w })));
    select.value = wanted.includes(chosen) ? chosen : "";
  }
  const appFilter = document.getElementById("filter-app").value.trim().toLowerCase();
  const routeFilter = select.value;
  const rows = state.flows.filter((f) =>
    (!appFilter || f.app.toLowerCase().includes(appFilter) || f.path.toLowerCase().includes(appFilter)) &&
    (!routeFilter || f.tunnel === routeFilter || f.route === routeFilter));
  // Flows of one app to one destination that went the same way are one row, with their count.
  const groups = new Map();
  for (const f of rows) {
    const key = [f.app, f.pid, f.proto, f.dst, f.route, f.tunnel, f.reason].join("|");
    const group = groups.get(key);
    if (group) {
      group.count += 1; group.out += f.out; group.in += f.in;
      if (group.bytes_out !== null) { group.bytes_out += f.bytes_out; group.bytes_in += f.bytes_in; }
      group.age = Math.max(group.age ?? 0, f.age ?? 0);  // the group's oldest flow
    } else groups.set(key, { ...f, count: 1 });
  }
  const shown = [...groups.values()].sort((a, b) => a.app.localeCompare(b.app) || String(a.dst).localeCompare(String(b.dst)));
  const body = document.querySelector("#connections tbody");
  body.replaceChildren(...shown.map((f) => el("tr", { "data-app": f.app, "data-route": f.route },
    el("td", { title: f.path, text: f.app }),
    el("td", { text: f.pid ?? "?" }),
    el("td", { text: f.proto }),
    el("td", { text: f.dst }),
    el("td", { class: `route ${f.route}`, text: f.route === "tunnel" ? `tunnel ${f.tunnel}` : f.route }),
    el("td", { text: f.reason }),
    el("td", { class: "num", text: f.count }),
    el("td", { class: "num", text: f.bytes_out === null ? "kernel" : `${bytes(f.bytes_out)} / ${bytes(f.bytes_in)}` }),
    el("td", { class: "num", text: duration(f.age) }))));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 9, class: "muted", text: "no live connections" })));
  document.getElementById("flow-count").textContent = `${state.flows_total} live`;
  const more = document.getElementById("flows-more");
  const hidden = state.flows_total - state.flows.length;
  more.hidden = hidden <= 0;
  more.textContent = hidden > 0 ? `the first ${state.flows.length} flows are listed; ${hidden} more are not` : "";
}

// -- rules ---------------------------------------------------------------------------------------------

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => el("option", { value: v, text: v })));
  if (chosen !== undefined && values.includes(chosen)) select.value = chosen;
}

async function loadRules() {
  let answer;
  try { answer = await call("GET", "/api/rules"); } catch (error) { showError("config-error", error.message); return; }
  rulesState = answer;
  const body = document.querySelector("#rules tbody");
  if (answer.error) {
    showError("config-error", `The config has an error, the rules cannot be edited until it is fixed:\n${answer.error.message}`);
    body.replaceChildren();
    return;
  }
  showError("config-error", "");
  const count = answer.rules.length;
  body.replaceChildren(...answer.rules.map((r) => el("tr", { "data-index": r.index },
    el("td", { text: r.index }),
    el("td", { text: r.process }),
    el("td", { text: r.tunnel }),
    el("td", { text: r.fallback }),
    el("td", { class: "actions" },
      el("button", { text: "↑", title: "move up", disabled: r.index === 0 ? "" : null,
        onclick: () => moveRule(r.index, r.index - 1) }),
      el("button", { text: "↓", title: "move down", onclick: () => moveRule(r.index, r.index + 1) }),
      el("button", { text: "Edit", onclick: () => editRule(r) }),
      el("button", { text: "Remove", onclick: () => removeRule(r.index) })))));
  const last = body.querySelectorAll("tr");
  if (count) last[count - 1].querySelector('button[title="move down"]').disabled = true;
  document.getElementById("rules-default").textContent = `Unmatched processes: ${answer.default}`;
  fillSelect(document.getElementById("rule-tunnel"), answer.targets, document.getElementById("rule-tunnel").value);
  fillSelect(document.getElementById("rule-fallback"), answer.fallbacks, document.getElementById("rule-fallback").value);
}

function resetRuleForm() {
  document.getElementById("rule-index").value = "";
  document.getElementById("rule-process").value = "";
  document.getElementById("rule-submit").textContent = "Add rule";
  document.getElementById("rule-cancel").hidden = true;
}

function editRule(rule) {
  document.getElementById("rule-index").value = rule.index;
  document.getElementById("rule-process").value = rule.process;
  document.getElementById("rule-tunnel").value = rule.tunnel;
  document.getElementById("rule-fallback").value = rule.fallback;
  document.getElementById("rule-submit").textContent = `Save rule #${rule.index}`;
  document.getElementById("rule-cancel").hidden = false;
}

async function moveRule(index, to) {
  if (await act("POST", `/api/rules/${index}/move`, { to })) loadRules();
}

async function removeRule(index) {
  if (await act("DELETE", `/api/rules/${index}`)) loadRules();
}

document.getElementById("rule-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const index = document.getElementById("rule-index").value;
  const rule = {
    process: document.getElementById("rule-process").value,
    tunnel: document.getElementById("rule-tunnel").value,
    fallback: document.getElementById("rule-fallback").value,
  };
  const done = index === "" ? await act("POST", "/api/rules", rule) : await act("PUT", `/api/rules/${index}`, rule);
  if (done) { resetRuleForm(); loadRules(); }
});
document.getElementById("rule-cancel").addEventListener("click", resetRuleForm);

document.getElementById("match-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = document.getElementById("match-result");
  const answer = await act("POST", "/api/match", { process: document.getElementById("match-process").value });
  if (!answer) { out.textContent = ""; return; }
  const rule = answer.rule_index === null ? "no rule matched: the default applies" : `rule #${answer.rule_index} (${answer.rule})`;
  out.textContent = `→ ${answer.tunnel}, fallback ${answer.fallback} · ${rule}`;
});

// -- log -----------------------------------------------------------------------------------------------

function renderLog() {
  const min = LEVELS[document.getElementById("log-level").value];
  const box = document.getElementById("log");
  const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.replaceChildren(...logLines.filter((l) => (LEVELS[l.level] ?? 0) >= min).map((l) =>
    el("div", { class: l.level, text: `${new Date(l.time * 1000).toLocaleTimeString()} ${l.level.toUpperCase().padEnd(7)} ${l.message}` })));
  if (stick) box.scrollTop = box.scrollHeight;
}
document.getElementById("log-level").addEventListener("change", renderLog);

// -- live state ----------------------------------------------------------------------------------------

let configVersion = null;

function render(state) {
  lastState = state;
  if (configVersion !== null && state.config_version !== configVersion) loadRules();
  configVersion = state.config_version;
  renderTunnels(state.tunnels);
  renderConnections(state);
  if (state.config_error) {
    showError("config-error", `The config on disk has an error; the daemon keeps running the last good one:\n${state.config_error.message}`);
  } else if (rulesState && rulesState.error) {
    loadRules();
  } else if (!document.getElementById("config-error").hidden && !state.config_error) {
    showError("config-error", "");
  }
  if (state.logs && state.logs.length) {
    logLines = logLines.concat(state.logs).slice(-LOG_KEEP);
    renderLog();
  }
}

for (const id of ["filter-app", "filter-tunnel"]) {
  document.getElementById(id).addEventListener("input", () => lastState && renderConnections(lastState));
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.addEventListener("state", (event) => {
    live.textContent = "live";
    live.className = "live on";
    render(JSON.parse(event.data));
  });
  source.onerror = () => {
    live.textContent = "daemon not answering";
    live.className = "live off";
  };
}

loadRules();
connect();
