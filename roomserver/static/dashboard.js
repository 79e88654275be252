/* The live dashboard: one WebSocket (/dashboard/ws) pushes a sample per second; nothing is polled.
 *
 * The first message is a snapshot with the recent history, then one "sample" per tick; both carry the cluster
 * view (every live node), drawn as the nodes table when the server is clustered. When the server has an
 * admin token, the page asks for it, sends it as the first message ({"type":"auth"}) and keeps it only in this
 * tab's sessionStorage. Charts are drawn on a canvas by hand: nothing is loaded from anywhere else.
 */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var samples = [];
  var capacity = 300;
  var interval = 1;
  var retry = 0;
  var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/dashboard/ws";
  var fmt = new Intl.NumberFormat("en", {maximumFractionDigits: 1});

  function setStatus(state, text) {
    var status = $("status");
    status.textContent = text || state;
    status.className = "status " + state;
    status.dataset.state = state;
  }

  function rows(table, entries, format) {
    var body = $(table).tBodies[0];
    body.textContent = "";
    if (!entries.length) {
      var empty = body.insertRow();
      var cell = empty.insertCell();
      cell.textContent = "none";
      cell.className = "muted";
      return;
    }
    entries.forEach(function (entry) {
      var row = body.insertRow();
      row.dataset.key = entry[0];
      row.insertCell().textContent = entry[0];
      var value = row.insertCell();
      value.className = "n";
      value.textContent = format ? format(entry[1]) : String(entry[1]);
    });
  }

  function chart(canvasId, series) {
    var canvas = $(canvasId);
    var ctx = canvas.getContext("2d");
    var w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    var max = 1;
    series.forEach(function (s) { s.values.forEach(function (v) { if (v > max) max = v; }); });
    ctx.strokeStyle = "#e2e6ee"; ctx.fillStyle = "#6b7385"; ctx.font = "12px system-ui"; ctx.lineWidth = 1;
    for (var i = 0; i <= 4; i++) {
      var y = pad / 2 + (h - pad) * i / 4;
      ctx.beginPath(); ctx.moveTo(pad + 20, y); ctx.lineTo(w, y); ctx.stroke();
      ctx.fillText(fmt.format(max * (4 - i) / 4), 0, y + 4);
    }
    series.forEach(function (s) {
      ctx.strokeStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
      s.values.forEach(function (v, index) {
        var x = pad + 20 + (w - pad - 20) * (index + capacity - s.values.length) / Math.max(1, capacity - 1);
        var y = pad / 2 + (h - pad) * (1 - v / max);
        if (index === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    });
  }

  function render() {
    var last = samples[samples.length - 1];
    if (!last) return;
    $("connections").textContent = last.connections;
    $("rooms").textContent = last.rooms;
    $("in-rate").textContent = fmt.format(last.messages_in_per_s);
    $("out-rate").textContent = fmt.format(last.messages_out_per_s);
    // Slow consumers are dropped with 4008; rate-limit hits are the messages refused with "rate_limited"
    // plus the clients closed for flooding (1008).
    $("slow-consumers").textContent = last.drops.slow_consumer || 0;
    $("rate-limit-hits").textContent = (last.errors.rate_limited || 0) + (last.drops.flood || 0);
    $("messages-received").textContent = last.messages_received;
    $("messages-sent").textContent = last.messages_sent;
    $("bytes-received").textContent = last.bytes_received;
    $("bytes-sent").textContent = last.bytes_sent;
    rows("top-members", last.top_rooms_by_members.map(function (r) { return [r.room, r.members]; }));
    rows("top-traffic", last.top_rooms_by_traffic.map(function (r) { return [r.room, r.messages_per_s]; }), fmt.format);
    rows("drops", Object.entries(last.drops).sort());
    rows("errors", Object.entries(last.errors).sort());
    chart("chart-messages", [
      {color: "#2f6fed", values: samples.map(function (s) { return s.messages_in_per_s; })},
      {color: "#1f9d55", values: samples.map(function (s) { return s.messages_out_per_s; })},
    ]);
    chart("chart-connections", [
      {color: "#d97706", values: samples.map(function (s) { return s.connections; })},
      {color: "#8b5cf6", values: samples.map(function (s) { return s.rooms; })},
    ]);
    document.body.dataset.samples = String(samples.length);
  }

  // The cluster view (every live node, pushed with each sample); shown only when the server is clustered.
  function rate(value) { return value === null || value === undefined ? "–" : fmt.format(value); }

  function fill(row, entry) {
    row.querySelector(".connections").textContent = entry.connections;
    row.querySelector(".rooms").textContent = entry.rooms;
    row.querySelector(".in-rate").textContent = rate(entry.messages_in_per_s);
    row.querySelector(".out-rate").textContent = rate(entry.messages_out_per_s);
    row.querySelector(".received").textContent = entry.messages_received;
    row.querySelector(".sent").textContent = entry.messages_sent;
  }

  function renderCluster(cluster) {
    var card = $("nodes-card");
    if (!cluster || !cluster.clustered) { card.hidden = true; return; }
    card.hidden = false;
    var body = $("nodes").tBodies[0];
    body.textContent = "";
    cluster.nodes.forEach(function (entry) {
      var row = body.insertRow();
      row.dataset.node = entry.node;
      row.dataset.status = entry.status;
      if (entry.local) row.className = "local";
      row.insertCell().textContent = entry.node + (entry.local ? " (this node)" : "");
      row.insertCell().textContent = entry.address;
      var status = row.insertCell();
      status.className = "status-cell";
      var badge = document.createElement("span");
      badge.className = "status " + (entry.status === "ok" ? "open" : "closed");
      badge.textContent = entry.status;
      status.appendChild(badge);
      ["connections", "rooms", "in-rate", "out-rate", "received", "sent"].forEach(function (name) {
        row.insertCell().className = "n " + name;
      });
      fill(row, entry);
    });
    var totals = cluster.totals;
    $("cluster-nodes").textContent = totals.nodes;
    var foot = $("cluster-totals");
    foot.dataset.status = cluster.nodes.every(function (n) { return n.status === "ok"; }) ? "ok" : "degraded";
    foot.querySelector(".status-cell").textContent = foot.dataset.status;
    fill(foot, totals);
  }

  function askForToken(message) {
    $("auth").hidden = false;
    $("dash").hidden = true;
    $("auth-error").textContent = message || "";
    $("token").focus();
  }

  function connect() {
    setStatus("connecting", "connecting…");
    var ws = new WebSocket(url);
    var token = sessionStorage.getItem("roomserver-admin-token");
    ws.onopen = function () {
      retry = 0;
      if (token) ws.send(JSON.stringify({type: "auth", token: token}));
    };
    ws.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "auth_required") {
        if (!token) { setStatus("closed", "admin token needed"); askForToken(""); ws.close(); }
        return;
      }
      if (message.type === "snapshot") {
        capacity = message.window; interval = message.interval;
        $("window").textContent = fmt.format(capacity * interval / 60);
        $("node").textContent = message.node;
        samples = message.history;
        $("auth").hidden = true; $("dash").hidden = false;
        setStatus("open", "live");
        render();
        renderCluster(message.cluster);
      } else if (message.type === "sample") {
        samples.push(message.sample);
        if (samples.length > capacity) samples.shift();
        render();
        renderCluster(message.cluster);
      }
    };
    ws.onclose = function (event) {
      if ($("auth").hidden === false && !sessionStorage.getItem("roomserver-admin-token")) return;
      if (event.code === 4501) {
        sessionStorage.removeItem("roomserver-admin-token");
        setStatus("closed", "admin token needed");
        askForToken(token ? "That token was not accepted." : "");
        return;
      }
      if (event.code === 1008) { setStatus("closed", "admin token needed"); askForToken(""); return; }
      var delay = Math.min(10000, 500 * Math.pow(2, retry++)) * (0.5 + Math.random() / 2);
      setStatus("reconnecting", "reconnecting…");
      setTimeout(connect, delay);
    };
  }

  $("auth-form").addEventListener("submit", function (event) {
    event.preventDefault();
    sessionStorage.setItem("roomserver-admin-token", $("token").value);
    $("token").value = "";
    connect();
  });

  connect();
})();
