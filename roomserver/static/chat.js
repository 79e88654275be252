/* The demo chat page: a name, rooms, messages, who is present, and the connection's state.
 *
 * Everything goes through roomserver.js. The wire has no display names unless the server has presence with
 * metadata, so the page sends "name: text" as the chat text and shows the part before ": " as the sender.
 * Features the server may not have (presence, history) are asked for once and their absence is shown plainly.
 */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + (document.body.dataset.wsPath || "/ws");
  var client = null;
  var myName = "";
  var current = null;               // the room on screen
  var rooms = {};                   // room -> {messages: [], members: Map(key -> {label, connections}), presence, unread}
  var features = {presence: null, history: null};

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function parseText(message) {
    var match = /^([^:\n]{1,32}): ([\s\S]*)$/.exec(message.text || "");
    return match ? {name: match[1], text: match[2]} : {name: (message.from || "?").slice(0, 8), text: message.text};
  }

  function setStatus(state, detail) {
    var label = {
      idle: "not connected", connecting: "connecting…", open: "connected", closed: "disconnected",
      reconnecting: "reconnecting" + (detail && detail.attempt ? " (attempt " + detail.attempt + ")" : "") + "…",
    }[state] || state;
    if (state === "open" && detail && detail.resumed) label = "reconnected";
    var status = $("status");
    status.textContent = label;
    status.className = "status " + state;
    status.dataset.state = state;
  }

  function roomState(name) {
    if (!rooms[name]) rooms[name] = {messages: [], members: new Map(), presence: false, unread: 0, seen: new Set()};
    return rooms[name];
  }

  function addMessage(name, entry) {
    var state = roomState(name);
    if (entry.seq !== undefined) {
      if (state.seen.has(entry.seq)) return;
      state.seen.add(entry.seq);
    }
    state.messages.push(entry);
    if (state.messages.length > 500) state.messages.shift();
    if (name === current) renderMessages(); else { state.unread += 1; renderRooms(); }
  }

  function system(name, text) {
    addMessage(name, {system: true, text: text});
  }

  function renderRooms() {
    var list = $("rooms");
    list.textContent = "";
    Object.keys(rooms).sort().forEach(function (name) {
      var item = el("li", name === current ? "active" : "", name);
      item.dataset.room = name;
      if (rooms[name].unread) item.appendChild(el("span", "badge", String(rooms[name].unread)));
      item.onclick = function () { show(name); };
      list.appendChild(item);
    });
  }

  function renderMembers() {
    var list = $("members");
    list.textContent = "";
    if (!current) return;
    var state = rooms[current];
    var members = Array.from(state.members.values()).sort(function (a, b) { return a.label < b.label ? -1 : 1; });
    members.forEach(function (info) {
      var item = el("li", "member", info.label + (info.label === myName ? " (you)" : ""));
      if (info.connections > 1) item.appendChild(el("span", "badge", info.connections + " tabs"));
      list.appendChild(item);
    });
    if (!state.presence) list.appendChild(el("li", "muted", "recently active (no presence on this server)"));
  }

  function renderMessages() {
    var list = $("messages");
    list.textContent = "";
    if (!current) return;
    rooms[current].messages.forEach(function (entry) {
      var item;
      if (entry.system) {
        item = el("li", "system", entry.text);
      } else {
        item = el("li", entry.name === myName ? "mine" : "");
        item.appendChild(el("span", "who", entry.name));
        item.appendChild(el("span", "text", entry.text));
        if (entry.seq !== undefined) item.appendChild(el("span", "seq", "#" + entry.seq));
      }
      list.appendChild(item);
    });
    list.scrollTop = list.scrollHeight;
  }

  function show(name) {
    current = name;
    roomState(name).unread = 0;
    $("room-title").textContent = "# " + name;
    renderRooms(); renderMembers(); renderMessages();
    $("text").focus();
  }

  function onChat(message) {
    var parsed = parseText(message);
    var state = roomState(message.room);
    if (!state.presence && parsed.name) {
      state.members.set(parsed.name, {label: parsed.name, connections: 1});
      if (message.room === current) renderMembers();
    }
    addMessage(message.room, {name: parsed.name, text: parsed.text, seq: message.seq, from: message.from});
  }

  // Presence members are keyed by user (a user with several tabs is one member); the label is the name the
  // user gave in its join's meta, else the start of its id.
  function memberOf(m) {
    return {label: String((m.meta && m.meta.name) || String(m.user || "?").slice(0, 8)), connections: m.connections || 1};
  }

  function applyMembers(name, members) {
    var state = roomState(name);
    state.presence = true;
    state.members = new Map();
    (members || []).forEach(function (m) { state.members.set(String(m.user), memberOf(m)); });
    if (name === current) renderMembers();
  }

  function joinRoom(name) {
    var state = roomState(name);
    renderRooms();
    var options = features.presence === false ? {} : {presence: true, meta: {name: myName}};
    return client.join(name, options).then(function (reply) {
      if (reply.members) applyMembers(name, reply.members);
      else {
        features.presence = false;
        state.members.set(myName, {label: myName, connections: 1});
      }
      system(name, "joined " + name + " (" + reply.size + " connected)");
      if (features.history === false) return;
      return client.history(name, {limit: 50}).then(function (history) {
        features.history = true;
        var missed = history.messages || [];
        if (missed.length) system(name, "— " + missed.length + " earlier message" + (missed.length > 1 ? "s" : "") + " —");
        missed.forEach(onChat);
      }, function () { features.history = false; });
    }).catch(function (error) {
      system(name, "could not join " + name + ": " + error.message);
    });
  }

  function start(name, firstRoom, token) {
    myName = name;
    client = new RoomClient(wsUrl, {token: token || null});
    window.roomClient = client;   // for the curious (and the browser tests)
    client.on("state", function (state, detail) {
      setStatus(state, detail);
      if (state === "reconnecting" && current) system(current, "connection lost, reconnecting…");
    });
    client.on("chat", onChat);
    client.on("presence", function (event) {
      var state = roomState(event.room);
      if (event.members) { applyMembers(event.room, event.members); return; }
      if (event.event === "join") state.members.set(String(event.user), memberOf(event));
      if (event.event === "leave") state.members.delete(String(event.user));
      if (event.room === current) renderMembers();
    });
    client.on("resumed", function (event) {
      // Not recovered: the server may have started its sequence numbers again, so forget the ones seen.
      if (!event.recovered) roomState(event.room).seen = new Set();
      system(event.room, event.recovered ? "resumed: nothing was lost" : "rejoined: messages sent while offline may be missing");
      if (roomState(event.room).presence) {
        client.presence(event.room).then(function (reply) { applyMembers(event.room, reply.members); }, function () {});
      }
    });
    client.on("message", function (message) {
      if (message.type === "notice" && message.room) system(message.room, "notice: " + message.text);
    });
    client.on("error", function (error) {
      if (current) system(current, "error: " + (error.message || error.code));
    });
    $("login").hidden = true;
    $("sidebar").hidden = false;
    $("conversation").hidden = false;
    client.connect().then(function () {
      show(firstRoom);
      return joinRoom(firstRoom);
    }, function (error) {
      setStatus("closed", {});
      $("status").textContent = "could not connect: " + error.message;
    });
  }

  $("login-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var token = $("token").value.trim();
    $("token").value = "";
    start($("name").value.trim().replace(/:/g, "") || "anonymous", $("first-room").value.trim(), token);
  });

  $("join-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var name = $("join-room").value.trim();
    $("join-room").value = "";
    if (!name) return;
    show(name);
    if (!client.rooms[name]) joinRoom(name);
  });

  $("send-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var input = $("text");
    var text = input.value;
    if (!text || !current) return;
    input.value = "";
    client.send(current, myName + ": " + text).catch(function (error) {
      system(current, "not sent (" + error.code + "): " + text);
    });
  });
})();
