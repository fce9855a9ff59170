// The dashboard's live parts: the event feed (EventSource on /dashboard/stream, which resumes
// by itself with Last-Event-ID) and the charts (uPlot, redrawn from /dashboard/series).
(function () {
  "use strict";
  var root = document.getElementById("dashboard");
  if (!root || !root.dataset.stream) return;

  // --- The feed ---------------------------------------------------------------------------------
  var feed = document.getElementById("feed");
  var status = document.getElementById("feed-status");
  var FEED_MAX = 200;

  function show(event) {
    if (feed.querySelector('li[data-id="' + event.id + '"]')) return;  // replayed: shown already
    var li = document.createElement("li");
    li.className = "new";
    li.dataset.id = event.id;
    var pill = document.createElement("span");
    pill.className = "pill";
    pill.textContent = event.event_type;
    var at = document.createElement("span");
    at.className = "mono muted";
    at.textContent = " " + (event.timestamp || "").slice(11, 19) + " ";
    var content = document.createElement("span");
    content.className = "content";
    content.textContent = (event.memory && event.memory.content) || "";
    li.append(pill, at, content);
    feed.prepend(li);
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  }

  var source = new EventSource(root.dataset.stream);
  source.onopen = function () { status.textContent = "live"; };
  source.onerror = function () { status.textContent = "reconnecting…"; };
  // Events arrive named by their type (the server lists them); two names are the stream's own.
  JSON.parse(document.getElementById("event-types").textContent).forEach(function (name) {
    source.addEventListener(name, function (message) { show(JSON.parse(message.data)); });
  });
  source.addEventListener("overflow", function () { status.textContent = "fell behind; reconnecting…"; });
  source.addEventListener("stream-reset", function () { status.textContent = "some events were trimmed"; });

  // --- The charts -------------------------------------------------------------------------------
  if (typeof uPlot === "undefined") return;
  var chartsStatus = document.getElementById("charts-status");
  var LANE_COLORS = ["#dc2626", "#2563eb", "#9333ea", "#059669"];
  var charts = {};

  function width(id) { return Math.max(document.getElementById(id).clientWidth, 320); }

  function make(id, series) {
    return new uPlot(
      { width: width(id), height: 200, series: [{}].concat(series), scales: { x: { time: true } },
        axes: [{}, { size: 50 }] },
      [[]].concat(series.map(function () { return []; })),
      document.getElementById(id));
  }

  function draw(data) {
    var t = data.t;
    if (!charts.events) {
      charts.events = make("chart-events", [
        { label: "all tenants", stroke: "#94a3b8", width: 1 },
        { label: "this tenant", stroke: "#2563eb", width: 2, fill: "rgba(37,99,235,.08)" }]);
      charts.latency = make("chart-latency", [
        { label: "p50", stroke: "#059669", width: 2, spanGaps: true, points: { size: 3 } },
        { label: "p99", stroke: "#dc2626", width: 2, spanGaps: true, points: { size: 3 } }]);
      var laneNames = Object.keys(data.lanes).sort();
      charts.laneNames = laneNames.length ? laneNames : ["default"];
      charts.lanes = make("chart-lanes", charts.laneNames.map(function (name, i) {
        return { label: name, stroke: LANE_COLORS[i % LANE_COLORS.length], width: 2,
                 spanGaps: true, points: { size: 3 } };
      }));
    }
    charts.events.setData([t, data.events, data.tenant_events]);
    charts.latency.setData([t, data.p50, data.p99]);
    charts.lanes.setData([t].concat(charts.laneNames.map(function (name) {
      return data.lanes[name] || t.map(function () { return null; });
    })));
    chartsStatus.textContent = "updated " + new Date().toLocaleTimeString();
  }

  function poll() {
    fetch(root.dataset.series, { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(draw)
      .catch(function (e) { chartsStatus.textContent = "charts unavailable (" + e.message + ")"; })
      .finally(function () { setTimeout(poll, 2000); });
  }
  poll();
})();
