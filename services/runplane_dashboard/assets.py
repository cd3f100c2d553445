"""The dashboard's stylesheet and script, served from ``/assets/`` (no CDN, nothing external).

The script is progressive: every page works without it (reload to see changes). With it, a
list of runs follows the runs that may still change over the dashboard's SSE relay of the
realtime feeds (and a first page shows new runs as they come); a run's page reloads its live
part when the run changes, and every two seconds while it runs, for log lines, waits and child
runs, which do not change the run.
"""

CSS = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --bg: #ffffff; --accent: #0b5cad;
  --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --run: #0b5cad; --wait: #8250df; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
a { color: var(--accent); }
header.top { display: flex; align-items: center; gap: 1.5rem; padding: .6rem 1.2rem;
  border-bottom: 1px solid var(--line); background: #f6f8fa; flex-wrap: wrap; }
header.top .brand { font-weight: 700; text-decoration: none; color: var(--fg); }
header.top nav ul { list-style: none; display: flex; gap: 1rem; margin: 0; padding: 0; }
header.top nav a[aria-current="page"] { font-weight: 700; text-decoration: none; color: var(--fg); }
header.top .env { margin: 0 0 0 auto; color: var(--muted); }
main { padding: 1rem 1.2rem 3rem; max-width: 1400px; }
h1 { font-size: 1.4rem; margin: .4rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .6rem; }
h3 { font-size: .95rem; margin: .4rem 0; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0 1rem; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; color: var(--muted); }
th, td { border-bottom: 1px solid var(--line); padding: .35rem .5rem; text-align: left;
  vertical-align: top; }
thead th { background: #f6f8fa; font-weight: 600; }
td.empty { color: var(--muted); font-style: italic; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: 1rem; font-size: .8rem;
  font-weight: 600; background: #eaeef2; }
.status-completed { background: #dafbe1; color: var(--ok); }
.status-failed, .status-crashed, .status-system_failure, .status-timed_out, .status-expired {
  background: #ffebe9; color: var(--bad); }
.status-canceled { background: #eaeef2; color: var(--muted); }
.status-executing, .status-dequeued { background: #ddf4ff; color: var(--run); }
.status-waiting { background: #fbefff; color: var(--wait); }
.status-queued, .status-delayed, .status-pending_version { background: #fff8c5;
  color: var(--warn); }
.tag { display: inline-block; border: 1px solid var(--line); border-radius: .3rem; padding: 0 .3rem;
  margin-right: .2rem; font-size: .8rem; }
form.inline { display: inline-flex; gap: .3rem; align-items: center; margin: 0 .3rem .2rem 0; }
form.filters { display: flex; flex-wrap: wrap; gap: .6rem; align-items: flex-end;
  margin-bottom: .8rem; }
.field { display: flex; flex-direction: column; gap: .15rem; }
label { font-size: .85rem; color: var(--muted); }
input, select, textarea, button { font: inherit; padding: .25rem .45rem;
  border: 1px solid var(--line); border-radius: .3rem; }
button { background: #f6f8fa; cursor: pointer; }
button:hover { background: #eaeef2; }
button.danger { color: var(--bad); border-color: #ffcecb; }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
.notice { padding: .5rem .7rem; border-radius: .3rem; }
.notice.error { background: #ffebe9; color: var(--bad); }
.notice.info { background: #ddf4ff; }
dl.details { display: grid; grid-template-columns: repeat(3, max-content minmax(8rem, 1fr));
  gap: .2rem 1rem; margin: .8rem 0; }
@media (max-width: 900px) { dl.details { grid-template-columns: max-content 1fr; } }
dl.details dt { color: var(--muted); }
dl.details dd { margin: 0; }
.actions { display: flex; flex-wrap: wrap; gap: .4rem; margin: .4rem 0; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: .3rem; padding: .5rem;
  overflow: auto; max-height: 24rem; margin: 0; }
pre.stack { color: var(--bad); }
.io { display: grid; grid-template-columns: repeat(auto-fit, minmax(16rem, 1fr)); gap: .8rem; }
.login { max-width: 28rem; margin: 4rem auto; }
.login form { display: flex; flex-direction: column; gap: .5rem; }
.pager { display: flex; gap: 1rem; }
#waterfall th[scope="row"] { white-space: nowrap; font-weight: 500; }
#waterfall td.bar-cell { width: 60%; }
.track { position: relative; height: 1.2rem; background: #f6f8fa; border-radius: .2rem; }
.bar { position: absolute; top: .2rem; height: .8rem; border-radius: .2rem; min-width: 2px; }
.bar.run { background: #afb8c1; }
.bar.queued, .bar.delayed { background: repeating-linear-gradient(45deg, #d4a72c, #d4a72c 4px,
  #eac54f 4px, #eac54f 8px); }
.bar.attempt { background: var(--run); }
.bar.wait { background: var(--wait); }
.bar.child { background: var(--ok); }
.bar.running { opacity: .7; }
.log-mark { position: absolute; top: 0; width: 2px; height: 1.2rem; background: #1b1f24; }
.log-mark.level-error, .log-mark.level-warn, .log-mark.level-warning { background: var(--bad); }
tr.log.level-error td, tr.log.level-warn td { color: var(--bad); }
.none { color: var(--muted); }
textarea { width: 100%; font-family: ui-monospace, monospace; }
form.complete { display: flex; flex-direction: column; gap: .2rem; min-width: 14rem; }
"""

JS = r"""
"use strict";
(function () {
  var FINAL = ["COMPLETED", "CANCELED", "FAILED", "CRASHED", "SYSTEM_FAILURE", "EXPIRED",
    "TIMED_OUT"];

  function statusName(value) {
    return String(value || "").replace(/^RUN_STATUS_/, "");
  }

  function duration(ms) {
    if (ms < 1000) { return Math.round(ms) + " ms"; }
    var s = ms / 1000;
    if (s < 120) { return s.toFixed(2) + " s"; }
    return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  }

  // Follows a relayed feed; a server error event (with data) or "end" closes it, a lost
  // connection is retried by the EventSource itself.
  function follow(url, onRun, onEnd) {
    var source = new EventSource(url);
    source.addEventListener("run", function (event) {
      var run;
      try { run = JSON.parse(event.data); } catch (e) { return; }
      onRun(run);
    });
    source.addEventListener("end", function () {
      source.close();
      if (onEnd) { onEnd(); }
    });
    source.addEventListener("error", function (event) {
      if (event.data) { source.close(); }
    });
    return source;
  }

  function badge(status) {
    var span = document.createElement("span");
    span.className = "badge status-" + status.toLowerCase();
    span.textContent = status;
    return span;
  }

  function updateRow(table, run) {
    var rows = table.querySelectorAll("tr[data-run-id]");
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      if (row.dataset.runId !== run.id) { continue; }
      var status = statusName(run.status);
      var cell = row.querySelector(".status");
      if (cell) {
        cell.dataset.status = status;
        cell.replaceChildren(badge(status));
      }
      var attempts = row.querySelector(".attempts");
      if (attempts) { attempts.textContent = String(run.attempt_count || 0); }
      var took = row.querySelector(".duration");
      if (took && run.duration_ms) { took.textContent = duration(Number(run.duration_ms)); }
      row.dataset.final = FINAL.indexOf(status) >= 0 ? "true" : "false";
    }
  }

  // A list of runs: the runs on it follow their feeds; on a first page, a new run fetches the
  // table again (with the new run in it) and follows that table's runs instead.
  function followList(table) {
    var source = null;
    function start(current) {
      source = follow(current.dataset.live, function (run) { updateRow(current, run); });
      source.addEventListener("new", function () {
        source.close();
        fetch("/runs/table" + window.location.search,
              { credentials: "same-origin", headers: { Accept: "text/html" } })
          .then(function (response) {
            if (response.status === 401) { window.location.reload(); return null; }
            return response.ok ? response.text() : null;
          })
          .then(function (text) {
            if (!text) { return; }
            var holder = document.createElement("div");
            holder.innerHTML = text;
            var fresh = holder.querySelector("#runs");
            if (!fresh) { return; }
            current.replaceWith(fresh);
            if (fresh.dataset.live) { start(fresh); }
          })
          .catch(function () { start(current); });
      });
    }
    start(table);
  }

  function followRun(live) {
    var busy = false, again = false, done = false, source = null, timer = null;
    function finish() {
      done = true;
      if (timer) { clearInterval(timer); }
      if (source) { source.close(); }
      live.dataset.final = "true";
    }
    function editing() {
      var active = document.activeElement;
      return active && live.contains(active) && /INPUT|TEXTAREA|SELECT/.test(active.tagName);
    }
    function refresh() {
      if (busy) { again = true; return; }
      if (editing()) { return; }
      busy = true;
      fetch(live.dataset.fragment, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (response.status === 401) { window.location.reload(); return null; }
          if (!response.ok) { return null; }
          var final = response.headers.get("X-Run-Final") === "true";
          return response.text().then(function (text) { return { text: text, final: final }; });
        })
        .then(function (got) {
          if (!got) { return; }
          live.innerHTML = got.text;
          if (got.final) { finish(); }
        })
        .catch(function () { /* the next event or tick tries again */ })
        .then(function () {
          busy = false;
          if (again && !done) { again = false; refresh(); }
        });
    }
    source = follow(live.dataset.live, function (run) {
      var status = statusName(run.status);
      var shown = document.getElementById("run-status");
      if (shown) { shown.replaceChildren(badge(status)); }
      refresh();
    }, function () { refresh(); });
    timer = setInterval(function () { if (!done) { refresh(); } }, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.getElementById("runs");
    if (table && table.dataset.live) { followList(table); }
    var live = document.getElementById("run-live");
    if (live && live.dataset.live) { followRun(live); }
  });
})();
"""
