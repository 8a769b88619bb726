"""``fastattr report``: one self-contained HTML page (figures embedded as PNG, no network needed)
that tells a researcher which codes drive a model's predictions across a cohort and for whom.

Per run: the top codes by cohort importance with their frequency, the distribution of the top
codes' per-sample attributions, the top codes per class, heat maps of the samples with the
highest predicted probability, and, where the run carries annotations (the synthetic cohort's planted codes and
distractors), where each annotated code ranks. Given two runs of the same cohort (IG and Chefer),
their agreement: rank correlation of code importance, overlap of the top-k codes, and how often
both put a patient's highest attribution on the same code. Runs scored with ``fastattr evaluate``
add a faithfulness section (:mod:`fastattr.report.faithfulness_section`).
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastattr.report.faithfulness_section import faithfulness_section
from fastattr.report.figures import figure, png, pyplot
from fastattr.report.methods_section import methods_section
from fastattr.runs.frames import code_names, entries, has_vocab
from fastattr.runs.reader import Attributions, open_run
from fastattr.runs.summaries import CodeSummary, sample_values, summarize_codes

COLORS = {"planted": "#c0392b", "planted pair": "#e67e22", "distractor": "#8e44ad", "": "#4a78b5"}
HEAT_POSITIONS = 48  # positions shown per patient heat map


def _color(annotation: str) -> str:
    return COLORS.get(annotation, "#16a085")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN for fewer than 2 points or a
    constant side."""
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a) - (len(a) + 1) / 2.0, average_ranks(b) - (len(b) + 1) / 2.0
    scale = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / scale) if scale > 0 else float("nan")


@dataclass
class _Run:
    store: Attributions
    summary: CodeSummary
    rows: list[dict[str, Any]]
    label: str

    def code_label(self, row: dict[str, Any]) -> str:
        return row["code"] if len(self.summary.features) == 1 else f"{row['feature']}:{row['code']}"


def _load(run: str | Path | Attributions, label: str | None, progress: bool | None) -> _Run:
    store = open_run(run)
    summary = summarize_codes(store, per_sample=True, progress=progress)
    return _Run(store, summary, summary.table(), label or store.info.get("method", store.out.name))


# -- figures -----------------------------------------------------------------------------------------

def _fig_top(run: _Run, top: list[dict[str, Any]]) -> str:
    plt = pyplot()
    labels = [run.code_label(r) for r in top][::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.32 * len(top) + 1.4), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 1.2]})
    importance = [r["importance"] for r in top][::-1]
    colors = [_color(r["annotation"]) for r in top][::-1]
    left.barh(labels, importance, color=colors)
    left.set_xlabel("importance: mean |attribution| over all samples")
    for y, r in enumerate(top[::-1]):
        left.text(r["importance"], y, " +" if r["mean_attribution"] >= 0 else " -", va="center", fontsize=8)
    right.barh(labels, [100 * r["frequency"] for r in top][::-1], color="#95a5a6")
    right.set_xlabel("samples carrying it (%)")
    _legend(left, {r["annotation"] for r in top})
    fig.suptitle(f"{run.label}: top {len(top)} codes by cohort importance (+/-: sign of the mean attribution)",
                 fontsize=10)
    fig.tight_layout()
    return png(fig)


def _legend(ax, annotations: set[str]) -> None:
    from matplotlib.patches import Patch

    shown = [a for a in COLORS if a in annotations and a] + sorted(a for a in annotations if a and a not in COLORS)
    if shown:
        handles = [Patch(color=_color(a), label=a) for a in shown] + [Patch(color=COLORS[""], label="not annotated")]
        ax.legend(handles=handles, loc="lower right", fontsize=8)


def _fig_distribution(run: _Run, top: list[dict[str, Any]], values: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(top) + 1.4))
    data = [values[(r["feature"], r["code_id"])] for r in top][::-1]
    import matplotlib

    sideways = {"orientation": "horizontal"} if tuple(map(int, matplotlib.__version__.split(".")[:2])) >= (3, 10) \
        else {"vert": False}  # matplotlib 3.10 renamed the argument
    parts = ax.boxplot(data, widths=0.6, showfliers=True, patch_artist=True,
                       flierprops={"markersize": 2, "alpha": 0.4}, **sideways)
    for patch, r in zip(parts["boxes"], top[::-1], strict=False):
        patch.set_facecolor(_color(r["annotation"]))
        patch.set_alpha(0.6)
    ax.set_yticks(range(1, len(top) + 1), [run.code_label(r) for r in top][::-1])
    ax.axvline(0, color="#333", lw=0.8)
    ax.set_xlabel("attribution of the code in one sample (summed over its positions)")
    ax.set_title(f"{run.label}: per-sample attribution of the top codes (each over up to "
                 f"{max(len(d) for d in data) if data else 0} samples carrying it)", fontsize=10)
    fig.tight_layout()
    return png(fig)


def _fig_by_class(run: _Run, per_class: list[tuple[int, int, list[dict[str, Any]]]]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(per_class), figsize=(5 * len(per_class), 0.3 * 10 + 1.6), squeeze=False)
    for ax, (cls, count, rows) in zip(axes[0], per_class, strict=False):
        labels = [run.code_label(r) for r in rows][::-1]
        ax.barh(labels, [r["mean_attribution"] for r in rows][::-1],
                color=[_color(r["annotation"]) for r in rows][::-1])
        ax.axvline(0, color="#333", lw=0.8)
        name = f"predicted label {cls}" if run.summary.class_rule.startswith("predicted") else f"explained class {cls}"
        ax.set_title(f"{name}: {count} samples", fontsize=10)
        ax.set_xlabel("mean attribution (samples carrying it)")
    fig.suptitle(f"{run.label}: top 10 codes by importance within each class", fontsize=10)
    fig.tight_layout()
    return png(fig)


def _patient_cells(run: _Run, position: int) -> tuple[list[str], list[float], list[str]]:
    """Labels, attributions and annotations of one sample's non-padding entries, features in order."""
    sample = {k: v[None] for k, v in run.store[position].items()}
    labels, scores, marks = [], [], []
    annotations = run.store.info.get("annotations", {})
    for key in run.summary.features:
        e = entries(run.store, key, sample)
        if e is None or len(e.rows) == 0:
            continue
        names = code_names(run.store, key, int(e.codes.max()) + 1)
        for code, value in zip(e.codes.tolist(), e.values.double().tolist(), strict=False):
            labels.append(names[code] if len(run.summary.features) == 1 else f"{key}:{names[code]}")
            scores.append(value)
            marks.append(annotations.get(key, {}).get(names[code], ""))
    return labels, scores, marks


def _fig_patients(run: _Run, chosen: list[int]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(len(chosen), 1, figsize=(12, 1.25 * len(chosen) + 0.8), squeeze=False)
    probability = run.summary.sample_probability
    cells = [_patient_cells(run, position) for position in chosen]
    width = min(max(len(c[0]) for c in cells), HEAT_POSITIONS)
    for ax, position, (labels, scores, marks) in zip(axes[:, 0], chosen, cells, strict=False):
        cut = len(labels) > HEAT_POSITIONS
        labels, scores, marks = labels[:HEAT_POSITIONS], scores[:HEAT_POSITIONS], marks[:HEAT_POSITIONS]
        values = np.array(scores)[None, :] if scores else np.zeros((1, 1))
        scale = max(float(np.abs(values).max()), 1e-12)
        ax.imshow(values, cmap="coolwarm", vmin=-scale, vmax=scale, aspect="auto")
        ax.set_xlim(-0.5, max(width, 1) - 0.5)  # one cell width for every patient
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        for tick, mark in zip(ax.get_xticklabels(), marks, strict=False):
            if mark:
                tick.set_color(_color(mark))
                tick.set_fontweight("bold")
        ax.set_yticks([0], [f"{run.store.patient_ids[position]}\np={probability[position]:.2f}"], fontsize=8)
        if cut:
            ax.set_title(f"first {HEAT_POSITIONS} positions shown", fontsize=7, loc="right")
    fig.suptitle(f"{run.label}: the {len(chosen)} samples with the highest probability of the explained class "
                 "(red: towards it, "
                 "blue: away; annotated codes in colour)", fontsize=10)
    fig.tight_layout()
    return png(fig)


def _fig_agreement(a: _Run, b: _Run, common: list[tuple[str, int]], ia: dict, ib: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ra = average_ranks(-np.array([ia[k] for k in common]))
    rb = average_ranks(-np.array([ib[k] for k in common]))
    rows = {(r["feature"], r["code_id"]): r for r in a.rows}
    marks = [rows[k]["annotation"] for k in common]
    ax.scatter(ra, rb, s=12, c=[_color(m) for m in marks], alpha=0.75)
    for x, y, k, m in zip(ra, rb, common, marks, strict=False):
        if m or min(x, y) <= 5:
            ax.annotate(a.code_label(rows[k]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel(f"importance rank, {a.label} (1 = most important)")
    ax.set_ylabel(f"importance rank, {b.label}")
    ax.set_title(f"code importance ranks: {a.label} vs {b.label}", fontsize=10)
    _legend(ax, set(marks))
    fig.tight_layout()
    return png(fig)


# -- page ----------------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}td:not(.l){white-space:nowrap}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.86em;color:#555}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
.tag{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:.8em}"""


def _tag(annotation: str) -> str:
    return f"<span class='tag' style='background:{_color(annotation)}'>{html.escape(annotation)}</span>" \
        if annotation else ""


def _table(run: _Run, rows: list[dict[str, Any]], rank_of: dict | None = None) -> str:
    head = ("<tr>" + ("<th>rank</th>" if rank_of else "") + "<th class=l>code</th><th>importance</th>"
            "<th>mean attr.</th><th>mean |attr.|</th><th>samples</th><th>frequency</th><th>top code in</th>"
            "<th class=l>annotation</th></tr>")
    body = []
    for r in rows:
        rank = rank_of.get((r["feature"], r["code_id"]), "-") if rank_of else None
        body.append("<tr>" + (f"<td>{rank}</td>" if rank_of else "") +
                    f"<td class=l>{html.escape(run.code_label(r))}</td><td>{r['importance']:.4g}</td>"
                    f"<td>{r['mean_attribution']:+.4g}</td><td>{r['mean_abs_attribution']:.4g}</td>"
                    f"<td>{r['samples']}</td><td>{r['frequency']:.1%}</td><td>{r['top_share']:.1%}</td>"
                    f"<td class=l>{_tag(r['annotation'])}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _run_section(run: _Run, top: int, patients: int, limit: int, progress: bool | None) -> list[str]:
    store, summary = run.store, run.summary
    parts = [f"<h2>{html.escape(run.label)}</h2>",
             f"<p>Run <code>{html.escape(str(store.out))}</code>: method {html.escape(store.info.get('method', '?'))}, "
             f"model {html.escape(store.info.get('model', '?'))}, {len(store)} samples in {len(store.shards)} shards, "
             f"features {html.escape(', '.join(summary.features))}.</p>"]
    for key in summary.features:
        if not has_vocab(store, key):
            what = "ids" if store.info["features"][key]["token"] else "channel numbers"
            parts.append(f"<p class=note>Feature <b>{html.escape(key)}</b> has no vocabulary in this run: its codes "
                         f"are shown as {what}. Pass <code>vocab=</code> to <code>attribute_dataset</code> (or give "
                         "the "
                         "model's processors a <code>code_vocab</code>) to see names.</p>")
    best = run.rows[:top]
    if not best:
        parts.append("<p class=note>The run holds no non-padding entries: nothing to summarise.</p>")
        return parts
    rank_of = {(r["feature"], r["code_id"]): i + 1 for i, r in enumerate(run.rows)}
    parts.append("<h3>Which codes drive the predictions</h3>")
    parts.append(figure(_fig_top(run, best), f"{run.label} top codes",
                         "Importance is the mean absolute attribution of a code over all samples (0 where absent), "
                         "so it weighs how strongly and how often a code acts; the right panel shows how many samples "
                         "carry it."))
    parts.append(_table(run, best))
    values = sample_values(store, [(r["feature"], r["code_id"]) for r in best], limit=limit, progress=progress)
    parts.append(figure(_fig_distribution(run, best, values), f"{run.label} attribution distribution",
                         "Boxes: quartiles of the per-sample attribution of each top code over the samples carrying "
                         "it; whiskers 1.5 IQR; dots beyond them."))
    classes = [(c, int(n)) for c, n in enumerate(summary.class_totals) if n > 0]
    classes = sorted(classes, key=lambda cn: -cn[1])[:4]
    by_class = summary.table(by_class=True)
    per_class = [(c, n, [r for r in by_class if r["class"] == c][:10]) for c, n in sorted(classes)]
    parts.append("<h3>For whom: per class</h3>")
    parts.append(f"<p>Class: the {html.escape(summary.class_rule)}.</p>")
    parts.append(figure(_fig_by_class(run, per_class), f"{run.label} per class",
                         "Within each class, the ten most important codes and their mean attribution in the samples "
                         "carrying them."))
    if store.info.get("annotations"):
        annotated = [r for r in run.rows if r["annotation"]]
        parts.append("<h3>Known truth: where the annotated codes rank</h3>")
        parts.append(f"<p>Out of {len(run.rows)} codes present in the cohort. A method that recovers the truth ranks "
                     "planted codes near the top and their distractors (codes that only co-occur with them) low.</p>")
        parts.append(_table(run, annotated, rank_of))
    order = np.lexsort((np.arange(len(store)), -np.nan_to_num(summary.sample_probability, nan=-1.0)))
    chosen = [int(i) for i in order[:patients]]
    if chosen:
        parts.append("<h3>The samples with the highest predicted probability</h3>")
        parts.append(figure(_fig_patients(run, chosen), f"{run.label} confident patients",
                             "Each row is one sample's codes in order, coloured by attribution on its own scale "
                             f"(first {HEAT_POSITIONS} positions); p is the predicted probability of the explained "
                             "class."))
    return parts


def _agreement_section(a: _Run, b: _Run) -> list[str]:
    ia = {(r["feature"], r["code_id"]): r["importance"] for r in a.rows}
    ib = {(r["feature"], r["code_id"]): r["importance"] for r in b.rows}
    common = sorted(set(ia) & set(ib))
    parts = [f"<h2>Agreement: {html.escape(a.label)} vs {html.escape(b.label)}</h2>"]
    if not common:
        return parts + ["<p class=note>The two runs share no code: nothing to compare.</p>"]
    rho = spearman(np.array([ia[k] for k in common]), np.array([ib[k] for k in common]))
    rows = [("codes in both runs", f"{len(common)}"), ("Spearman rank correlation of code importance", f"{rho:.3f}")]
    top_a = [(r["feature"], r["code_id"]) for r in a.rows]
    top_b = [(r["feature"], r["code_id"]) for r in b.rows]
    for k in (5, 10, 20):
        if min(len(top_a), len(top_b)) >= k:
            rows.append((f"top-{k} overlap", f"{len(set(top_a[:k]) & set(top_b[:k]))} of {k}"))
    same_samples = len(a.store) == len(b.store) and a.store.patient_ids == b.store.patient_ids
    if same_samples:
        fa, ca, fb, cb = a.summary.top_feature, a.summary.top_code, b.summary.top_feature, b.summary.top_code
        # b's feature indices in a's numbering (-2: a feature a does not have), then compare
        in_a = np.array([a.summary.features.index(k) if k in a.summary.features else -2
                         for k in b.summary.features] + [-1])  # index -1 (no entry) maps to -1
        both = (fa >= 0) & (fb >= 0)
        same = both & (fa == in_a[fb]) & (ca == cb)
        rows.append(("samples whose top code is the same",
                     f"{same.sum()} of {both.sum()} ({same.sum() / max(both.sum(), 1):.1%})"))
    table = "".join(f"<tr><td class=l>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    parts.append(f"<table>{table}</table>")
    if not same_samples:
        parts.append("<p class=note>The runs hold different samples (count or patient ids differ): per-sample "
                     "agreement is left out.</p>")
    parts.append(figure(_fig_agreement(a, b, common, ia, ib), "importance rank agreement",
                         "Each dot is a code present in both runs, placed by its importance rank in each (log "
                         "scales; top-5 and annotated codes labelled). Dots on the diagonal: the methods agree."))
    return parts


def write_report(runs: str | Path | Attributions | Sequence[str | Path | Attributions], path: str | Path | None = None,
                 *, labels: Sequence[str] | None = None, top: int = 20, patients: int = 6, limit: int = 5000,
                 title: str | None = None, progress: bool | None = None) -> Path:
    """Write the HTML report of one run, or of several runs of the same cohort (e.g. IG and Chefer,
    or every method of PyHealth's comparison) with the method comparison (faithfulness with intervals,
    agreement on each patient's top codes: :mod:`fastattr.report.methods_section`; two runs also get
    their code-importance agreement), to ``path`` (default: ``report.html`` in the first run's folder).

    Args:
        runs: a run folder (or ``load_attributions`` store), or a list of them.
        labels: a name per run (default: its method).
        top: codes in the top lists and figures.
        patients: how many samples with the highest probability of their explained class are shown
            as heat maps.
        limit: samples per code in the distribution figure.
    Returns the path written. Needs matplotlib (the ``report`` extra).
    """
    runs = [runs] if isinstance(runs, (str, Path, Attributions)) else list(runs)
    if not runs:
        raise ValueError("runs must name at least one run folder")
    for name, value, low in (("top", top, 1), ("patients", patients, 0), ("limit", limit, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"labels must name each run: {len(runs)} runs, {len(labels)} labels")
    loaded = [_load(r, labels[i] if labels else None, progress) for i, r in enumerate(runs)]
    folders = [run.store.out.resolve() for run in loaded]
    twice = next((f for f in folders if folders.count(f) > 1), None)
    if twice is not None:
        raise ValueError(f"runs must be different run folders; {twice} is given more than once")
    repeated = {r.label for r in loaded if [x.label for x in loaded].count(r.label) > 1}
    for run in loaded:
        if run.label in repeated:
            run.label = f"{run.label} ({run.store.out.name})"
    path = Path(path) if path is not None else loaded[0].store.out / "report.html"
    title = title or "fastattr cohort report"
    parts = ["<!doctype html><html lang=en><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p>How the model's predictions depend on each code across the cohort, from the stored attributions. "
             "A sample's attribution to a code is the sum over the positions that hold it; positive values push "
             "towards the explained class.</p>"]
    labelled = [(run.label, run.store) for run in loaded]
    if len(loaded) >= 2:
        parts += methods_section(labelled)
    if len(loaded) == 2:
        parts += _agreement_section(*loaded)
    parts += faithfulness_section(labelled, table=len(loaded) == 1)
    for run in loaded:
        parts += _run_section(run, top, patients, limit, progress)
    parts.append("<p style='color:#777;font-size:.8em'>Written by fastattr.</p></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
