"""benchmarks/fashion_mnist*.py: the rows of docs/results-fashion-mnist.md, one JSON line each, the table
(mean ± std over seeds, identical random twins merged) and the probe-vs-CPU-time plot, tried tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, lgen_env
from tests.test_fashion_mnist import needs_real_files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fashion_mnist_table import aggregate, markdown, plain  # noqa: E402


def row(name, kind="trained", seed=0, **metrics):
    base = {"all": 0.8, "10%": 0.7, "1%": 0.6, "knn20": 0.75, "nmi": 0.5}
    return {"name": name, "kind": kind, "seed": seed, **base, **metrics}


def test_table_averages_seeds_and_merges_identical_random_twins():
    rows = [
        row("A", seed=0, all=0.80, cpu_seconds=600, epochs=5),
        row("A", seed=1, all=0.84, cpu_seconds=540, epochs=5),
        row("B", seed=0, all=0.70),
        row("`a_fashion_mnist`, random init", kind="random init"),
        row("`b_fashion_mnist`, random init", kind="random init"),  # the same architecture: same numbers
        row("`c_fashion_mnist`, random init", kind="random init", all=0.5),
    ]
    entries = aggregate(rows)
    a = next(e for e in entries if e["name"] == "A")
    assert (
        a["seeds"] == 2
        and a["all"] == pytest.approx(0.82)
        and a["all_std"] == pytest.approx(0.0283, abs=1e-4)
    )
    assert a["cpu_seconds"] == pytest.approx(570)
    names = [e["name"] for e in entries]
    assert "random init of `a_fashion_mnist`, `b_fashion_mnist`" in names
    assert "`c_fashion_mnist`, random init" in names
    table = markdown(entries)
    assert (
        "| A | 82.0 ± 2.8 | 70.0 ± 0.0 | 60.0 ± 0.0 | 75.0 ± 0.0 | 0.500 ± 0.000 |  | 5 | 9.5 min | 2 |"
        in table
    )
    assert "| B | 70.0 | 70.0 | 60.0 | 75.0 | 0.500 |  |  |  | 1 |" in table  # one seed: no ±, marked 1
    assert plain("[BYOL](methods/byol.md) (`byol_fashion_mnist`)") == "BYOL"  # the plot's labels


def test_page_order_puts_methods_best_first_and_bolds_each_columns_best_method():
    from fashion_mnist_table import ordered

    rows = [
        row("raw pixels (784 values)", kind="raw pixels", all=0.84),
        row("A", all=0.85, knn20=0.90),
        row("supervised baseline (`supervised_fashion_mnist`): its encoder's features", all=0.95),
        row("B", all=0.88),
        row("`a_fashion_mnist`, random init", kind="random init", all=0.83),
    ]
    entries = ordered(aggregate(rows))
    assert [e["name"][:10] for e in entries] == ["B", "A", "supervised", "`a_fashion", "raw pixels"]
    lines = markdown(entries, bold_best=True).splitlines()
    assert lines[2].startswith("| B | **88.0** | **70.0** |")  # ties are bold on every tied row
    assert lines[3].startswith("| A | 85.0 | **70.0** | **60.0** | **90.0** |")
    assert "**" not in lines[4] + lines[5] + lines[6]  # references are never bold, even when higher


def test_page_option_writes_the_table_between_the_pages_markers(tmp_path):
    rows, page = tmp_path / "rows.jsonl", tmp_path / "page.md"
    rows.write_text(json.dumps(row("A", all=0.81)) + "\n")
    page.write_text(
        "intro\n<!-- fashion_mnist_ssl:begin -->\nold table\n<!-- fashion_mnist_ssl:end -->\nprose\n"
    )
    script = [sys.executable, str(ROOT / "benchmarks/fashion_mnist_table.py"), str(rows), "--page", str(page)]
    subprocess.run(script, check=True, capture_output=True, cwd=ROOT)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("\nprose\n") and "old table" not in text
    assert "| A | **81.0** |" in text


def test_a_later_line_for_the_same_row_and_seed_wins(tmp_path):
    from fashion_mnist_table import read_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(json.dumps(r) for r in (row("A", all=0.1), row("A", all=0.9), row("A", seed=1))) + "\n"
    )
    assert sorted(r["all"] for r in read_rows(rows)) == [0.8, 0.9]


@needs_real_files
def test_a_tiny_row_from_training_to_table_and_plot(lgen, tmp_path):
    """What fashion_mnist.sh does for one row: train (2 steps here), evaluate on the first 300 images of
    every split (probes, kNN, k-means NMI, random twin, raw pixels) appending JSON lines, tabulate, plot."""
    fast = [
        o for o in FAST if not o.startswith(("data.image_size", "data.batch_size", "trainer.limit_train"))
    ]
    lgen(
        "train",
        "experiment=byol_fashion_mnist",
        *fast,
        "data.root=nowhere",
        "seed=0",
        "run_id=s0",
        "data.batch_size=32",
        "trainer.limit_train_batches=2",
    )
    ckpt = lgen.cwd / "runs/byol_fashion_mnist/s0/checkpoints/last.ckpt"
    rows = tmp_path / "rows.jsonl"
    script = [sys.executable, str(ROOT / "benchmarks/fashion_mnist_results.py")]
    run = dict(cwd=lgen.cwd, env=lgen_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, check=True)
    subprocess.run(
        [*script, str(ckpt), "--append", str(rows), "--cpu-seconds", "12.5", "--limit", "300"], **run
    )
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["trained", "random init", "raw pixels"]
    trained = lines[0]
    assert trained["name"] == "[BYOL](methods/byol.md) (`byol_fashion_mnist`)"
    assert (trained["seed"], trained["epochs"], trained["cpu_seconds"]) == (0, 1, 12.5)
    for line in lines:
        for key in ("all", "10%", "1%", "knn20", "nmi"):
            assert 0.0 <= line[key] <= 1.0, (line["name"], key)
    assert lines[2]["all"] > 0.5  # logistic regression on raw pixels, even from 300 images
    plot = tmp_path / "plot.png"
    table = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/fashion_mnist_table.py"), str(rows), "--plot", str(plot)],
        **run,
    ).stdout
    assert "| [BYOL](methods/byol.md) (`byol_fashion_mnist`) |" in table and "| 0.2 min | 1 |" in table
    assert plot.stat().st_size > 10_000
