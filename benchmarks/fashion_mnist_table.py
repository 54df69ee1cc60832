"""The Fashion-MNIST representation table from the rows `fashion_mnist_results.py` appends, one JSON line each.

    python benchmarks/fashion_mnist_table.py benchmarks/results/fashion_mnist.jsonl \
        --plot docs/images/fashion_mnist_probe_vs_cpu.png

Every finished row (one training run of one seed, its random-init twin, the raw pixels, the supervised
classifier) is one line of the JSONL file, written as soon as it is measured, so a long table survives
interruptions and rows can be committed one by one. This script groups the lines by row, averages the
seeds (mean ± sample standard deviation, the number of seeds in the last column; one seed is marked
"1"), prints the markdown table of docs/results-fashion-mnist.md (self-supervised rows best first, the
best of each column in bold; ``--page`` writes it into the page) and draws the all-label probe accuracy
of every method against its training CPU time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

METRICS = ("all", "10%", "1%", "knn20", "nmi")  # linear probe at 100 / 10 / 1 % labels, kNN k=20, k-means NMI
COLUMNS = ("probe, all labels", "10 % labels", "1 % labels", "kNN k=20", "k-means NMI")


def read_rows(path: str | Path) -> list[dict]:
    """The JSON lines of ``path``; a later line for the same (row, seed) replaces an earlier one."""
    latest: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[(row["name"], row.get("seed", 0))] = row
    return list(latest.values())


def merge_identical_twins(entries: list[dict]) -> list[dict]:
    """Random-init twins of the same architecture give the same features, hence the same numbers: one
    row for them all, naming every experiment it stands for."""
    out, seen = [], {}
    for e in entries:
        if e["kind"] != "random init":
            out.append(e)
            continue
        key = tuple(round(e[m], 6) for m in METRICS if m in e)
        label = e["name"].removesuffix(", random init")
        if key in seen:
            seen[key]["of"].append(label)
        else:
            seen[key] = {**e, "of": [label]}
            out.append(seen[key])
    for e in seen.values():
        e["name"] = (
            f"{e['of'][0]}, random init" if len(e["of"]) == 1 else "random init of " + ", ".join(e["of"])
        )
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per row name (in first-seen order): mean and std of every metric over its seeds;
    identical random-init twins merged (``merge_identical_twins``)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    out = []
    for name, members in groups.items():
        entry = {"name": name, "seeds": len(members), "kind": members[0].get("kind", "trained")}
        for key in (*METRICS, "online_probe", "cpu_seconds", "epochs"):
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                entry[key] = statistics.fmean(values)
                entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    return merge_identical_twins(out)


def cell(entry: dict, key: str, percent: bool = True) -> str:
    if key not in entry:
        return ""
    scale = 100 if percent else 1
    text = f"{scale * entry[key]:.1f}" if percent else f"{entry[key]:.3f}"
    std = entry.get(key + "_std")
    if std is not None:
        text += f" ± {scale * std:.1f}" if percent else f" ± {std:.3f}"
    return text


def is_self_supervised(entry: dict) -> bool:
    return entry["kind"] == "trained" and not entry["name"].startswith("supervised baseline")


def ordered(entries: list[dict]) -> list[dict]:
    """The page's order: self-supervised rows by all-label probe accuracy (best first), then the references:
    the supervised baseline, random-init twins, raw pixels."""
    rank = {"trained": 1, "own classifier": 1, "random init": 2, "raw pixels": 3}
    return sorted(
        entries,
        key=lambda e: (0, -e.get("all", 0.0)) if is_self_supervised(e) else (rank.get(e["kind"], 4), 0.0),
    )


def markdown(entries: list[dict], bold_best: bool = False) -> str:
    """The table; ``bold_best``: the best self-supervised value of every metric column in bold."""
    best = {
        key: max((e[key] for e in entries if is_self_supervised(e) and key in e), default=None)
        for key in METRICS
    }
    header = (
        "| features | "
        + " | ".join(COLUMNS)
        + " | online probe (val), last epoch | epochs | training CPU time | seeds |"
    )
    lines = [header, "|---|" + "---:|" * (len(COLUMNS) + 4)]
    for e in entries:
        cells = [cell(e, k, percent=k != "nmi") for k in METRICS]
        if bold_best and is_self_supervised(e):
            cells = [f"**{c}**" if e.get(k) == best[k] else c for c, k in zip(cells, METRICS, strict=True)]
        cells.append(cell(e, "online_probe"))
        cells.append(f"{e['epochs']:.0f}" if "epochs" in e else "")
        cells.append(f"{e['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in e else "")
        cells.append(str(e["seeds"]) if e["kind"] == "trained" else "")
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plain(name: str) -> str:
    """A row's name without markdown: links to their text, no code marks, no experiment in brackets."""
    name = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", name).replace("`", "")
    return re.sub(r" \([a-z0-9_]+\)", "", name)


def reference_label(entry: dict) -> str:
    """A reference line's label: raw pixels, or whose random init it is (a count where many share it)."""
    if entry["kind"] != "random init":
        return plain(entry["name"])
    twins = [t.strip("`").removesuffix("_fashion_mnist") for t in entry.get("of", [entry["name"]])]
    return "random init of " + (", ".join(twins) if len(twins) <= 3 else f"{len(twins)} methods' encoder")


def plot_probe_vs_cpu(entries: list[dict], path: str | Path) -> Path:
    """All-label probe accuracy against training CPU time (log scale), one point per trained method (std as
    bars), the raw pixels and every random-init twin as horizontal references."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    ax = figure.subplots()
    minutes = []
    for e in entries:
        if e["kind"] == "trained" and "cpu_seconds" in e and "all" in e:
            x, y = e["cpu_seconds"] / 60, 100 * e["all"]
            minutes.append(x)
            yerr = 100 * e["all_std"] if e.get("all_std") else None
            ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=3)
            ax.annotate(plain(e["name"]), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for e in entries:
        if e["kind"] in ("raw pixels", "random init") and "all" in e:
            ax.axhline(100 * e["all"], lw=0.8, ls="--" if e["kind"] == "raw pixels" else ":", color="grey")
            ax.annotate(
                reference_label(e),
                (0, 100 * e["all"]),
                xycoords=("axes fraction", "data"),
                fontsize=6,
                color="grey",
                xytext=(2, 2),
                textcoords="offset points",
            )
    ax.set(xlabel="training CPU time, one core (min)", ylabel="linear probe, all labels, test top-1 (%)")
    ax.set_title("Fashion-MNIST: probe accuracy against training cost", fontsize=10)
    # log time: the 5-15 minute schedules of the table spread out beside the hour-long ones
    ax.set_xscale("log")
    ticks = [2, 5, 10, 20, 50, 100, 200]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    if minutes:
        ax.set_xlim(min(minutes) / 1.5, max(minutes) * 1.6)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return Path(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", help="the JSONL file fashion_mnist_results.py --append writes")
    parser.add_argument("--plot", help="write the probe-vs-CPU-time plot here (PNG)")
    parser.add_argument(
        "--page",
        help="also write the table into this page, between its <!-- fashion_mnist_ssl:begin/end --> markers",
    )
    args = parser.parse_args()
    entries = aggregate(read_rows(args.rows))
    table = markdown(ordered(entries), bold_best=True)
    print(table)
    if args.page:
        from result_rows import replace_between_markers  # beside this script

        page = Path(args.page)
        page.write_text(replace_between_markers(page.read_text(), "fashion_mnist_ssl", table))
    if args.plot:
        print(f"plot: {plot_probe_vs_cpu(entries, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
