/* roomserver.js: the browser client of roomserver (docs/clients.md). No dependencies, no build step.
 *
 *   const client = new RoomClient("ws://localhost:8080/ws");
 *   client.on("chat", (m) => console.log(m.room, m.from, m.text, m.seq));
 *   await client.connect();
 *   await client.join("lobby");
 *   const ack = await client.send("lobby", "hello");   // resolves with {seq}
 *
 * Requests carry an "id"; the promise settles with the reply carrying the same id (or rejects with the error).
 * The connection comes back by itself after a drop, with exponential backoff and full jitter; on the way back
 * it resumes: with a server that offers sessions (its welcome carries "session") it sends
 * {"type":"resume","session":...,"rooms":{room: last_seq}} and the server replays what was missed; with one that
 * does not, it joins its rooms again with "since" (the last seq) and, if the server does not replay the gap
 * itself, asks its history for what came after the last seq, page after page, holding the room's live chats
 * until the gap is filled. A room the server cannot take back for now ("unavailable": its gap could not be
 * read) is joined again the same way (or its history read again) after a backoff, a few times at most.
 * Chat events are delivered once each, in seq order: a seq already seen in a room is not delivered again.
 * A server that shuts down first sends {"type":"reconnect","after_ms":N}: the client then holds new chats (and
 * those the server refuses with "unavailable") for the next connection, and reconnects N ms after the close
 * instead of after its backoff delay, so a drained node's clients come back spread over time.
 */
(function (global) {
  "use strict";

  var DEFAULTS = {
    reconnect: true,         // come back after a drop
    minDelay: 250,           // ms, first retry delay (before jitter)
    maxDelay: 10000,         // ms, the delay never grows beyond this
    factor: 2,               // growth per failed attempt
    requestTimeout: 10000,   // ms before a request's promise rejects with "timeout"
    token: null,             // a JWT (or a function returning one, or a promise of one) for servers with auth
    WebSocket: null,         // a WebSocket constructor (defaults to the global one)
    random: Math.random,     // for the jitter; injectable for tests
    rejoinAttempts: 5,       // joins again of a room the server could not take back for now ("unavailable")
  };

  // Close codes after which reconnecting is pointless (terminal: 4500-4999, policy violation, too big).
  function isTerminal(code) {
    return (code >= 4500 && code <= 4999) || code === 1008 || code === 1009 || code === 1002 || code === 1003;
  }

  // Errors that say a room of a join or resume was not (re)joined (they carry its name in "room").
  var NOT_JOINED = {room_full: true, too_many_rooms: true, forbidden: true};

  function RoomClientError(code, message, reply) {
    var error = new Error(message || code);
    error.name = "RoomClientError";
    error.code = code;
    error.reply = reply || null;
    return error;
  }

  /** The delay before retry number `attempt` (0-based): random between minDelay/2 and an exponentially
   *  growing cap (the same formula as roomserver/core/backoff.py). */
  function backoffDelay(attempt, options, random) {
    var cap = Math.min(options.maxDelay, options.minDelay * Math.pow(options.factor, Math.min(attempt, 64)));
    return Math.round(options.minDelay / 2 + random() * (cap - options.minDelay / 2));
  }

  function RoomClient(url, options) {
    this.url = url;
    this.options = Object.assign({}, DEFAULTS, options || {});
    this.state = "idle";          // idle | connecting | open | reconnecting | closed
    this.id = null;               // our client id (from welcome)
    this.session = null;          // resume token (from welcome, when the server offers it)
    this.rooms = {};              // room -> {lastSeq, joinOptions, catchUp, leaving}
    this._handlers = {};
    this._pending = {};           // request id -> {resolve, reject, timer, kind, room}
    this._echoQueue = {};         // room -> [request ids of chats awaiting their echo]
    this._acksSeen = false;       // the server answers chats with {"type":"ack"}
    this._outbox = [];            // chats in flight when the connection dropped: sent again after the resume
    this._nextId = 1;
    this._attempt = 0;
    this._ws = null;
    this._retryTimer = null;
    this._connectWaiters = [];
    this._resumeId = null;        // the id of this connection's resume request (its errors name a room each)
    this._rejoinTimers = {};      // room -> timer of its next join, after the server answered "unavailable"
    this._draining = false;       // the server sent a reconnect hint: this connection is about to close
    this._hintedDelay = null;     // ms: when to reconnect after the close (from the hint)
    this._closes = 0;             // close() calls: one from an event listener ends what the client was doing
  }

  RoomClient.backoffDelay = backoffDelay;

  /** A random idempotency key for a chat (the server acknowledges a retry of it instead of sending it twice). */
  function randomId() {
    var bytes = new Uint8Array(12);
    if (global.crypto && global.crypto.getRandomValues) global.crypto.getRandomValues(bytes);
    else for (var i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  RoomClient.prototype.on = function (event, handler) {
    (this._handlers[event] = this._handlers[event] || []).push(handler);
    return this;
  };

  RoomClient.prototype.off = function (event, handler) {
    var list = this._handlers[event] || [];
    var index = list.indexOf(handler);
    if (index >= 0) list.splice(index, 1);
    return this;
  };

  RoomClient.prototype._emit = function (event) {
    var args = Array.prototype.slice.call(arguments, 1);
    (this._handlers[event] || []).slice().forEach(function (handler) {
      try { handler.apply(null, args); } catch (e) { setTimeout(function () { throw e; }); }
    });
  };

  RoomClient.prototype._setState = function (state, detail) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state, detail || {});
  };

  /** Open the connection; resolves once the server's welcome arrived. */
  RoomClient.prototype.connect = function () {
    var self = this;
    if (this.state === "open") return Promise.resolve(this);
    var promise = new Promise(function (resolve, reject) { self._connectWaiters.push({resolve: resolve, reject: reject}); });
    if (this.state === "idle" || this.state === "closed") {
      this._closedByUser = false;
      this._open();
    }
    return promise;
  };

  RoomClient.prototype._open = function () {
    var self = this;
    var WS = this.options.WebSocket || global.WebSocket;
    var closes = this._closes;
    this._setState(this._everOpened ? "reconnecting" : "connecting", {attempt: this._attempt});
    if (this._closes !== closes) return;  // a state listener closed the client: no socket
    var ws;
    try {
      ws = new WS(this.url);
    } catch (e) {
      this._scheduleRetry(null);
      return;
    }
    this._ws = ws;
    ws.onopen = function () {
      // Servers with authentication take the token as the first message (it stays out of URLs and logs); a
      // function is asked again at each reconnect, so it can hand out a fresh token.
      var token = typeof self.options.token === "function" ? self.options.token() : self.options.token;
      Promise.resolve(token).then(function (value) {
        if (value && self._ws === ws && ws.readyState === 1) ws.send(JSON.stringify({type: "auth", token: value}));
      });
    };
    ws.onmessage = function (event) { if (self._ws === ws) self._receive(event.data); };
    ws.onclose = function (event) { if (self._ws === ws) self._dropped(event.code, event.reason); };
    ws.onerror = function () { /* onclose follows and says why */ };
  };

  RoomClient.prototype._dropped = function (code, reason) {
    var closes = this._closes;
    this._ws = null;
    var wasOpen = this.state === "open";
    this._draining = false;
    var hint = code === 1001 && this._hintedDelay === null && /reconnect after (\d+) ms/.exec(reason || "");
    if (hint) this._hint(Number(hint[1]));
    var terminal = this._closedByUser || !this.options.reconnect || isTerminal(code);
    this._stopCatchingUp();
    this._failPending("disconnected", "the connection closed (code " + code + ")", !terminal && !!this.session);
    this._emit("close", {code: code, reason: reason});
    if (this._closes !== closes) return;  // a close listener closed the client: close() did the rest, no retry
    if (terminal) {
      this._setState("closed", {code: code, reason: reason});
      var waiters = this._connectWaiters.splice(0);
      waiters.forEach(function (w) { w.reject(RoomClientError("closed", "connection closed (code " + code + ")")); });
      return;
    }
    if (wasOpen) this._attempt = 0;
    this._scheduleRetry(code);
  };

  RoomClient.prototype._scheduleRetry = function (code) {
    var self = this;
    var hinted = this._hintedDelay;
    this._hintedDelay = null;
    // A draining server chose when: its clients come back spread over time.
    var delay = hinted !== null ? hinted : backoffDelay(this._attempt, this.options, this.options.random);
    this._attempt += 1;
    var closes = this._closes;
    this._setState("reconnecting", {attempt: this._attempt, delay: delay, code: code, hinted: hinted !== null});
    if (this._closes !== closes) return;  // a state listener closed the client: no retry
    this._retryTimer = setTimeout(function () { self._retryTimer = null; self._open(); }, delay);
  };

  /** Close for good (no reconnect). Whatever still waits (requests, chats kept for the next connection,
   *  connect()) is rejected with "closed", also when called between two attempts. */
  RoomClient.prototype.close = function () {
    this._closes += 1;
    this._closedByUser = true;
    if (this._retryTimer) { clearTimeout(this._retryTimer); this._retryTimer = null; }
    if (this._ws) { this._ws.close(1000); return; }  // its close event does the rest (also while connecting)
    this._setState("closed", {code: 1000});
    var waiters = this._connectWaiters.splice(0);
    waiters.forEach(function (w) { w.reject(RoomClientError("closed", "closed by the application")); });
    this._failPending("closed", "closed by the application", false);
  };

  /** Reject every waiting request; with `keepChats`, chats go to the outbox instead, to be sent again (with
   *  the same msg_id, so the server stores each once) after the next resume. */
  RoomClient.prototype._failPending = function (code, message, keepChats) {
    var self = this;
    var pending = this._pending;
    this._pending = {};
    this._echoQueue = {};
    Object.keys(pending).sort(function (a, b) { return a - b; }).forEach(function (id) {
      var entry = pending[id];
      clearTimeout(entry.timer);
      if (keepChats && entry.chat) self._outbox.push(entry);
      else entry.reject(RoomClientError(code, message));
    });
    if (!keepChats) this._rejectOutbox(code, message);
  };

  /** A dropped connection ends every catch-up and pending rejoin: the chats they held are dropped unseen, and
   *  the rooms keep their lastSeq, so the next connection's resume (or rejoin) replays them again. */
  RoomClient.prototype._stopCatchingUp = function () {
    var self = this;
    Object.keys(this._rejoinTimers).forEach(function (name) { clearTimeout(self._rejoinTimers[name]); });
    this._rejoinTimers = {};
    Object.keys(this.rooms).forEach(function (name) {
      var catchUp = self.rooms[name].catchUp;
      if (catchUp) clearTimeout(catchUp.timer);
      self.rooms[name].catchUp = null;
    });
  };

  RoomClient.prototype._rejectOutbox = function (code, message) {
    this._outbox.splice(0).forEach(function (entry) { entry.reject(RoomClientError(code, message)); });
  };

  RoomClient.prototype._hint = function (afterMs) {
    this._hintedDelay = Math.min(Math.max(Number(afterMs) || 0, 0), this.options.maxDelay);
  };

  RoomClient.prototype._flushOutbox = function () {
    var self = this;
    // In the order the application sent them (held chats and refused ones interleave).
    this._outbox.splice(0).sort(function (a, b) { return a.order - b.order; }).forEach(function (entry) {
      self._sendChat(entry.chat).then(entry.resolve, entry.reject);
    });
  };

  RoomClient.prototype._sendRaw = function (message) {
    if (!this._ws || this._ws.readyState !== 1) throw RoomClientError("not_connected", "not connected");
    this._ws.send(JSON.stringify(message));
  };

  /** Send a request and get a promise of its reply (matched by "id"). */
  RoomClient.prototype.request = function (message, extra) {
    var self = this;
    var id = this._nextId++;
    message = Object.assign({}, message, {id: id});
    return new Promise(function (resolve, reject) {
      try { self._sendRaw(message); } catch (e) { reject(e); return; }
      var timer = setTimeout(function () {
        delete self._pending[id];
        self._dequeueEcho(id);
        reject(RoomClientError("timeout", "no reply to " + message.type + " within " + self.options.requestTimeout + " ms"));
      }, self.options.requestTimeout);
      self._pending[id] = Object.assign({resolve: resolve, reject: reject, timer: timer, kind: message.type, order: id},
                                        extra || {});
    }).then(function (reply) { return reply; });
  };

  RoomClient.prototype._settle = function (id, reply, error) {
    var entry = this._pending[id];
    if (!entry) return null;
    delete this._pending[id];
    clearTimeout(entry.timer);
    if (error) entry.reject(error); else entry.resolve(reply);
    return entry;
  };

  /** Join a room; resolves with the "joined" reply. options: {presence: true, meta: {...}} where supported. */
  RoomClient.prototype.join = function (room, options) {
    var self = this;
    var joinOptions = options || {};
    return this.request(Object.assign({type: "join", room: room}, joinOptions)).then(function (reply) {
      if (!self.rooms[room]) self.rooms[room] = {lastSeq: 0};
      self.rooms[room].joinOptions = joinOptions;
      return reply;
    });
  };

  // A leave that fails so has left the room all the same: the server holds no membership for this connection.
  var LEAVE_DONE_ANYWAY = {not_in_room: true, disconnected: true, not_connected: true};

  /** Leave a room; resolves with the "left" reply. A room the client is waiting to join again (a resume or
   *  rejoin answered "unavailable": it is not in the room) is forgotten at once, without asking the server, and
   *  one that a resume or rejoin still in flight did not get back into (the server answers "not_in_room") is
   *  forgotten too, and so is one whose connection is gone (the leave "disconnected" or "not_connected": the
   *  server drops a closed connection's rooms, and the next connection must not join it again): all resolve
   *  with {type: "left", room}, and no rejoin of the room follows. */
  RoomClient.prototype.leave = function (room) {
    var self = this;
    var state = this.rooms[room];
    if (state && this._rejoinTimers[room] !== undefined) {
      clearTimeout(this._rejoinTimers[room]);
      delete this._rejoinTimers[room];
      delete this.rooms[room];
      return Promise.resolve({type: "left", room: room});
    }
    if (state) state.leaving = true;  // a rejoin of the room answered "unavailable" meanwhile is not retried
    return this.request({type: "leave", room: room}).then(function (reply) {
      delete self.rooms[room];
      return reply;
    }, function (error) {
      if (state && LEAVE_DONE_ANYWAY[error.code]) {
        if (self.rooms[room] === state) delete self.rooms[room];
        return {type: "left", room: room};
      }
      if (state) state.leaving = false;
      throw error;
    });
  };

  /** Send a chat message; resolves with {seq} once the server has it (its ack, or our own copy coming back). */
  RoomClient.prototype.send = function (room, text) {
    return this._sendChat({type: "chat", room: room, text: text, msg_id: randomId()});
  };

  RoomClient.prototype._sendChat = function (chat) {
    var self = this;
    if (this._draining) {
      // The server asked us to move: keep the chat for the next connection (sent after the resume).
      var order = this._nextId++;
      return new Promise(function (resolve, reject) {
        self._outbox.push({resolve: resolve, reject: reject, chat: chat, room: chat.room, order: order});
      });
    }
    var id = this._nextId;
    var promise = this.request(chat, {room: chat.room, chat: chat});
    if (this._pending[id]) (this._echoQueue[chat.room] = this._echoQueue[chat.room] || []).push(id);
    return promise;
  };

  /** Ask for a room's history: {since, limit}; resolves with the "history" reply (servers with history). */
  RoomClient.prototype.history = function (room, options) {
    return this.request(Object.assign({type: "history", room: room}, options || {}));
  };

  /** Ask who is in a room; resolves with the "presence" reply (servers with presence). */
  RoomClient.prototype.presence = function (room) {
    return this.request({type: "presence", room: room});
  };

  RoomClient.prototype.lastSeq = function (room) {
    return this.rooms[room] ? this.rooms[room].lastSeq : 0;
  };

  RoomClient.prototype._receive = function (data) {
    var message;
    try { message = JSON.parse(data); } catch (e) { return; }
    if (!message || typeof message !== "object") return;
    switch (message.type) {
      case "welcome": return this._welcome(message);
      case "chat": return this._chat(message);
      case "ack":
        this._acksSeen = true;
        this._dequeueEcho(message.id);
        this._settle(message.id, message);
        return;
      case "reconnect":
        this._draining = true;
        this._hint(message.after_ms);
        this._emit("message", message);
        return;
      case "error":
        if (this._draining && message.code === "unavailable" && this._holdRefusedChat(message.id)) return;
        if (message.id !== undefined && message.id === this._resumeId && typeof message.room === "string") {
          // One room of the resume: settles the resume only if no other room's "resumed" did first.
          this._settle(message.id, null, RoomClientError(message.code, message.message, message));
          this._roomNotResumed(message);
          return;
        }
        if (message.id !== undefined && this._settle(message.id, null, RoomClientError(message.code, message.message, message))) {
          this._dequeueEcho(message.id);
          return;
        }
        this._emit("error", message);
        return;
      case "resumed":
        if (typeof message.client === "string") this.id = message.client; // a cluster's continued session keeps its id
        if (message.room && this.rooms[message.room]) {
          // Not recovered: the gap is older than the server's history (or its seq started again), so the
          // sequence goes on from wherever the replay starts.
          if (message.recovered === false) this.rooms[message.room].lastSeq = 0;
          this._emit("resumed", message);
        }
        this._settle(message.id, message);
        return;
      case "history":
        if (message.id !== undefined) this._settle(message.id, message);
        return;
      case "left":
        // Without an id: taken out by the server (the room was deleted), not a room to rejoin on reconnect.
        if (message.id === undefined) delete this.rooms[message.room];
        if (message.id !== undefined && this._settle(message.id, message)) return;
        this._emit("message", message);
        return;
      default:
        if (message.type === "presence" && message.id === undefined) this._emit("presence", message);
        if (message.id !== undefined && this._settle(message.id, message)) return;
        this._emit("message", message);
    }
  };

  // A chat the draining server refused (not stored): keep it for the next connection.
  RoomClient.prototype._holdRefusedChat = function (id) {
    var entry = this._pending[id];
    if (!entry || !entry.chat) return false;
    delete this._pending[id];
    clearTimeout(entry.timer);
    this._dequeueEcho(id);
    this._outbox.push(entry);
    return true;
  };

  RoomClient.prototype._dequeueEcho = function (id) {
    var queue, index;
    for (var room in this._echoQueue) {
      queue = this._echoQueue[room];
      index = queue.indexOf(id);
      if (index >= 0) { queue.splice(index, 1); return; }
    }
  };

  RoomClient.prototype._chat = function (message) {
    var room = this.rooms[message.room];
    // A room catching up on its gap: its live chats wait for the replay, or the first of them would move
    // lastSeq past the gap and every replayed chat would then be dropped as already delivered.
    if (room && room.catchUp && typeof message.seq === "number") { room.catchUp.held.push(message); return; }
    this._deliver(message);
  };

  /** Emit a chat event, unless its seq was already delivered in its room (a replay overlapping what we had). */
  RoomClient.prototype._deliver = function (message) {
    var room = this.rooms[message.room];
    if (room && typeof message.seq === "number") {
      if (message.seq <= room.lastSeq) return;   // already delivered (replay overlap)
      room.lastSeq = message.seq;
    }
    if (message.from === this.id && !this._acksSeen) {
      // Without server acks, our own copy coming back is the ack: matched by its msg_id where the server
      // echoes it, else in order (the server handles one connection's requests in order).
      var queue = this._echoQueue[message.room] || [];
      var self = this;
      var match = queue.filter(function (id) {
        var entry = self._pending[id];
        return entry && entry.chat && message.msg_id !== undefined && entry.chat.msg_id === message.msg_id;
      })[0];
      if (match === undefined && message.msg_id === undefined) match = queue[0];
      if (match !== undefined) {
        queue.splice(queue.indexOf(match), 1);
        this._settle(match, {type: "ack", room: message.room, seq: message.seq});
      }
    }
    this._emit("chat", message);
    this._emit("message", message);
  };

  RoomClient.prototype._welcome = function (message) {
    var self = this;
    var previousSession = this.session;
    var wasReconnect = !!this._everOpened;
    this.id = message.id;
    this.session = message.session || null;
    this._everOpened = true;
    this._attempt = 0;
    var closes = this._closes;
    this._setState("open", {resumed: wasReconnect});
    this._emit("welcome", message);
    // A listener closed the client: no resume or rejoin on the closing socket (connect() is rejected with
    // "closed" when its close event comes).
    if (this._closes !== closes) return;
    var waiters = this._connectWaiters.splice(0);
    waiters.forEach(function (w) { w.resolve(self); });
    var names = Object.keys(this.rooms);
    if (!wasReconnect || !names.length) {
      this._rejectOutbox("disconnected", "the connection closed before the server acknowledged the chat");
      return;
    }
    if (previousSession && message.session) {
      var rooms = {};
      names.forEach(function (name) { rooms[name] = self.rooms[name].lastSeq; });
      this._resumeId = this._nextId;
      this.request({type: "resume", session: previousSession, rooms: rooms}).catch(function (error) {
        if (error.code === "disconnected" || error.code === "timeout") return;
        // An error naming a room is about that room alone (_roomNotResumed dealt with it), the others are
        // resumed all the same: nothing to join again.
        if (error.reply && typeof error.reply.room === "string") return;
        self._rejoin(Object.keys(self.rooms));
      });
      this._flushOutbox();   // after the resume: the server handles requests in order, the rooms are back
      return;
    }
    this._rejectOutbox("disconnected", "the connection closed before the server acknowledged the chat");
    this._rejoin(names);
  };

  /** A room of the resume that the server did not take this connection back into (whichever reply settled the
   *  resume: the other rooms are resumed all the same). "unavailable" is transient (it could not read the
   *  room's gap, and took us out of the room: retry later): join it again after a backoff. Any other refusal
   *  (room_full, too_many_rooms, forbidden) is final: the room is not one of ours any more. */
  RoomClient.prototype._roomNotResumed = function (message) {
    if (message.code === "unavailable" && this.rooms[message.room]) {
      this._rejoinLater(message.room, 0, message.message);
      return;
    }
    delete this.rooms[message.room];
    this._emit("error", message);
  };

  // No sessions on this server (or the resume was refused): join again, and fill the gap after each room's last seq.
  RoomClient.prototype._rejoin = function (names) {
    var self = this;
    names.forEach(function (name) { self._rejoinRoom(name, 0); });
  };

  /** Join `name` again with "since" its last seq; `retries` is the number of rejoins (joins, history reads)
   *  already refused with "unavailable". Until the gap is filled the room's live chats are held (catchUp.held). */
  RoomClient.prototype._rejoinRoom = function (name, retries) {
    var self = this;
    var state = this.rooms[name];
    if (!state) return;
    // held: the live chats; contiguous: no seq skipped so far; answered: a history page came; timer: the next
    // history read, after one answered "unavailable".
    var catchUp = state.catchUp = {held: [], contiguous: true, answered: false, timer: null};
    var join = Object.assign({type: "join", room: name}, state.joinOptions || {}, {since: state.lastSeq});
    this.request(join).then(function (reply) {
      if (!self._isCatchingUp(name, catchUp)) return;  // the connection dropped, or the room was left
      if (typeof reply.recovered === "boolean") {
        // The server replayed the gap itself, after this reply and before any live chat of the room.
        if (!reply.recovered) state.lastSeq = 0;  // the gap is older than its history: go on from its first seq
        self._caughtUp(name, state, reply.recovered, "join");
        return;
      }
      self._fillGap(name, state, catchUp, retries);  // a server that ignores "since" in a join: ask its history
    }, function (error) {
      if (!self._isCatchingUp(name, catchUp)) return;
      state.catchUp = null;
      if (error.code === "unavailable") {  // the server could not replay the gap and did not join us: retry later
        self._rejoinLater(name, retries, error.message);
        return;
      }
      if (NOT_JOINED[error.code]) delete self.rooms[name];  // refused: not one of ours any more
      self._emit("error", {type: "error", code: error.code, room: name,
                           message: "could not rejoin " + name + ": " + error.message});
    });
  };

  /** Whether `catchUp` is still the one under way in room `name` (not ended by a drop, the room not left). */
  RoomClient.prototype._isCatchingUp = function (name, catchUp) {
    var state = this.rooms[name];
    return !!state && state.catchUp === catchUp;
  };

  /** Join `name` again after a backoff (the server answered "unavailable": retry later), unless `retries`
   *  rejoins were refused already: then give the room up, with an error event. */
  RoomClient.prototype._rejoinLater = function (name, retries, reason) {
    var self = this;
    if (this.rooms[name] && this.rooms[name].leaving) return;  // the leave under way forgets the room
    if (retries >= this.options.rejoinAttempts) {
      delete this.rooms[name];
      this._emit("error", {type: "error", code: "unavailable", room: name,
                           message: "could not rejoin " + name + " (" + (retries + 1) + " attempts): " + reason});
      return;
    }
    clearTimeout(this._rejoinTimers[name]);
    this._rejoinTimers[name] = setTimeout(function () {
      delete self._rejoinTimers[name];
      self._rejoinRoom(name, retries + 1);
    }, backoffDelay(retries, this.options, this.options.random));
  };

  /** Fill the gap after the room's lastSeq from its history, page after page while the server says "more"
   *  (each page starting after the last seq of the one before), until a page brings nothing new or fails. A
   *  page answered "unavailable" (the history cannot be read right now), or not answered in time, is asked for
   *  again after a backoff, as a join refused with "unavailable" is, the room's live chats still held;
   *  `retries`: the rejoins and reads already refused so. */
  RoomClient.prototype._fillGap = function (name, state, catchUp, retries) {
    var self = this;
    function page(since) {
      self.history(name, {since: since}).then(function (reply) {
        if (!self._isCatchingUp(name, catchUp)) return;
        catchUp.answered = true;
        var messages = reply.messages || [];
        messages.forEach(function (message) {
          catchUp.contiguous = self._deliverNext(state, message) && catchUp.contiguous;
        });
        var last = messages.length ? messages[messages.length - 1].seq : since;
        if (reply.more && typeof last === "number" && last > since) {
          page(last);
          return;
        }
        // Recovered only if every page came and none skipped a seq (history no longer holding the gap).
        self._caughtUp(name, state, catchUp.contiguous && !reply.more, "history");
      }, function (error) {
        if (!self._isCatchingUp(name, catchUp)) return;
        // Unreadable for now, or no answer in time: read again after a backoff (as "no history here", the room's
        // lastSeq would go to 0, and the next rejoin would replay chats the client had).
        if (error.code === "unavailable" || error.code === "timeout") {
          self._fillGapLater(name, state, catchUp, retries);
          return;
        }
        // No history at all here: sequence numbers may start again, accept what comes.
        if (!catchUp.answered) state.lastSeq = 0;
        self._caughtUp(name, state, false, catchUp.answered ? "history" : "rejoin");
      });
    }
    page(state.lastSeq);
  };

  /** Read the rest of the gap again after a backoff (its history answered "unavailable"), unless `retries`
   *  rejoins or reads were refused already: then go on without it (the client is in the room: its live chats
   *  follow, and "resumed" says recovered: false; the room keeps its lastSeq, the history exists). */
  RoomClient.prototype._fillGapLater = function (name, state, catchUp, retries) {
    var self = this;
    if (retries >= this.options.rejoinAttempts) {
      this._caughtUp(name, state, false, "history");
      return;
    }
    catchUp.timer = setTimeout(function () {
      catchUp.timer = null;
      if (self._isCatchingUp(name, catchUp)) self._fillGap(name, state, catchUp, retries + 1);
    }, backoffDelay(retries, this.options, this.options.random));
  };

  /** Deliver a chat of a room catching up; false if its seq shows that chats before it were skipped. */
  RoomClient.prototype._deliverNext = function (state, message) {
    var skipped = state.lastSeq > 0 && typeof message.seq === "number" && message.seq > state.lastSeq + 1;
    this._deliver(message);
    return !skipped;
  };

  /** The gap is filled (or given up): deliver the live chats held meanwhile in seq order (those the replay
   *  delivered already are dropped as duplicates), then tell the application. */
  RoomClient.prototype._caughtUp = function (name, state, recovered, via) {
    var self = this;
    var held = state.catchUp.held;
    state.catchUp = null;
    held.sort(function (a, b) { return a.seq - b.seq; }).forEach(function (message) {
      recovered = self._deliverNext(state, message) && recovered;
    });
    this._emit("resumed", {type: "resumed", room: name, recovered: recovered, via: via});
  };

  global.RoomClient = RoomClient;
  global.RoomClientError = RoomClientError;
  if (typeof module !== "undefined" && module.exports) module.exports = {RoomClient: RoomClient, RoomClientError: RoomClientError};
})(typeof window !== "undefined" ? window : globalThis);
