"""roomserver.js's connection logic in Node, against a fake ``WebSocket`` (what no real server can stage on
demand: a server that stays down while the client is between two attempts)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "roomserver" / "static" / "roomserver.js"

CLOSE_BETWEEN_ATTEMPTS = """
const attempts = [];
globalThis.WebSocket = class {
  constructor(url) {
    attempts.push(url);
    this.readyState = 0;
    setTimeout(() => { this.readyState = 3; this.onclose && this.onclose({code: 1006, reason: ""}); }, 5);
  }
  close() {}
  send() { throw new Error("not open"); }
};
const {RoomClient} = require(process.argv[1]);
const client = new RoomClient("ws://127.0.0.1:9/ws", {minDelay: 50, maxDelay: 50});
const states = [];
client.on("state", (state) => states.push(state));
const waiting = client.connect().then(() => "open", (error) => error.code);
setTimeout(async () => {
  client.close();
  const outcome = await Promise.race([waiting, new Promise((r) => setTimeout(() => r("still waiting"), 1000))]);
  const settled = attempts.length;
  setTimeout(() => {
    console.log(JSON.stringify({outcome, state: client.state, states, retried_after_close: attempts.length - settled}));
  }, 200);
}, 20);
"""


def run_node(script: str) -> dict[str, object]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing (bench/ and these tests need Node.js)")
    done = subprocess.run([node, "-e", script, str(SCRIPT)], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_close_between_two_attempts_rejects_connect_and_stops_retrying() -> None:
    result = run_node(CLOSE_BETWEEN_ATTEMPTS)
    assert result["outcome"] == "closed", result
    assert result["state"] == "closed" and result["retried_after_close"] == 0, result
    assert "reconnecting" in result["states"], result  # it was between two attempts when closed


RESUME_REFUSED_FOR_ONE_ROOM = """
const sockets = [];
globalThis.WebSocket = class {
  constructor(url) {
    this.readyState = 0;
    this.sent = [];
    sockets.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen && this.onopen();
      const session = "s" + sockets.length;
      this.onmessage({data: JSON.stringify({type: "welcome", id: "me", session})});
    }, 1);
  }
  send(data) {
    const message = JSON.parse(data);
    this.sent.push(message);
    const reply = (answer) => setTimeout(() => this.onmessage({data: JSON.stringify(answer)}), 1);
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
(async () => {
  await client.connect();
  await client.join("kept");
  await client.join("taken");
  sockets[0].readyState = 3;
  sockets[0].onclose({code: 1006, reason: ""});
  await new Promise((r) => setTimeout(r, 100));
  const second = sockets[1].sent.map((m) => m.type + (m.room ? " " + m.room : ""));
  console.log(JSON.stringify({rooms: Object.keys(client.rooms), errors, second}));
  client.close();
})();
"""


def test_a_resume_refused_for_one_room_gives_up_that_room_and_rejoins_nothing() -> None:
    result = run_node(RESUME_REFUSED_FOR_ONE_ROOM)
    assert result["rooms"] == ["kept"], result
    assert result["errors"] == ["room_full taken"], result
    assert result["second"] == ["resume"], result  # no join of either room after it


TIMED_OUT_CHAT = """
globalThis.WebSocket = class {
  constructor(url) {
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 1;
      this.onopen && this.onopen();
      this.onmessage({data: JSON.stringify({type: "welcome", id: "me", session: "s"})});
    }, 1);
  }
  send(data) {  // a server without acks that never echoes the chat back either
    const message = JSON.parse(data);
    if (message.type === "join") {
      setTimeout(() => this.onmessage({data: JSON.stringify({type: "joined", room: "r", size: 1, id: message.id})}), 1);
    }
  }
  close() {}
};
const {RoomClient} = require(process.argv[1]);
const client = new RoomClient("ws://127.0.0.1:9/ws", {requestTimeout: 30});
(async () => {
  await client.connect();
  await client.join("r");
  const outcome = await client.send("r", "lost").then(() => "acked", (error) => error.code);
  console.log(JSON.stringify({outcome, queued: (client._echoQueue.r || []).length}));
  client.close();
})();
"""


def test_a_timed_out_chat_leaves_the_echo_queue() -> None:
    """Without server acks a chat's own copy is its ack, matched in order: a timed-out chat left in the queue
    would take the next chat's copy for its own."""
    assert run_node(TIMED_OUT_CHAT) == {"outcome": "timeout", "queued": 0}
