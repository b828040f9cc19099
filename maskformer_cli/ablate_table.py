"""The paper-style table of an ablation: one row per variant, each metric's median ± std over seeds beside
the paper's number, rendered for the terminal (Rich), as Markdown and as CSV."""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskformer_cli.ablation_file import Ablation


@dataclass
class Row:
    """A table row: per metric the values over seeds, their median and std, and the paper's number."""

    variant: str
    runs: int
    expected: int
    values: dict[str, list[float]]
    paper: dict[str, float]

    def median(self, metric: str) -> float | None:
        v = self.values.get(metric) or []
        return statistics.median(v) if v else None

    def std(self, metric: str) -> float | None:
        v = self.values.get(metric) or []
        return statistics.stdev(v) if len(v) > 1 else None



def build_rows(ablation: Ablation, results: dict[tuple[str, int], dict[str, Any]], seeds: int) -> list[Row]:
    """One row per variant: each metric's finite values over the seeds that finished."""
    rows = []
    for v in ablation.variants:
        found = [results[(v.name, k)] for k in range(seeds) if (v.name, k) in results]
        values: dict[str, list[float]] = {}
        for m in ablation.metrics:
            vals = []
            for r in found:
                x = (r.get("metrics") or {}).get(m)
                if isinstance(x, int | float) and not isinstance(x, bool) and x == x:  # x == x drops NaN
                    vals.append(float(x))
            values[m] = vals
        rows.append(Row(variant=v.name, runs=len(found), expected=seeds, values=values,
                        paper=dict(ablation.paper.get(v.name, {}))))
    return rows


def format_cell(row: Row, metric: str, digits: int = 1) -> str:
    med = row.median(metric)
    if med is None:
        return "—"
    std = row.std(metric)
    return f"{med:.{digits}f}" if std is None else f"{med:.{digits}f} ± {std:.{digits}f}"


def _paper_metrics(ablation: Ablation) -> set[str]:
    return {m for numbers in ablation.paper.values() for m in numbers}


def _columns(ablation: Ablation) -> list[tuple[str, str, str]]:
    """(kind, metric, header) for every value column: ours, then the paper's when it has any."""
    with_paper = _paper_metrics(ablation)
    cols = []
    for m in ablation.metrics:
        cols.append(("ours", m, m))
        if m in with_paper:
            cols.append(("paper", m, f"{m} (paper)"))
    return cols


def _cells(ablation: Ablation, row: Row) -> list[str]:
    cells = []
    for kind, m, _ in _columns(ablation):
        if kind == "ours":
            cells.append(format_cell(row, m))
        else:
            p = row.paper.get(m)
            cells.append("—" if p is None else f"{p:.1f}")
    return cells


def _caption(seeds: int) -> str:
    stat = "median ± std" if seeds > 1 else "single run"
    return f"{stat} over {seeds} seed(s); the paper reports the median of 3 runs"


def render_rich(ablation: Ablation, rows: list[Row], seeds: int):
    from rich.table import Table

    title = ablation.name + (f": {ablation.description}" if ablation.description else "")
    table = Table(title=title, caption=_caption(seeds))
    table.add_column("variant")
    table.add_column("runs", justify="right")
    for kind, _, header in _columns(ablation):
        table.add_column(header, justify="right", style="dim" if kind == "paper" else None)
    for row in rows:
        table.add_row(row.variant, f"{row.runs}/{row.expected}", *_cells(ablation, row))
    return table


def render_markdown(ablation: Ablation, rows: list[Row], seeds: int) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    headers = ["variant", "runs", *[h for _, _, h in _columns(ablation)]]
    lines = [f"### {esc(ablation.name)}", ""]
    if ablation.description:
        lines += [esc(ablation.description), ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for row in rows:
        cells = [esc(row.variant), f"{row.runs}/{row.expected}", *_cells(ablation, row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"_{_caption(seeds)}._", ""]
    return "\n".join(lines)


def write_csv(ablation: Ablation, rows: list[Row], path: Path) -> None:
    fields = ["variant", "runs"]
    for m in ablation.metrics:
        fields += [f"{m}_median", f"{m}_std", f"{m}_paper", f"{m}_values"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for row in rows:
            rec: list[Any] = [row.variant, row.runs]
            for m in ablation.metrics:
                med, std, p = row.median(m), row.std(m), row.paper.get(m)
                rec += ["" if med is None else f"{med:.4f}", "" if std is None else f"{std:.4f}",
                        "" if p is None else p, ";".join(f"{x:.4f}" for x in row.values.get(m, []))]
            w.writerow(rec)
