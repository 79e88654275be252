"""The Autobahn TestSuite in CI: autobahn-testsuite/run.py against a real ``twistd roomserver --testee``.

``make compliance`` runs all 517 cases (about ten minutes); here the CI subset (fuzzingclient-ci.json: every case
outside 12.x/13.x plus a representative set of the compression cases) runs in well under a minute, and fails on
any case that is not OK, NON-STRICT or INFORMATIONAL. The runner itself is tested too: a server that is not an
echo server, or a testee without compression, must make it fail.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "autobahn-testsuite"
CI_SPEC = SUITE / "fuzzingclient-ci.json"
CASES_OUTSIDE_12_13 = 301  # groups 1-7, 9 and 10 of the Autobahn TestSuite


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("autobahn_run", SUITE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


runner = load_runner()


def run_suite(spec: Path, outdir: Path, *extra: str, timeout: float = 300) -> tuple[int, str, dict[str, Any]]:
    process = subprocess.run(
        [sys.executable, str(SUITE / "run.py"), "--spec", str(spec), "--outdir", str(outdir), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    summary_file = outdir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return process.returncode, process.stdout + process.stderr, summary


def write_spec(path: Path, twistd: list[str], cases: list[str]) -> Path:
    spec = json.loads(CI_SPEC.read_text())
    spec["servers"][0]["twistd"] = twistd
    spec["cases"] = cases
    path.write_text(json.dumps(spec))
    return path


def test_ci_subset_of_the_autobahn_testsuite_passes(tmp_path: Path) -> None:
    """Every case outside 12.x/13.x and the chosen compression cases: none FAILED, none UNIMPLEMENTED."""
    spec = json.loads(CI_SPEC.read_text())
    compression_cases = [case for case in spec["cases"] if case.split(".")[0] in ("12", "13")]
    assert len(compression_cases) >= 10 and "*" not in "".join(compression_cases)
    code, output, summary = run_suite(CI_SPEC, tmp_path / "report")
    assert code == 0, output
    results = summary["results"]
    assert len(results) == CASES_OUTSIDE_12_13 + len(compression_cases), output
    assert set(summary["groups"]) == {"1", "2", "3", "4", "5", "6", "7", "9", "10", "12", "13"}
    assert all(result["verdict"] in ("OK", "NON-STRICT", "INFORMATIONAL") for result in results.values())
    assert all(results[case]["verdict"] == "OK" for case in compression_cases), "deflate was negotiated"
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "index.json").exists()
    log = (tmp_path / "report" / "testee.log").read_text()
    assert "Traceback" not in log and "Unhandled" not in log


def test_runner_fails_when_the_server_does_not_conform(tmp_path: Path) -> None:
    """The room endpoint is not an echo server (it sends a welcome first): the echo cases must FAIL and the
    runner must exit non-zero, so a broken testee can never look green."""
    spec = write_spec(tmp_path / "spec.json", ["roomserver"], ["1.1.1", "2.2"])
    code, output, summary = run_suite(spec, tmp_path / "report", timeout=120)
    assert code == 1, output
    assert {result["verdict"] for result in summary["results"].values()} == {"FAILED"}
    assert "not OK / NON-STRICT / INFORMATIONAL" in output


def test_runner_fails_on_unimplemented_compression(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.json", ["roomserver", "--testee", "--no-compression"], ["12.1.1"])
    code, output, summary = run_suite(spec, tmp_path / "report", timeout=120)
    assert code == 1, output
    assert summary["results"]["12.1.1"]["verdict"] == "UNIMPLEMENTED"


@pytest.mark.parametrize(("behavior", "close", "expected"), [
    ("OK", "OK", "OK"),
    ("NON-STRICT", "OK", "NON-STRICT"),
    ("OK", "INFORMATIONAL", "INFORMATIONAL"),
    ("INFORMATIONAL", "INFORMATIONAL", "INFORMATIONAL"),
    ("UNIMPLEMENTED", "OK", "UNIMPLEMENTED"),
    ("OK", "WRONG CODE", "FAILED"),
    ("OK", "UNCLEAN", "FAILED"),
    ("OK", "FAILED BY CLIENT", "FAILED"),
    ("ERROR", "OK", "FAILED"),
    ("FAILED", "OK", "FAILED"),
])
def test_case_verdict_is_the_worse_of_both(behavior: str, close: str, expected: str) -> None:
    assert runner.verdict(behavior, close) == expected


def test_summary_table_counts_per_group() -> None:
    groups = runner.summarize({"1.1.1": "OK", "1.1.2": "NON-STRICT", "10.1.1": "OK", "2.1": "FAILED"})
    assert list(groups) == ["1", "2", "10"]
    table = runner.render_table(groups)
    assert "| 1 Framing | 2 | 1 | 1 | 0 | 0 | 0 |" in table
    assert "| **all** | 4 | 2 | 1 | 0 | 0 | 1 |" in table


def test_spec_with_options_kosoku_cannot_honour_is_refused(tmp_path: Path) -> None:
    spec = json.loads(CI_SPEC.read_text())
    spec["options"] = {"failByDrop": False}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(runner.SpecError, match="failByDrop"):
        runner.load_spec(tmp_path / "spec.json")
    full = runner.load_spec(SUITE / "fuzzingclient.json")
    assert full.cases == ["*"] and full.exclude_cases == [] and "--compression" in full.twistd_args
