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
