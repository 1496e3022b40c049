"""The benchmark tools themselves (benchmarks/run.py, linear.py and plot.py) on tiny sizes:
the rows they write and the plot they draw. (The speed itself is measured by
the benchmarks, never asserted by a test.)"""

import csv

import pytest
import torch

from benchmarks import plot, run


@pytest.fixture(scope="module")
def bench_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "rows.csv"
    run.main(
        ["--device", "cpu", "--sizes", "8x64,8x128,16x64", "--providers", "kdfused,eager"]
        + ["--modes", "forward,full", "--warmup", "0", "--reps", "1", "--csv", str(path)]
    )
    return path


def test_rows_name_their_conditions(bench_csv):
    with open(bench_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2  # sizes x providers x modes
    for row in rows:
        assert row["device"] and row["torch"] and row["commit"] and row["date"]
        assert row["dtype"] == "float32" and row["divergence"] == "forward_kl"
        assert float(row["ms"]) > 0 and float(row["peak_nv"]) >= 0
        has_bandwidth = row["provider"] == "kdfused" and row["mode"] == "full"
        assert bool(row["pct_of_copy"]) == has_bandwidth
    assert {(r["n"], r["v"]) for r in rows} == {("8", "64"), ("8", "128"), ("16", "64")}


def test_several_divergences(tmp_path):
    """One run over several divergences: a row per divergence, each named, and
    the markdown table gets a divergence column."""
    path, md = tmp_path / "rows.csv", tmp_path / "rows.md"
    run.main(
        ["--device", "cpu", "--sizes", "8x64", "--providers", "kdfused", "--warmup", "0"]
        + ["--reps", "1", "--divergence", "jsd,forward_kl", "--csv", str(path), "--md", str(md)]
    )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["divergence"] for r in rows] == ["jsd", "forward_kl"]
    assert "| divergence | provider |" in md.read_text()
    with pytest.raises(SystemExit):
        run.main(["--device", "cpu", "--divergence", "kl"])


def test_plot(bench_csv, tmp_path):
    out = tmp_path / "plot.png"
    plot.main([str(bench_csv), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = plot.load(str(bench_csv))
    assert plot.most_varied(rows, "n", "v") == 8  # N = 8 has two V values
    assert plot.most_varied(rows, "v", "n") == 64  # V = 64 has two N values


def test_plot_refuses_rows_of_several_runs(bench_csv, tmp_path):
    with open(bench_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    next(r for r in rows if r["mode"] == "full")["commit"] = "other"
    mixed = tmp_path / "mixed.csv"
    with open(mixed, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match="rows of several runs"):
        plot.load(str(mixed))
    with pytest.raises(SystemExit, match="no full-step jsd rows"):
        plot.load(str(bench_csv), divergence="jsd")


@pytest.mark.parametrize("interleave", [False, True])
def test_interleave_takes_turns(interleave):
    calls = []

    def loss(tag):
        def fn(s, t, y):
            calls.append(tag)
            return s.sum()

        return fn

    inputs = run.make_inputs(2, 8, run.torch.float32, "cpu")
    results = run.bench_cases(
        [(loss("a"), "forward"), (loss("b"), "forward")], inputs, "cpu", 1, 2, interleave
    )
    assert len(results) == 2 and all(seconds > 0 for seconds, _ in results)
    timed = calls[:6]  # 3 runs each (1 warm-up + 2), then one peak-memory step each
    assert timed == (["a", "b"] * 3 if interleave else ["a"] * 3 + ["b"] * 3)
    assert calls[6:] == ["a", "b"]


def test_fused_linear_cli(tmp_path):
    """benchmarks/linear.py: a row per provider and mode, each naming its
    conditions; full steps are given against the matmul floor of the same run."""
    from benchmarks import linear

    path, md = tmp_path / "rows.csv", tmp_path / "rows.md"
    linear.main(
        ["--device", "cpu", "--sizes", "16x8x12x300", "--providers", "kdfused,eager,matmuls"]
        + ["--modes", "forward,full", "--warmup", "0", "--reps", "1"]
        + ["--csv", str(path), "--md", str(md)]
    )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("kdfused", "eager", "matmuls") for m in ("forward", "full")
    }
    for row in rows:
        assert row["device"] and row["torch"] and row["commit"] and row["dtype"] == "float32"
        assert (row["n"], row["hs"], row["ht"], row["v"]) == ("16", "8", "12", "300")
        assert float(row["ms"]) > 0
        assert bool(row["vs_matmuls"]) == (row["mode"] == "full")
    floor = next(r for r in rows if r["provider"] == "matmuls" and r["mode"] == "full")
    assert float(floor["vs_matmuls"]) == 1.0
    assert "| provider | mode | n | hs | ht | v |" in md.read_text()
    with pytest.raises(ValueError, match="NxHsxHtxV"):
        linear.LinearSize.parse("16x300")


def test_fused_linear_floor_is_the_four_products():
    """The floor provider's gradients are exactly G W and G^T h for the
    stand-in G (the student's logits): nothing else is timed with them."""
    from benchmarks import linear

    h = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(7, 3, requires_grad=True)
    linear._MatmulFloor.apply(h, w, torch.randn(5, 4), torch.randn(7, 4)).backward()
    g = (h @ w.t()).detach()
    torch.testing.assert_close(h.grad, g @ w.detach())
    torch.testing.assert_close(w.grad, g.t() @ h.detach())


def test_options_comparison():
    """benchmarks/options.py: the three cases, each timed, the default first."""
    from benchmarks import options

    rows = options.main(["--device", "cpu", "--sizes", "8x300", "--warmup", "0", "--reps", "1"])
    assert [name for *_, name, _, _ in rows] == [
        "default",
        "label_smoothing=0.1",
        "teacher +64 columns, truncate",
    ]
    assert all(seconds > 0 for *_, seconds, _ in rows) and rows[0][-1] == 1.0


def test_parallel_benchmark_runs(capsys):
    """benchmarks/parallel.py at a small size: W = 1 and 2 over gloo, and the
    bytes a rank receives against a logits all-gather's."""
    from benchmarks import parallel

    rows = parallel.main(
        ["--sizes", "16x200", "--worlds", "1,2", "--reps", "1", "--divergences", "jsd"]
    )
    assert [r[3] for r in rows] == [1, 2] and all(r[4] > 0 for r in rows)
    assert rows[1][5:] == (56, 2 * 100 * 4)  # (12 + 2) floats vs the other shard, both models
    assert "a logits all-gather 800" in capsys.readouterr().out


def test_sparse_benchmark_checksum_and_ragged(capsys):
    """benchmarks/sparse.py --checksum and --ragged at a small size: every case
    timed; the first-read step and verify() measured; ragged rows named
    against fixed k."""
    pytest.importorskip("safetensors")
    from benchmarks import sparse as sparse_bench

    rows = sparse_bench.main(
        ["--device", "cpu", "--sizes", "64x500", "--k", "8", "--reps", "1", "--checksum"]
        + ["--shard-rows", "256"]
    )
    assert [r[3] for r in rows] == ["first read", "verify MB/s"]
    assert all(r[4] > 0 for r in rows)
    assert "steps: " in capsys.readouterr().out
    rows = sparse_bench.main(
        ["--device", "cpu", "--sizes", "64x500", "--k", "8", "--reps", "1", "--warmup", "0"]
        + ["--ragged"]
    )
    assert len(rows) == 5 and rows[-1][3] == "fixed k=8" and rows[-1][5] == 1.0
    assert all(r[4] > 0 for r in rows)
