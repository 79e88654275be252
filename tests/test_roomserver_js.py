"""roomserver.js's connection logic in Node, against a fake ``WebSocket`` (what no real server can stage on
demand: a server that stays down while the client is between two attempts)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "roomserver" / "static" / "roomserver.js"

# What every script starts with.
#
# A fake socket sends through a `Mailbox`: its messages (and its own events) in the order they are due, by (due
# time, order of scheduling), one per task, pumped by a single timer. A timer per message would not do: when the
# loop runs late (a loaded machine), Node fires timers of different delays out of order (a timer counts from the
# loop's cached time, and Node keeps a list per delay whose due timers all fire before the next list's), so the
# client would see chats 3, 1, 2: an order no server sends. With the mailbox a message scheduled to arrive later
# never overtakes one scheduled to arrive earlier, whatever the load.
#
# The scripts wait with `until(predicate, what)` for what they need (polled every ms; after 5 s the script fails
# with what it waited for and its state), never with a fixed pause. A fixed `sleep` is left only where a script
# checks that something does NOT happen (no retry, no rejoin, no more requests): there it gives a client that
# would wrongly go on the time to do it (SETTLE_MS, twenty times the client's longest delay in the FAKE_SERVER
# scripts); the timer of a wrong retry or rejoin starts before the pause with a shorter delay, so it fires first
# however late the loop runs.
HELPERS = """
class Mailbox {
  constructor() { this.queue = []; this.timer = null; }
  later(action, delay) {
    const entry = {due: performance.now() + delay, action};
    let index = this.queue.length;
    while (index > 0 && this.queue[index - 1].due > entry.due) index--;  // after those due at the same time
    this.queue.splice(index, 0, entry);
    if (index === 0) this.schedule();
  }
  get empty() { return this.queue.length === 0; }
  schedule() {
    clearTimeout(this.timer);
    this.timer = null;
    if (!this.queue.length) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.queue[0].due > performance.now()) { this.schedule(); return; }  // woken early (cached loop time)
      const entry = this.queue.shift();
      try { entry.action(); } finally { this.schedule(); }
    }, Math.max(0, this.queue[0].due - performance.now()));
  }
}
const SETTLE_MS = 100;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(predicate, what, timeoutMs = 5000) {
  const deadline = performance.now() + timeoutMs;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error("timed out after " + timeoutMs + " ms waiting for " + what);
    await sleep(1);
  }
}
// Run the script's steps, then print `report()` (its result) and close the client; a failure exits 1 with the
// error and the state where it stopped.
function main(steps, report) {
  steps().then(() => {
    console.log(JSON.stringify(report()));
    client.close();
  }, (error) => {
    console.error(error.stack + "\\nstate: " + JSON.stringify(report()));
    process.exit(1);
  });
}
"""

CLOSE_BETWEEN_ATTEMPTS = HELPERS + """
const attempts = [];
globalThis.WebSocket = class {
  constructor(url) {
    attempts.push(url);
    this.readyState = 0;
    this.mailbox = new Mailbox();
    this.mailbox.later(() => { this.readyState = 3; this.onclose && this.onclose({code: 1006, reason: ""}); }, 5);
  }
  close() {}
  send() { throw new Error("not open"); }
};
const {RoomClient} = require(process.argv[1]);
const client = new RoomClient("ws://127.0.0.1:9/ws", {minDelay: 50, maxDelay: 50});
const states = [];
client.on("state", (state) => states.push(state));
let outcome = "still waiting";
client.connect().then(() => (outcome = "open"), (error) => (outcome = error.code));
let retried_after_close = null;
main(async () => {
  // Never opened, so "reconnecting" is only ever the state between two attempts (an attempt is "connecting").
  await until(() => client.state === "reconnecting", "the first attempt to fail");
  client.close();
  const settled = attempts.length;
  // Only for what must NOT happen: a retry after close() (its delay is 50 ms at most, its timer started before
  // this pause). connect() is rejected by close() itself, at once.
  await sleep(200);
  retried_after_close = attempts.length - settled;
}, () => ({outcome, state: client.state, states, retried_after_close}));
"""


def run_node(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` in Node (``process.argv[1]`` is roomserver.js, then ``args``); its last line of output."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing (bench/ and these tests need Node.js)")
    done = subprocess.run([node, "-e", script, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.fail(f"the Node script failed (exit {done.returncode}):\n{done.stderr}", pytrace=False)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_close_between_two_attempts_rejects_connect_and_stops_retrying() -> None:
    result = run_node(CLOSE_BETWEEN_ATTEMPTS)
    assert result["outcome"] == "closed", result
    assert result["state"] == "closed" and result["retried_after_close"] == 0, result
    assert "reconnecting" in result["states"], result  # it was between two attempts when closed


RESUME_REFUSED_FOR_ONE_ROOM = HELPERS + """
const sockets = [];
globalThis.WebSocket = class {
  constructor(url) {
    this.readyState = 0;
    this.sent = [];
    this.mailbox = new Mailbox();
    sockets.push(this);
    this.mailbox.later(() => {
      this.readyState = 1;
      this.onopen && this.onopen();
      const session = "s" + sockets.length;
      this.onmessage({data: JSON.stringify({type: "welcome", id: "me", session})});
    }, 1);
  }
  send(data) {
    const message = JSON.parse(data);
    this.sent.push(message);
    const reply = (answer) => this.mailbox.later(() => this.onmessage({data: JSON.stringify(answer)}), 1);
    if (message.type === "join") reply({type: "joined", room: message.room, size: 1, id: message.id});
    if (message.type === "resume") {  // one room refused: the other is resumed, its reply first or last
      reply({type: "resumed", room: "kept", continued: true, recovered: true, id: message.id});
      reply({type: "error", code: "room_full", message: "full", room: "taken", id: message.id});
    }
  }
  close() {}
};
const {RoomClient} = require(process.argv[1]);
const client = new RoomClient("ws://127.0.0.1:9/ws", {minDelay: 5, maxDelay: 5});
const errors = [];
client.on("error", (error) => errors.push(error.code + " " + error.room));
const answered = (socket) => !!socket && socket.readyState === 1 && socket.sent.length > 0 && socket.mailbox.empty;
main(async () => {
  await client.connect();
  await client.join("kept");
  await client.join("taken");
  sockets[0].readyState = 3;
  sockets[0].onclose({code: 1006, reason: ""});
  await until(() => answered(sockets[1]) && errors.length > 0, "the replies to the resume");
  await sleep(SETTLE_MS);  // no join of either room may follow
}, () => ({rooms: Object.keys(client.rooms), errors,
           second: sockets[1] && sockets[1].sent.map((m) => m.type + (m.room ? " " + m.room : ""))}));
"""


def test_a_resume_refused_for_one_room_gives_up_that_room_and_rejoins_nothing() -> None:
    result = run_node(RESUME_REFUSED_FOR_ONE_ROOM)
    assert result["rooms"] == ["kept"], result
    assert result["errors"] == ["room_full taken"], result
    assert result["second"] == ["resume"], result  # no join of either room after it


TIMED_OUT_CHAT = HELPERS + """
globalThis.WebSocket = class {
  constructor(url) {
    this.readyState = 0;
    this.mailbox = new Mailbox();
    this.mailbox.later(() => {
      this.readyState = 1;
      this.onopen && this.onopen();
      this.onmessage({data: JSON.stringify({type: "welcome", id: "me", session: "s"})});
    }, 1);
  }
  send(data) {  // a server without acks that never echoes the chat back either
    const message = JSON.parse(data);
    if (message.type === "join") {
      const joined = {type: "joined", room: "r", size: 1, id: message.id};
      this.mailbox.later(() => this.onmessage({data: JSON.stringify(joined)}), 1);
    }
  }
  close() {}
};
const {RoomClient} = require(process.argv[1]);
const client = new RoomClient("ws://127.0.0.1:9/ws", {requestTimeout: 30});
let outcome = null;
main(async () => {
  await client.connect();
  await client.join("r");
  outcome = await client.send("r", "lost").then(() => "acked", (error) => error.code);
}, () => ({outcome, queued: (client._echoQueue.r || []).length}));
"""


def test_a_timed_out_chat_leaves_the_echo_queue() -> None:
    """Without server acks a chat's own copy is its ack, matched in order: a timed-out chat left in the queue
    would take the next chat's copy for its own."""
    assert run_node(TIMED_OUT_CHAT) == {"outcome": "timeout", "queued": 0}


# A scriptable server for the reconnect tests: `serve(socket, message, connection)` answers each request of
# connection number `connection` (1-based), at once (`socket.later(message, delay)`: sent `delay` ms later,
# through the socket's mailbox); `welcome(connection)` greets it. Each message arrives in its own task, as from a
# real socket. `served(socket)`: the socket is open and its server has sent everything it had to (every request
# of the client is answered). `pushed(socket)`: what the client was sent on it, in order.
FAKE_SERVER = HELPERS + """
const sockets = [];
function fakeServer(welcome, serve) {
  globalThis.WebSocket = class {
    constructor(url) {
      this.readyState = 0;
      this.sent = [];
      this.pushed = [];
      this.mailbox = new Mailbox();
      this.number = sockets.push(this);
      this.mailbox.later(() => {
        this.readyState = 1; this.onopen && this.onopen(); this.push(welcome(this.number));
      }, 1);
    }
    push(message) {
      if (this.readyState !== 1) return;
      this.pushed.push(message);
      this.onmessage({data: JSON.stringify(message)});
    }
    later(message, delay) { this.mailbox.later(() => this.push(message), delay || 1); }
    send(data) { const message = JSON.parse(data); this.sent.push(message); serve(this, message, this.number); }
    close(code) {
      this.readyState = 3;
      this.mailbox.later(() => this.onclose({code: code || 1000, reason: ""}), 0);
    }
  };
}
const drop = (socket) => { socket.readyState = 3; socket.onclose({code: 1006, reason: ""}); };
const served = (socket) => !!socket && socket.readyState === 1 && socket.mailbox.empty;
const chat = (room, seq) => ({type: "chat", room, from: "other", text: "m" + seq, seq});
const range = (first, last) => Array.from({length: last - first + 1}, (_, i) => first + i);
const describe = (messages, keys) =>
  messages.map((m) => keys.map((key) => m[key]).filter((x) => x !== undefined).join(" "));
const requests = (socket) => socket ? describe(socket.sent, ["type", "room", "since"]) : null;
const pushed = (socket) => socket ? describe(socket.pushed, ["type", "code", "room", "seq"]) : null;
const {RoomClient} = require(process.argv[1]);
const client = new RoomClient("ws://127.0.0.1:9/ws", {minDelay: 5, maxDelay: 5, rejoinAttempts: 2});
const delivered = {};
const resumed = [];
const errors = [];
client.on("chat", (m) => (delivered[m.room] = delivered[m.room] || []).push(m.seq));
client.on("resumed", (r) => resumed.push([r.room, r.recovered]));
client.on("error", (e) => errors.push(e.code + " " + e.room));
// Join room r on the first connection, drop it once its messages are in, and wait for the rejoin on the next.
async function rejoinAfterADrop() {
  await client.connect();
  await client.join("r");
  await until(() => served(sockets[0]), "chats 1-3");
  drop(sockets[0]);
  await until(() => served(sockets[1]) && resumed.length === 1, "the rejoin of r");
}
"""

# A server without sessions, that ignores "since" in a join (so the client fills the gap from history): chats
# 1-3 while connected, then 4-7 while the client is away; 8 and 9 are sent live after it joined again, 8 before
# the history it asks for is read (so that history holds it too).
REJOIN_WHILE_CHATS_GO_ON = FAKE_SERVER + """
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m, connection) => {
  if (m.type === "join") {
    socket.later({type: "joined", room: m.room, size: 2, id: m.id});
    const live = connection === 1 ? range(1, 3) : [8, 9];
    live.forEach((seq, i) => socket.later(chat("r", seq), 2 + i));
  }
  if (m.type === "history") socket.later({type: "history", room: "r", id: m.id, more: false,
                                          messages: range(m.since + 1, 8).map((seq) => chat("r", seq))}, 10);
});
main(rejoinAfterADrop,
     () => ({delivered: delivered.r, resumed, requests: requests(sockets[1]), pushed: pushed(sockets[1])}));
"""


def test_a_rejoin_holds_the_live_chats_until_the_history_filled_the_gap() -> None:
    """Live chats 8 and 9 reach the client between its join and the history reply: delivered at once, 8 would
    move the room's last seq past the gap and the replayed 4-7 would be dropped as already seen, while the
    client still said recovered."""
    result = run_node(REJOIN_WHILE_CHATS_GO_ON)
    assert result["requests"] == ["join r 3", "history r 3"], result
    assert result["pushed"] == ["welcome", "joined r", "chat r 8", "chat r 9", "history r"], result  # as staged
    assert result["delivered"] == list(range(1, 10)), result  # in order, 8 once (history and live)
    assert result["resumed"] == [["r", True]], result


# The same server with a history that answers at most two chats a page ("more": newer ones follow): the gap is
# 4-8.
REJOIN_WITH_A_PAGED_HISTORY = FAKE_SERVER + """
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m, connection) => {
  if (m.type === "join") {
    socket.later({type: "joined", room: m.room, size: 2, id: m.id});
    if (connection === 1) range(1, 3).forEach((seq) => socket.later(chat("r", seq), 1 + seq));
  }
  if (m.type === "history") {
    const page = range(m.since + 1, Math.min(m.since + 2, 8));
    socket.later({type: "history", room: "r", id: m.id, more: page[page.length - 1] < 8,
                  messages: page.map((seq) => chat("r", seq))}, 2);
  }
});
main(rejoinAfterADrop, () => ({delivered: delivered.r, resumed, requests: requests(sockets[1])}));
"""


def test_a_rejoin_reads_every_page_of_the_gap() -> None:
    result = run_node(REJOIN_WITH_A_PAGED_HISTORY)
    assert result["requests"] == ["join r 3", "history r 3", "history r 5", "history r 7"], result
    assert result["delivered"] == list(range(1, 9)), result
    assert result["resumed"] == [["r", True]], result


# Two rooms whose gap (4-7) the history cannot give whole: in "stuck", a second page that says "more" but
# brings nothing; in "trimmed", a history that no longer holds 4-5.
REJOIN_WITH_AN_INCOMPLETE_HISTORY = FAKE_SERVER + """
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m, connection) => {
  if (m.type === "join") {
    socket.later({type: "joined", room: m.room, size: 2, id: m.id});
    if (connection === 1) range(1, 3).forEach((seq) => socket.later(chat(m.room, seq), 1 + seq));
  }
  if (m.type === "history") {
    const seqs = m.room === "trimmed" ? [6, 7] : m.since === 3 ? [4, 5] : [];
    socket.later({type: "history", room: m.room, id: m.id, more: m.room === "stuck",
                  messages: seqs.map((seq) => chat(m.room, seq))}, 2);
  }
});
main(async () => {
  await client.connect();
  await client.join("stuck");
  await client.join("trimmed");
  await until(() => served(sockets[0]), "chats 1-3 of both rooms");
  drop(sockets[0]);
  await until(() => served(sockets[1]) && resumed.length === 2, "the rejoin of both rooms");
  await sleep(SETTLE_MS);  // no more pages may be asked for
}, () => ({delivered, resumed: resumed.sort(), requests: requests(sockets[1])}));
"""


def test_a_rejoin_that_could_not_fill_the_whole_gap_is_not_recovered() -> None:
    result = run_node(REJOIN_WITH_AN_INCOMPLETE_HISTORY)
    # A page without progress ends the paging (no endless asking).
    assert [r for r in result["requests"] if r.startswith("history stuck")] == [
        "history stuck 3", "history stuck 5"], result
    assert result["delivered"] == {"stuck": [1, 2, 3, 4, 5], "trimmed": [1, 2, 3, 6, 7]}, result
    assert result["resumed"] == [["stuck", False], ["trimmed", False]], result


# A server with sessions resumes rooms "a" and "b" but cannot read b's history: it answers b with "unavailable"
# (and leaves the client out of b), before or after a's "resumed". Joins of b with "since" fail the same way
# `failures` times, then succeed with the server's own replay (seq 3) after the reply.
RESUME_UNAVAILABLE_FOR_ONE_ROOM = FAKE_SERVER + """
const [order, failures] = JSON.parse(process.argv[2]);
let refused = 0;
fakeServer((n) => ({type: "welcome", id: "me", session: "s" + n}), (socket, m, connection) => {
  const unavailable = (room) => ({type: "error", code: "unavailable", room, id: m.id,
                                  message: "the history is unavailable right now; retry later"});
  if (m.type === "join" && connection === 1) {
    socket.later({type: "joined", room: m.room, size: 1, id: m.id});
    if (m.room === "b") [1, 2].forEach((seq) => socket.later(chat("b", seq), 1 + seq));
  } else if (m.type === "join" && refused++ < failures) {
    socket.later(unavailable(m.room));
  } else if (m.type === "join") {
    socket.later({type: "joined", room: m.room, size: 1, recovered: true, id: m.id});
    socket.later(chat(m.room, 3), 2);
  }
  if (m.type === "resume") {
    const answers = [{type: "resumed", room: "a", continued: true, recovered: true, id: m.id}, unavailable("b")];
    (order === "error first" ? answers.reverse() : answers).forEach((answer, i) => socket.later(answer, 1 + i));
  }
});
main(async () => {
  await client.connect();
  await client.join("a");
  await client.join("b");
  await until(() => served(sockets[0]), "chats 1-2 of b");
  drop(sockets[0]);
  await until(() => served(sockets[1]) && (resumed.some(([room]) => room === "b") || errors.length > 0),
              "b joined again, or given up");
  await sleep(SETTLE_MS);  // no join may follow
}, () => ({rooms: Object.keys(client.rooms).sort(), errors, resumed: resumed.sort(), delivered,
           requests: requests(sockets[1]), pushed: pushed(sockets[1])}));
"""


def run_resume_unavailable(order: str, failures: int) -> dict[str, object]:
    result = run_node(RESUME_UNAVAILABLE_FOR_ONE_ROOM, json.dumps([order, failures]))
    staged = ["resumed a", "error unavailable b"]  # the replies to the resume, as staged
    assert result["pushed"][1:3] == (staged[::-1] if order == "error first" else staged), result  # type: ignore[index]
    return result


@pytest.mark.parametrize("order", ["error first", "error last"])
def test_a_room_the_resume_could_not_take_back_for_now_is_joined_again(order: str) -> None:
    """The room stayed listed although the client was no longer in it (and, with the error first, every room
    was joined again): now it alone is joined again, after a backoff, and catches up from its last seq."""
    result = run_resume_unavailable(order, 1)
    assert result["requests"] == ["resume", "join b 2", "join b 2"], result
    assert result["rooms"] == ["a", "b"] and result["errors"] == [], result
    assert result["resumed"] == [["a", True], ["b", True]], result
    assert result["delivered"] == {"b": [1, 2, 3]}, result


def test_a_room_that_stays_unavailable_is_given_up_with_an_error() -> None:
    result = run_resume_unavailable("error last", 5)
    assert result["requests"] == ["resume", "join b 2", "join b 2"], result  # rejoinAttempts: 2
    assert result["rooms"] == ["a"] and result["errors"] == ["unavailable b"], result
    assert result["resumed"] == [["a", True]], result


# A server without sessions where room "full" has no place any more when the client comes back.
REJOIN_REFUSED = FAKE_SERVER + """
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m, connection) => {
  if (m.type === "join" && (connection === 1 || m.room === "kept")) {
    socket.later({type: "joined", room: m.room, size: 1, recovered: true, id: m.id});
  } else if (m.type === "join") {
    socket.later({type: "error", code: "room_full", message: "full", id: m.id});
  }
});
main(async () => {
  await client.connect();
  await client.join("kept");
  await client.join("full");
  drop(sockets[0]);
  await until(() => served(sockets[1]) && sockets[1].sent.length >= 2, "the answers to both rejoins");
  await sleep(SETTLE_MS);  // no join of "full" may follow
}, () => ({rooms: Object.keys(client.rooms), errors, resumed}));
"""


def test_a_rejoin_refused_for_good_forgets_the_room() -> None:
    assert run_node(REJOIN_REFUSED) == {"rooms": ["kept"], "errors": ["room_full full"], "resumed": [["kept", True]]}


# A leave of room "gone" while in flight when the connection drops ("disconnected"), or between two connections
# ("not_connected"). The server answers joins only.
LEAVE_WITHOUT_A_CONNECTION = FAKE_SERVER + """
const [when] = JSON.parse(process.argv[2]);
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m) => {
  if (m.type === "join") socket.later({type: "joined", room: m.room, size: 1, recovered: true, id: m.id});
});
const outcome = [];
main(async () => {
  await client.connect();
  await client.join("kept");
  await client.join("gone");
  if (when === "in flight") {
    const leaving = client.leave("gone");
    drop(sockets[0]);
    outcome.push(await leaving.catch((error) => error.code));
  } else {
    drop(sockets[0]);
    outcome.push(await client.leave("gone").catch((error) => error.code));
  }
  await until(() => served(sockets[1]) && sockets[1].sent.length >= 1, "the rejoin of kept");
  await sleep(SETTLE_MS);  // no join of "gone" may follow
}, () => ({outcome, rooms: Object.keys(client.rooms), requests: requests(sockets[1])}));
"""


@pytest.mark.parametrize("when", ["in flight", "between connections"])
def test_a_leave_whose_connection_is_gone_forgets_the_room(when: str) -> None:
    """The room stayed listed and the next connection joined it again; the server drops a closed connection's
    rooms, so it has been left: forgotten, and the leave resolves with left."""
    assert run_node(LEAVE_WITHOUT_A_CONNECTION, json.dumps([when])) == {
        "outcome": [{"type": "left", "room": "gone"}], "rooms": ["kept"], "requests": ["join kept 0"]}


# An application that closes the client from an event listener (say, giving up after so many attempts): on the
# first "connecting" state, on the "close" event of a drop, on the "reconnecting" state after it, or on the
# "open" state of the connection that comes back. Every attempt reaches the server, which answers joins.
CLOSE_FROM_A_LISTENER = FAKE_SERVER + """
const [closeOn] = JSON.parse(process.argv[2]);
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m) => {
  if (m.type === "join") socket.later({type: "joined", room: m.room, size: 1, id: m.id});
});
const states = [];
let armed = closeOn === "connecting";
let closedAt = null;
const sentCount = () => sockets.reduce((total, socket) => total + socket.sent.length, 0);
const closeNow = () => {
  if (!armed || closedAt) return;
  closedAt = {sockets: sockets.length, sent: sentCount()};
  client.close();
};
client.on("state", (state) => { states.push(state); if (state === closeOn) closeNow(); });
client.on("close", () => { if (closeOn === "close") closeNow(); });
let outcome = "still waiting";
main(async () => {
  const connected = client.connect();
  connected.then(() => (outcome = "open"), (error) => (outcome = error.code));
  if (!armed) {
    await connected;
    await client.join("r");
    armed = true;
    drop(sockets[0]);
  }
  await until(() => closedAt !== null, "the listener to close the client");
  await sleep(SETTLE_MS);  // no attempt, request or error may follow
}, () => ({state: client.state, states, errors, outcome,
           sockets_after_close: closedAt && sockets.length - closedAt.sockets,
           sent_after_close: closedAt && sentCount() - closedAt.sent}));
"""


@pytest.mark.parametrize("close_on", ["connecting", "close", "reconnecting", "open"])
def test_close_from_an_event_listener_closes_for_good(close_on: str) -> None:
    """The client went on with what the listener had interrupted: it scheduled its retry, or opened its socket,
    after close(), and came back open; or, closed on "open", it rejoined on the closing socket (errors)."""
    result = run_node(CLOSE_FROM_A_LISTENER, json.dumps([close_on]))
    assert result["state"] == "closed", result
    assert result["states"][-1] == "closed" and result["states"].count("closed") == 1, result  # type: ignore[attr-defined]
    assert result["sockets_after_close"] == 0 and result["sent_after_close"] == 0, result
    assert result["errors"] == [], result
    if close_on == "connecting":
        assert result["outcome"] == "closed", result  # connect() itself


# A server with sessions that resumes room "a" but cannot take the client back into "b" (it answers the resume,
# and every join of b, with "unavailable"). The application leaves b: while the rejoin retry of b waits for its
# backoff ("pending": the leave comes in the same task as the resume's error), while the resume is in flight
# ("resuming"), or while the retry's join is in flight ("rejoining"). The server answers a leave with
# not_in_room (the client is not in b).
LEAVE_WHILE_REJOINING = FAKE_SERVER + """
const [when] = JSON.parse(process.argv[2]);
let outcome = null;
const leave = () => {
  if (outcome !== null) return;
  outcome = "pending";
  client.leave("b").then((reply) => (outcome = reply), (error) => (outcome = {error: error.code}));
};
fakeServer((n) => ({type: "welcome", id: "me", session: "s" + n}), (socket, m, connection) => {
  const unavailable = {type: "error", code: "unavailable", room: "b", id: m.id, message: "retry later"};
  if (connection === 1) {
    if (m.type === "join") socket.later({type: "joined", room: m.room, size: 1, id: m.id});
    return;
  }
  if (m.type === "resume") {
    if (when === "resuming") socket.mailbox.later(leave, 0);
    socket.later({type: "resumed", room: "a", continued: true, recovered: true, id: m.id}, 1);
    if (when === "pending") socket.mailbox.later(() => { socket.push(unavailable); leave(); }, 2);
    else socket.later(unavailable, 2);
  }
  if (m.type === "join") {
    if (when === "rejoining") socket.mailbox.later(leave, 0);
    socket.later(unavailable, 1);
  }
  if (m.type === "leave") socket.later({type: "error", code: "not_in_room", message: "not in b", id: m.id}, 3);
});
main(async () => {
  await client.connect();
  await client.join("a");
  await client.join("b");
  drop(sockets[0]);
  await until(() => outcome !== null && outcome !== "pending" && served(sockets[1]), "the leave of b");
  await sleep(SETTLE_MS);  // no join of b may follow
}, () => ({outcome, rooms: Object.keys(client.rooms).sort(), errors, requests: requests(sockets[1])}));
"""


@pytest.mark.parametrize(("when", "sent"), [("pending", ["resume"]), ("resuming", ["resume", "leave b"]),
                                            ("rejoining", ["resume", "join b 0", "leave b"])])
def test_a_leave_cancels_the_rejoin_of_the_room(when: str, sent: list[str]) -> None:
    """The leave was answered not_in_room, and then the retry joined b again (or gave it up with an error). Now
    the room is forgotten and no rejoin follows; the leave resolves (the client is out of b), without asking the
    server when a retry was only waiting for its backoff."""
    result = run_node(LEAVE_WHILE_REJOINING, json.dumps([when]))
    assert result["outcome"] == {"type": "left", "room": "b"}, result
    assert result["rooms"] == ["a"] and result["errors"] == [], result
    assert result["requests"] == sent, result


# A server without sessions that ignores "since" in a join (the client fills the gap, 4-7, from its history),
# whose history cannot be read for its first `failures` requests after the client comes back ("unavailable":
# retry later). Live chat 8 comes 5 ms after the join, while the client waits to ask again.
REJOIN_HISTORY_UNAVAILABLE = FAKE_SERVER + """
const [failures, silent] = JSON.parse(process.argv[2]);
if (silent) client.options.requestTimeout = 30;  // refused by not answering: the request times out
let refused = 0;
fakeServer((n) => ({type: "welcome", id: "me" + n}), (socket, m, connection) => {
  if (m.type === "join") {
    socket.later({type: "joined", room: m.room, size: 2, id: m.id});
    (connection === 1 ? [1, 2, 3] : [8]).forEach((seq) => socket.later(chat("r", seq), connection === 1 ? 1 + seq : 5));
  }
  if (m.type === "history" && refused++ < failures) {
    if (!silent) socket.later({type: "error", code: "unavailable", room: m.room, id: m.id,
                               message: "the history is unavailable right now; retry later"}, 2);
  } else if (m.type === "history") {
    socket.later({type: "history", room: "r", id: m.id, more: false,
                  messages: range(m.since + 1, 7).map((seq) => chat("r", seq))}, 2);
  }
});
main(async () => {
  await rejoinAfterADrop();
  await sleep(SETTLE_MS);  // no more requests may follow
}, () => ({delivered: delivered.r, resumed, errors, rooms: Object.keys(client.rooms), lastSeq: client.lastSeq("r"),
           requests: requests(sockets[1])}));
"""


@pytest.mark.parametrize("silent", [False, True], ids=["unavailable", "timed out"])
def test_a_rejoins_history_answered_unavailable_is_read_again_after_a_backoff(silent: bool) -> None:
    """The first page answered "unavailable" (or not answered in time) counted as "no history here": the room's
    last seq went to 0, resumed said recovered: false, and the gap was never read. Now it is read again after a
    backoff, as a join refused with "unavailable" is joined again; the live chat that came meanwhile waits."""
    result = run_node(REJOIN_HISTORY_UNAVAILABLE, json.dumps([1, silent]))
    assert result["requests"] == ["join r 3", "history r 3", "history r 3"], result
    assert result["delivered"] == list(range(1, 9)) and result["lastSeq"] == 8, result
    assert result["resumed"] == [["r", True]] and result["errors"] == [], result


def test_a_rejoins_history_that_stays_unavailable_goes_on_live_with_the_gap() -> None:
    """rejoinAttempts (2) reads again at most; then the client, which is in the room, goes on with its live chats
    and says the gap was not recovered (keeping its last seq: the history did not say the sequence restarted)."""
    result = run_node(REJOIN_HISTORY_UNAVAILABLE, json.dumps([5, False]))
    assert result["requests"] == ["join r 3", "history r 3", "history r 3", "history r 3"], result
    assert result["delivered"] == [1, 2, 3, 8] and result["lastSeq"] == 8, result
    assert result["resumed"] == [["r", False]] and result["errors"] == [] and result["rooms"] == ["r"], result
