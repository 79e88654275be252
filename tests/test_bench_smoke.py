"""A tiny end-to-end run of ``make bench``'s harness: it must start the servers, drive them with the Node load
generator and produce sane figures. No timing is asserted: figures on a shared machine are for docs, not CI.

The Node package of bench/ is installed (``npm ci``) on first use, as ``make bench-deps`` does, so the test
works in any fresh checkout where Node.js and npm are available.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench_deps() -> None:
    assert shutil.which("node") and shutil.which("npm"), "the benchmark needs Node.js and npm (see docs/performance.md)"
    if not (BENCH / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH, check=True, timeout=300,
                       capture_output=True)


def test_bench_runs_end_to_end_and_reports_ratios(bench_deps: None, tmp_path: Path) -> None:
    """roomserver and one peer, a 2-member fan-out and 20 rooms of 10: every delivery arrives, in seq order,
    and the table with ratios is printed."""
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--runs", "1", "--scale", "0.02", "--servers",
         "roomserver,autobahn-prepared", "--scenarios", "fanout100,rooms", "--json", str(out_json),
         "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| roomserver ÷ peer |" in proc.stdout
    report = json.loads(out_json.read_text())
    assert report["failures"] == []
    by_key = {(entry["scenario"], entry["server"]): entry["runs"][0] for entry in report["results"]}
    assert set(by_key) == {(scenario, server) for scenario in ("fanout100", "rooms")
                           for server in ("roomserver", "autobahn-prepared")}
    for (scenario, _server), result in by_key.items():
        expected = 2 * 40 if scenario == "fanout100" else 100 * 10  # members x messages; messages x room size
        assert result["deliveries"] == expected
        assert result["errors"] == 0
        assert result["deliveries_per_s"] > 0
        assert 0 <= result["p50_ms"] <= result["p99_ms"] < 60_000
        assert result["server_cpu_s"] >= 0 and math.isfinite(result["cpu_us_per_delivery"])
        assert result["loadgen_cpu_pct"] > 0
    rooms = by_key[("rooms", "roomserver")]
    assert rooms["connections"] == 200 and rooms["idle_rss_after_kib"] > 0


def test_workers_bench_measures_every_process_and_the_spread(bench_deps: None, tmp_path: Path) -> None:
    """``python -m bench.workers``, tiny: one memory node, ``--workers 1`` and ``--workers 2`` on a private Redis;
    every delivery arrives in seq order, CPU is reported for each server process and for Redis, and the members
    counted per process add up to the room."""
    out_json = tmp_path / "workers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.workers", "--runs", "1", "--scale", "0.01", "--scenarios", "fanout100",
         "--json", str(out_json), "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| redis-workers2 ÷ peer |" in proc.stdout and "Members per process" in proc.stdout
    report = json.loads(out_json.read_text())
    assert report["failures"] == []
    by_server = {entry["server"]: entry["runs"][0] for entry in report["results"]}
    assert set(by_server) == {"memory", "redis-workers1", "redis-workers2"}
    for server, result in by_server.items():
        processes = 2 if server == "redis-workers2" else 1
        assert result["deliveries"] == 2 * 50 and result["errors"] == 0
        assert len(result["server_cpu_s_by_pid"]) == processes
        assert len(result["connections_by_pid"]) == processes
        assert sum(result["connections_by_pid"].values()) == 2  # both members, wherever the kernel put them
        assert math.isclose(sum(result["server_cpu_s_by_pid"].values()), result["server_cpu_s"], abs_tol=1e-9)
        assert result["watch_cpu_s"]["redis"] >= 0 and result["loadgen_cpu_pct"] > 0
        assert result["machine_cpu_pct"] >= result["loadgen_cpu_pct"]


def test_storm_scenario_serves_every_client_and_reports_its_figures(bench_deps: None, tmp_path: Path) -> None:
    """The reconnect storm, tiny (500 connections opened at once), against roomserver with and without an accept
    rate: every client gets its welcome, none gives up, and the figures are in order."""
    out_json = tmp_path / "storm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--runs", "1", "--scale", "0.05", "--servers",
         "roomserver,roomserver-paced", "--scenarios", "storm", "--json", str(out_json), "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["failures"] == []
    for entry in report["results"]:
        result = entry["runs"][0]
        assert (result["connections"], result["served"], result["failed"]) == (500, 500, 0), entry["server"]
        assert 0 < result["welcome_p50_s"] <= result["welcome_p99_s"] <= result["welcome_last_s"] < 60
        assert result["rss_peak_kib"] >= result["rss_settled_kib"] > 0
        assert result["cpu_us_per_connection"] > 0


def test_failover_bench_resumes_every_client_of_a_killed_node(tmp_path: Path) -> None:
    """``bench/failover.py`` at 100 clients (RELIABILITY R4 runs it by hand at 5,000): node A is killed, every
    client resumes on node B with every chat, and no ghost is listed once the presence ttl has passed."""
    out_json = tmp_path / "failover.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.failover", "--clients", "100", "--workers", "1", "--room-size", "20",
         "--rate", "50", "--publish-after", "2", "--presence-ttl", "2", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out_json.read_text())
    assert figures["node_a_exit_code"] == -9 and figures["closed"] == figures["resumed"] == 100
    assert figures["chats_acknowledged"] > 0 and figures["rooms_checked"] == 5
    assert figures["clients_with_gaps"] == figures["clients_with_duplicates"] == 0
    assert figures["clients_short_of_last_seq"] == 0 and figures["ghost_presence_entries"] == 0


def test_steady_soak_samples_memory_descriptors_and_latency() -> None:
    """``bench/soak.py steady`` for 25 s (RELIABILITY L5 runs it for hours by hand), with half the connections
    replaced every minute, the heap frozen as under twistd: connections come back, descriptors beyond the
    connections stay constant (give or take the ones closing at the instant of a sample), chats are delivered,
    the summary is printed."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "steady", "--minutes", "0.4", "--warmup", "0.1", "--connections",
         "200", "--rate", "20", "--churn", "0.5", "--sample-seconds", "5", "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1] == " " and len(line.split()) == 10]
    assert len(rows) >= 3, proc.stdout
    assert all(195 <= int(row[3]) <= 201 for row in rows), "200 members and the publisher, in every sample"
    overheads = [int(row[4]) for row in rows]
    assert max(overheads) - min(overheads) <= 5, "open fds = connections + a constant"
    assert all(int(float(row[6])) > 0 and row[9] == "0" for row in rows), "chats delivered, no failed connection"
    assert int(rows[-1][8]) > 0, "connections were replaced"
    assert "rss slope" in proc.stdout and "p99" in proc.stdout
    assert "froze" in proc.stdout, "the soak's server keeps its heap as twistd roomserver does"


@pytest.mark.parametrize(("argv", "expected"), [
    (["slowloris", "--sockets", "100", "--deadline", "1", "--probes", "10", "--workers", "2"],
     ["sockets: 100 closed, ", "open at 3x the deadline: 0", "failures: 0 []"]),
    (["silent", "--connections", "100", "--deadline", "1", "--workers", "2"],
     ["connections: 100 closed, ", "close codes: {1008: 100}", "failures: 0 []"]),
    (["fragments", "--repeat", "1"], ["close codes Counter({'1008': 1})", "'too_many_fragments': 1"]),
    (["bomb", "--repeat", "1"], ["close codes Counter({'1009': 1})"]),
], ids=["slowloris", "silent", "fragments", "bomb"])
def test_attacks_bench_measures_every_attacker(argv: list[str], expected: list[str]) -> None:
    """``bench/attacks.py`` scaled down (RELIABILITY H1, A3, P9 and P10 run it at full scale by hand): every
    attacker is cut by the server with the right code and measured, and the run reports its figures and a
    verdict (not asserted: how close to the deadline, the probe's p99, CPU and RSS are figures for the run by
    hand)."""
    proc = subprocess.run([sys.executable, "-m", "bench.attacks", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in expected:
        assert text in proc.stdout, proc.stdout
    assert proc.stdout.rstrip().split("\n")[-1] in ("PASS", "FAIL"), proc.stdout
