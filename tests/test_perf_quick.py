"""The perf harness end to end on its tiny grid (`python -m perf.sweep --quick`, the torch path
on a CPU): every op writes a CSV, a Markdown summary and PNG plots whose rows have positive
times. Nothing here is about speed."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # perf/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from perf import sweep  # noqa: E402
from perf.cases import OPS, grid  # noqa: E402


@pytest.fixture(scope="module", params=OPS)
def quick_run(request, tmp_path_factory):
    """(op, results folder, exit status) of one quick sweep of `op`."""
    out = tmp_path_factory.mktemp(f"perf-{request.param}")
    rc = sweep.main(["--op", request.param, "--quick", "--out", str(out), "--no-progress"])
    return request.param, out, rc


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_quick_sweep_exits_cleanly(quick_run):
    op, _, rc = quick_run
    assert rc == 0, f"perf.sweep --op {op} --quick exited with {rc}"


def test_quick_csv_has_every_point_with_positive_times(quick_run):
    op, out, _ = quick_run
    path = out / f"{op}-quick.csv"
    assert path.is_file(), f"{path} was not written"
    header = path.read_text().splitlines()
    assert any(line.startswith("# torch:") for line in header)
    assert any(line.startswith("# commit:") for line in header)
    rows = _rows(path)
    ops = [r for r in rows if r["provider"] == "op"]
    assert len(ops) == len(grid(op, "quick")), f"{len(ops)} op rows for {op}"
    assert {r["provider"] for r in rows} >= {"op", "copy"}
    if op == "decode":
        assert {r["provider"] for r in rows} >= {"sdpa", "restore+sdpa"}
    for r in rows:
        for col in ("median_ms", "p20_ms", "p80_ms", "gbps", "bytes"):
            assert float(r[col]) > 0, f"{col} = {r[col]!r} in {r}"
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert 0 < float(r["compressed_vs_dense"]) < 1.5


def test_quick_markdown_has_the_table_and_targets(quick_run):
    op, out, _ = quick_run
    text = (out / f"{op}-quick.md").read_text()
    assert "## Targets" in text and f"## {op}" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(grid(op, "quick")), table   # header + one row a point
    assert "- torch:" in text and "- triton:" in text and "- commit:" in text


def test_quick_plots_are_png(quick_run):
    pytest.importorskip("matplotlib")
    op, out, _ = quick_run
    for name in ("bandwidth", "roofline"):
        path = out / f"{op}-quick-{name}.png"
        assert path.is_file(), f"{path} was not written"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_where_every_point_fails(tmp_path, monkeypatch, capsys):
    """An op that fails at every point: exit 1 with an ERROR line per point on stderr, the CSV
    and Markdown written, and no plot (nothing to draw), rather than a plotting traceback."""
    monkeypatch.setenv("MINITRITON_BACKEND", "bogus")
    rc = sweep.main(["--op", "merge", "--quick", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("ERROR merge ")]
    assert len(errors) == len(grid("merge", "quick"))
    assert all("MINITRITON_BACKEND: expected one of" in line for line in errors)
    assert "nothing was measured: no PNG plots" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge-quick.csv", "merge-quick.md"]


def _fake_point(op, S, B, times_ms, bytes_=1 << 30):
    """Rows of one point as the sweep makes them, from median times per provider."""
    from perf import report

    rows = []
    for prov, ms in times_ms.items():
        rows.append({"op": op, "dtype": "bfloat16", "shape": f"B={B} S={S}", "B": B, "S": S,
                     "provider": prov, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                     "host_ms": None, "bytes": bytes_, "flops": 1, "in_bytes": 64 << 20})
    report.fill_derived(rows)
    return rows


def test_targets_report_pass_miss_and_na():
    from perf import report

    fast = _fake_point("decode", 8192, 8, {"op": 1.0, "copy": 0.9, "sdpa": 1.1,
                                           "restore+sdpa": 3.5})
    slow = _fake_point("decode", 32768, 8, {"op": 1.0, "copy": 0.8, "sdpa": 0.9,
                                            "restore+sdpa": 2.0})
    lines = report.evaluate_targets(fast + slow)
    by_start = {line.split(":")[0]: line for line in lines}
    assert len(lines) == 4, lines            # the decode targets only: no merge point was swept
    bw = next(v for k, v in by_start.items() if "85% of copy" in k)
    assert bw.startswith("MISS") and "worst 80.0 %" in bw and "B=8 S=32768" in bw, bw
    assert next(v for k, v in by_start.items() if "restore + sdpa" in k).startswith("MISS")
    assert next(v for k, v in by_start.items() if "latency" in k).startswith("n/a")
    lines = report.evaluate_targets(fast)
    assert all(line.startswith("PASS") for line in lines if "latency" not in line), lines


def test_contention_bench_end_to_end(tmp_path, capsys):
    """`perf/bench_cpu_contention.py` on a tiny point: every OpenMP setting on idle cores and
    beside the busy neighbour, each in its own process, in the Markdown and JSON it writes."""
    from perf import bench_cpu_contention
    assert bench_cpu_contention.main(["--shape", "1,2,8,16", "--rounds", "1",
                                      "--out", str(tmp_path)]) == 0
    import json
    data = json.loads((tmp_path / "bench_cpu_contention.json").read_text())
    rows = data["results"]
    assert [(r["load"], r["setting"]) for r in rows] == [
        (load, name) for load in ("idle", "busy neighbour")
        for name, _ in bench_cpu_contention.SETTINGS]
    assert all(r["merge"] > 0 and r["add"] > 0 for r in rows)
    assert [r["threads"] for r in rows if r["setting"] == "1 thread"] == [1, 1]
    table = (tmp_path / "bench_cpu_contention.md").read_text()
    assert table.count("| busy neighbour |") == 3 and "commit" in table
    with pytest.raises(SystemExit):
        bench_cpu_contention.main(["--shape", "1,2,8"])
    assert "expected B,H,S,D" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_cpu_contention.main(["--shape", "1,2,8,8"])
    assert "head dim D=8 is outside the supported [16, 256]" in capsys.readouterr().err


def test_contention_bench_refuses_a_dead_neighbour(tmp_path, monkeypatch):
    """Busy figures are never idle ones: a neighbour that exits stops the run."""
    from perf import bench_cpu_contention
    monkeypatch.setattr(bench_cpu_contention, "SETTINGS", bench_cpu_contention.SETTINGS[:1])
    monkeypatch.setattr(bench_cpu_contention, "NEIGHBOUR", "import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"the busy neighbour exited \(3\)"):
        bench_cpu_contention.main(["--shape", "1,2,8,16", "--rounds", "1", "--out",
                                   str(tmp_path)])
    assert not (tmp_path / "bench_cpu_contention.md").exists()
