"""The report's faithfulness section, from the scores ``fastattr evaluate`` stores in each run.

Per method: mean comprehensiveness and sufficiency over the scored patients with 95% bootstrap
intervals; one figure of the probability drop against the percentage removed (comprehensiveness)
and kept (sufficiency) for every method beside a random attribution of the same patients; and with
two runs of one cohort, the patients on whom the methods' comprehensiveness differs most.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastattr.report.figures import figure, png, pyplot
from fastattr.report.scores import load_scores, scores_info
from fastattr.runs.reader import Attributions

BOOTSTRAP = 2000
METRIC_NAMES = ("comprehensiveness", "sufficiency")


def bootstrap_interval(values: np.ndarray, seed: int = 0, rounds: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (NaN for no values)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def scored(store: Attributions) -> dict[str, Any] | None:
    """A run's stored scores (``rows``, ``valid``, ``percentages``), or ``None`` where it has none."""
    scores = load_scores(store)
    if scores is None:
        return None
    rows = {k: v.numpy() for k, v in scores.all().items()}
    return {"rows": rows, "valid": rows["valid"].astype(bool), "percentages": scores_info(store)["percentages"]}


def faithfulness_section(runs: Sequence[tuple[str, Attributions]], table: bool = True) -> list[str]:
    """The section's HTML parts (empty when no run holds scores); ``table=False`` leaves out the table of
    means (the method comparison, :mod:`fastattr.report.methods_section`, holds it)."""
    scored_runs = [(label, store, s) for label, store in runs if (s := scored(store)) is not None]
    if not scored_runs:
        return []
    parts = ["<h2>Faithfulness</h2>",
             "<p>PyHealth's removal-based faithfulness of each patient's attributions, on the patient's own codes "
             "(<code>fastattr evaluate RUN</code>): comprehensiveness is the drop of the explained class's probability "
             "when the top q% attributed codes are removed (higher: more faithful), sufficiency the drop when only "
             "they are kept (lower: more faithful), each averaged over the percentages. Means over the scored "
             "patients with 95% bootstrap intervals; a random attribution of the same patients for scale.</p>"]
    if table:
        rows = [_row(label, s, "drops") for label, _, s in scored_runs]
        rows.append(_row("random baseline", scored_runs[0][2], "random"))
        parts.append("<table><tr><th>method</th><th>scored patients</th><th>comprehensiveness</th>"
                     "<th>sufficiency</th></tr>" + "".join(rows) + "</table>")
    parts.append(figure(_fig_curves(scored_runs), "probability drop against percentage",
                        "Mean probability drop of the explained class against the percentage of each patient's codes "
                        "removed (left, comprehensiveness) or kept (right, sufficiency), per method and for a random "
                        "attribution (dashed)."))
    if len(scored_runs) == 2:
        parts += _differences(scored_runs)
    return parts


def scores_cells(s: dict[str, Any], part: str) -> str:
    """Table cells of one method's scores (``part="drops"``) or of its random baseline (``"random"``):
    scored patients, then the mean comprehensiveness and sufficiency with 95% bootstrap intervals."""
    valid = s["valid"]
    cells = [f"{int(valid.sum())} of {len(valid)}"]
    for metric in METRIC_NAMES:
        values = s["rows"][f"{part}/{metric}"][valid].mean(axis=1)
        low, high = bootstrap_interval(values)
        cells.append(f"{values.mean():.3f} [{low:.3f}, {high:.3f}]" if len(values) else "n/a")
    return "".join(f"<td>{c}</td>" for c in cells)


def _row(label: str, s: dict[str, Any], part: str) -> str:
    return f"<tr><td>{html.escape(label)}</td>{scores_cells(s, part)}</tr>"


def _fig_curves(scored_runs: list[tuple[str, Attributions, dict[str, Any]]]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, METRIC_NAMES, strict=False):
        for label, _, s in scored_runs:
            ax.plot(s["percentages"], s["rows"][f"drops/{metric}"][s["valid"]].mean(axis=0), marker="o", label=label)
        first = scored_runs[0][2]
        ax.plot(first["percentages"], first["rows"][f"random/{metric}"][first["valid"]].mean(axis=0), "k--",
                marker=".", label="random baseline")
        ax.set_xscale("log")
        ax.set_xlabel(f"% of codes {'removed' if metric == 'comprehensiveness' else 'kept'}")
        ax.set_ylabel("probability drop")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return png(fig)


def _differences(scored_runs: list[tuple[str, Attributions, dict[str, Any]]], count: int = 10) -> list[str]:
    (la, sa, a), (lb, sb, b) = scored_runs
    if sa.patient_ids != sb.patient_ids:
        return ["<p class=note>The two runs hold different patients: per-patient differences are left out.</p>"]
    both = a["valid"] & b["valid"]
    gap = a["rows"]["comprehensiveness"] - b["rows"]["comprehensiveness"]
    order = [i for i in np.argsort(-np.abs(gap)) if both[i]][:count]
    if not order:
        return []
    head = (f"<h3>Patients whose comprehensiveness differs most between {html.escape(la)} and {html.escape(lb)}</h3>"
            f"<table><tr><th>patient</th><th>{html.escape(la)}</th><th>{html.escape(lb)}</th><th>difference</th></tr>")
    body = "".join(f"<tr><td class=l>{html.escape(str(sa.patient_ids[i]))}</td>"
                   f"<td>{a['rows']['comprehensiveness'][i]:.3f}</td><td>{b['rows']['comprehensiveness'][i]:.3f}</td>"
                   f"<td>{gap[i]:+.3f}</td></tr>" for i in order)
    return [head + body + "</table>"]
