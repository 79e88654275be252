#!/usr/bin/env python3
"""Run the Autobahn TestSuite (fuzzingclient mode, through kosoku) against roomserver's testee.

    python autobahn-testsuite/run.py                          # every case of fuzzingclient.json (make compliance)
    python autobahn-testsuite/run.py --spec autobahn-testsuite/fuzzingclient-ci.json   # the CI subset
    python autobahn-testsuite/run.py --cases '6.*' '7.*'      # override the spec's case selection
    python autobahn-testsuite/run.py --url ws://127.0.0.1:9001/ws   # a testee you started yourself

The spec is wstest's fuzzingclient format (``outdir``, ``servers``, ``cases``, ``exclude-cases``,
``exclude-agent-cases``, ``options``), read here because kosoku's own ``--spec`` is not implemented. Two keys are
ours: a server's ``twistd`` lists the ``twistd`` arguments that start it, and ``options`` holds the runner's
settings (only ``concurrency``, the number of cases run in parallel; wstest's protocol options have no kosoku
equivalent, so anything else is refused rather than silently ignored).

Unless ``--url`` is given, the script starts the testee as users would run it, as a real ``twistd roomserver``
subprocess (``--testee`` and whatever the spec adds) on a free loopback port, and stops it at the end. It then
runs the cases, writes kosoku's HTML/JSON report (``index.html``, ``index.json``, one file per case) and our
``summary.json`` into the spec's ``outdir`` (relative to this directory; ``reports/`` is git-ignored), prints the
verdict counts per case group and exits with status 1 if any case is not OK, NON-STRICT or INFORMATIONAL
(status 2 when the run itself could not be made).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SPEC = HERE / "fuzzingclient.json"

GROUPS = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved Bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 Handling",
    "7": "Close Handling",
    "9": "Limits/Performance",
    "10": "Miscellaneous",
    "12": "Compression (payloads)",
    "13": "Compression (parameters)",
}

VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
PASSING = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
# The worse of a case's two verdicts (message exchange, closing handshake) is the case's verdict.
_RANK = {"OK": 0, "INFORMATIONAL": 1, "NON-STRICT": 2, "UNIMPLEMENTED": 3, "FAILED": 4}
KNOWN_OPTIONS = frozenset({"concurrency"})


class SpecError(Exception):
    """The spec file cannot be used as it is."""


@dataclass(frozen=True)
class Spec:
    outdir: Path
    agent: str
    url: str
    twistd_args: list[str]
    cases: list[str]
    exclude_cases: list[str]
    concurrency: int


def load_spec(path: Path) -> Spec:
    """Read a wstest fuzzingclient spec (one server) and check every key we rely on."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from exc
    servers = raw.get("servers")
    if not isinstance(servers, list) or len(servers) != 1:
        raise SpecError(f"{path}: 'servers' must list exactly one server (the roomserver testee)")
    server = servers[0]
    options = raw.get("options", {})
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise SpecError(f"{path}: unsupported options {sorted(unknown)} (kosoku only takes {sorted(KNOWN_OPTIONS)})")
    agent = server.get("agent", "roomserver")
    excluded = list(raw.get("exclude-cases", [])) + list(raw.get("exclude-agent-cases", {}).get(agent, []))
    outdir = Path(raw.get("outdir", "./reports/servers"))
    return Spec(
        outdir=outdir if outdir.is_absolute() else (HERE / outdir).resolve(),
        agent=agent,
        url=server["url"],
        twistd_args=list(server.get("twistd", ["roomserver", "--testee"])),
        cases=list(raw.get("cases", ["*"])),
        exclude_cases=excluded,
        concurrency=int(options.get("concurrency", 1)),
    )


# -- the testee ----------------------------------------------------------------------------------------------------

_LISTENING = re.compile(r"roomserver listening on .*port=(\d+)")


def twistd_command() -> list[str]:
    """``twistd`` of this interpreter's environment (the one that has roomserver's dependencies)."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("twistd")
    if found is None:
        raise SpecError("twistd not found: install roomserver's dependencies (make install)")
    return [found]


@contextmanager
def testee(twistd_args: Sequence[str], path: str, log_file: Path, timeout: float = 30.0) -> Iterator[str]:
    """Run ``twistd -n <twistd_args>`` on a free loopback port; yields its ws:// URL; SIGTERM at the end.

    The port is chosen by the kernel (``tcp:0``) and read back from the server's own log line, so there is no
    window in which another process could take it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(log_file), *twistd_args,
               "--port", "tcp:0:interface=127.0.0.1", "--path", path]
    process = subprocess.Popen(command, cwd=log_file.parent, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        port = _wait_for_port(process, log_file, timeout)
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _wait_for_port(process: subprocess.Popen[bytes], log_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        match = _LISTENING.search(text)
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise SpecError(f"the testee exited with status {process.returncode}:\n{text}")
        time.sleep(0.05)
    raise SpecError(f"the testee did not start listening within {timeout:.0f}s (log: {log_file})")


# -- verdicts ------------------------------------------------------------------------------------------------------


def verdict(behavior: str, behavior_close: str) -> str:
    """One verdict per case from kosoku's two: anything that is not a known passing or UNIMPLEMENTED label
    (FAILED, WRONG CODE, UNCLEAN, FAILED BY CLIENT, ERROR, ...) is FAILED."""
    ranked = [label if label in _RANK else "FAILED" for label in (behavior, behavior_close)]
    return max(ranked, key=_RANK.__getitem__)


def group_of(case_id: str) -> str:
    return case_id.split(".", 1)[0]


def summarize(cases: dict[str, str]) -> dict[str, Counter[str]]:
    """Verdict counts per group, groups in numeric order."""
    groups: dict[str, Counter[str]] = {}
    for case_id in sorted(cases, key=lambda c: [int(p) for p in c.split(".")]):
        groups.setdefault(group_of(case_id), Counter())[cases[case_id]] += 1
    return groups


def render_table(groups: dict[str, Counter[str]]) -> str:
    """The per-group summary as a Markdown table (what docs/compliance.md shows)."""
    lines = ["| group | cases | " + " | ".join(VERDICTS) + " |", "|---|---:|" + "---:|" * len(VERDICTS)]
    total: Counter[str] = Counter()
    for group, counts in groups.items():
        total.update(counts)
        name = f"{group} {GROUPS.get(group, '')}".strip()
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(str(counts[v]) for v in VERDICTS) + " |")
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[v]) for v in VERDICTS) + " |")
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------------------------


def run_cases(url: str, cases: Sequence[str], exclude: Sequence[str], concurrency: int) -> list[Any]:
    """Run the cases with kosoku; its FailureError still carries every result, which is what we want."""
    import kosoku

    async def run() -> list[Any]:
        try:
            return list(await kosoku.run_fuzzingclient(url, list(cases), list(exclude), concurrency))
        except kosoku.FailureError as failure:
            return list(failure.results)

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="wstest fuzzingclient spec (JSON)")
    parser.add_argument("--cases", nargs="+", help="case ids or globs (replaces the spec's 'cases')")
    parser.add_argument("--exclude-cases", nargs="+", help="case ids or globs (replaces 'exclude-cases')")
    parser.add_argument("--concurrency", type=int, help="cases run in parallel (default: the spec's)")
    parser.add_argument("--outdir", type=Path, help="report directory (default: the spec's outdir)")
    parser.add_argument("--url", help="test this already running server instead of starting the testee")
    args = parser.parse_args(argv)
    # SIGTERM (CI cancelling the job, a timeout) must still stop the testee: turn it into SystemExit so the
    # ``testee`` context manager's cleanup runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    cases = args.cases or spec.cases
    exclude = args.exclude_cases if args.exclude_cases is not None else spec.exclude_cases
    concurrency = args.concurrency or spec.concurrency
    outdir: Path = (args.outdir or spec.outdir).resolve()
    if outdir.exists():
        shutil.rmtree(outdir)  # a report must never mix cases of two runs
    outdir.mkdir(parents=True)

    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    try:
        if args.url:
            results = run_cases(args.url, cases, exclude, concurrency)
            target = args.url
        else:
            path = urlsplit(spec.url).path or "/"
            with testee(spec.twistd_args, path, outdir / "testee.log") as url:
                print(f"testee: twistd {' '.join(spec.twistd_args)} at {url}", flush=True)
                results = run_cases(url, cases, exclude, concurrency)
            target = f"twistd {' '.join(spec.twistd_args)}"
    except SpecError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - clock
    if not results:
        print(f"run.py: no case matches {list(cases)} minus {list(exclude)}", file=sys.stderr)
        return 2

    from kosoku._report import write_reports

    write_reports(results, str(outdir))
    verdicts = {r.case_id: verdict(r.behavior.value, r.behavior_close.value) for r in results}
    groups = summarize(verdicts)
    bad = {case_id: v for case_id, v in verdicts.items() if v not in PASSING}
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
        "target": target,
        "spec": str(args.spec),
        "cases": list(cases),
        "exclude_cases": list(exclude),
        "concurrency": concurrency,
        "groups": {group: {v: counts[v] for v in VERDICTS} for group, counts in groups.items()},
        "results": {
            r.case_id: {"verdict": verdicts[r.case_id], "behavior": r.behavior.value,
                        "behaviorClose": r.behavior_close.value, "remoteCloseCode": r.remote_close_code,
                        "duration_ms": r.duration}
            for r in results
        },
    }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(render_table(groups))
    print(f"\n{len(results)} cases in {elapsed:.0f}s (concurrency {concurrency}); report: {outdir / 'index.html'}")
    for case_id, v in bad.items():
        result = next(r for r in results if r.case_id == case_id)
        print(f"  {v} {case_id}: {result.behavior.value}/{result.behavior_close.value}: {result.result} "
              f"{result.result_close} (close code {result.remote_close_code})")
    if bad:
        print(f"{len(bad)} case(s) not OK / NON-STRICT / INFORMATIONAL", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
