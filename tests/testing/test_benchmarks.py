"""The benchmark scripts built on the fake upstream still run end to end (short, Python load generator)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
QUICK = ["--duration", "1", "--warmup", "0", "--tool", "python", "--no-pin", "--quiet-timeout", "0"]


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_overhead_measures_all_three_targets(tmp_path: Path) -> None:
    """overhead.py drives direct, minimal and orq-proxy for both shapes without errors."""
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(BENCHMARKS / "overhead.py"),
        *QUICK,
        "--concurrency",
        "2",
        "--json-out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())
    assert {(r["case"], r["target"]) for r in rows} == {
        (case, target) for case in ("json", "stream") for target in ("direct", "minimal", "orq-proxy")
    }
    for row in rows:
        assert row["requests"] > 0, row
        assert row["errors"] == 0, row
        assert row["cpu_ms_per_req"] > 0, row
    assert all(r["x_minimal"] == 1.0 for r in rows if r["target"] == "minimal")


def test_compare_runs_orq_variants_and_writes_outputs(tmp_path: Path) -> None:
    """compare.py starts orq-proxy with a layer swapped out, creates its budget, and writes md/json."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(BENCHMARKS / "compare.py"), "--quick", *QUICK, "--ttfb", "0"]
    cmd += [
        "--targets",
        "minimal,orq-full,orq-bare",
        "--cases",
        "json",
        "--concurrency",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["target"] for r in data["rows"]] == ["minimal", "orq-full", "orq-bare"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in data["rows"])
    assert data["skipped"] == []
    assert "| orq-bare |" in out.with_suffix(".md").read_text()
    # The budget was matched and charged on every request of orq-full.
    assert "orq-full budget usage after the run" in done.stdout
    assert "'requests': 0" not in done.stdout


def test_profile_summary_attributes_self_time_to_layers(tmp_path: Path) -> None:
    """py-spy's collapsed stacks are summarised by innermost known layer and by function."""
    overhead = load("overhead")
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "run (uvicorn/main.py:1);__call__ (/x/orq_proxy/proxy/request.py:9);"
        "insert (/x/orq_proxy/sinks/duckdb.py:3) 3\n"
        "run (uvicorn/main.py:1);send (site-packages/uvicorn/protocols/http/httptools_impl.py:5) 1\n"
        "garbage line\n"
    )
    summary = overhead.analyse_profile(raw)
    assert "4 samples" in summary
    assert " 75.0%  orq_proxy sinks" in summary
    assert " 25.0%  uvicorn server" in summary
    assert "100.0%  run (uvicorn/main.py)" in summary


def test_layers_measures_variants_against_bare() -> None:
    """layers.py runs the full stack and its baseline in process, JSON and stream, and prints both."""
    for extra in ([], ["--stream"]):
        cmd = [sys.executable, str(BENCHMARKS / "layers.py"), "--variants", "orq-full", "--rounds", "1"]
        result = subprocess.run(
            [*cmd, "--requests", "40", *extra], capture_output=True, text=True, timeout=120, check=True
        )
        lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  orq-")}
        assert set(lines) == {"orq-full", "orq-bare"}, result.stdout
        assert "+0.0 us vs orq-bare" in lines["orq-bare"] and "1.00x" in lines["orq-bare"]


def test_upstream_client_compares_the_pool_with_aiohttp() -> None:
    """upstream_client.py drives both clients against the fake upstream and prints each against aiohttp."""
    cmd = [sys.executable, str(BENCHMARKS / "upstream_client.py"), "--requests", "200", "--concurrency", "4"]
    result = subprocess.run([*cmd, "--rounds", "1"], capture_output=True, text=True, timeout=120, check=True)
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert set(lines) == {"aiohttp", "orq-pool"}, result.stdout
    assert lines["aiohttp"].count("1.00x aiohttp") == 2
    assert "us CPU/request" in lines["orq-pool"] and "req/s" in lines["orq-pool"]
