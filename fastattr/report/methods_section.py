"""The report's method comparison: every method of a run set side by side.

Per method: how its run was batched (a method whose values depend on the batch, as SHAP, LIME and
RandomBaseline do, keeps the loader's batches: its numbers hold for that batching), its mean
comprehensiveness and sufficiency with 95% bootstrap intervals (from ``fastattr evaluate``), beside a
random attribution of the same patients; and how far the methods agree on each patient's top codes: for
every pair of methods, the mean share of a patient's ``k`` highest-attributed entries (a code at its
position) that both put in their top ``k``, over the patients of both runs with more than ``k`` entries.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from fastattr.report.faithfulness_section import scored, scores_cells
from fastattr.runs.frames import entries
from fastattr.runs.reader import Attributions

TOP_K = 5
# Patients read for the agreement (the first ones of the run set): enough for a mean to two decimals.
AGREEMENT_PATIENTS = 2000


def top_entries(store: Attributions, position: int, k: int) -> tuple[frozenset, int]:
    """A sample's ``k`` highest attributions as ``(feature, visit, position, code)`` entries (ties: first
    position first), and how many non-padding entries it has."""
    sample = {name: tensor[None] for name, tensor in store[position].items()}
    names, values = [], []
    for key in store.info["features"]:
        e = entries(store, key, sample)
        if e is None:
            continue
        names += [(key, v, p, c) for v, p, c in zip(e.visit.tolist(), e.position.tolist(), e.codes.tolist(),
                                                   strict=True)]
        values.append(e.values.double().numpy())
    flat = np.concatenate(values) if values else np.zeros(0)
    order = np.argsort(-flat, kind="stable")[:k]
    return frozenset(names[i] for i in order), len(names)


def top_k_agreement(stores: Sequence[Attributions], k: int = TOP_K, limit: int = AGREEMENT_PATIENTS
                    ) -> tuple[np.ndarray, int]:
    """``(mean overlap [M, M], patients compared)``: for each pair of runs, the mean over patients of
    ``|top_k(a) & top_k(b)| / k``, over the first ``limit`` patients with more than ``k`` entries in
    every run. The runs must hold the same patients in the same positions."""
    first = stores[0]
    if any(s.patient_ids != first.patient_ids for s in stores[1:]):
        raise ValueError("the runs hold different patients (count or patient ids differ); top codes are compared "
                         "patient by patient, on runs of one cohort")
    total, count = np.zeros((len(stores), len(stores))), 0
    for position in range(min(len(first), limit)):
        tops = [top_entries(store, position, k) for store in stores]
        if min(n for _, n in tops) <= k:
            continue  # every method's top k is the whole patient: agreement says nothing
        sets = [t for t, _ in tops]
        total += np.array([[len(a & b) / k for b in sets] for a in sets])
        count += 1
    return (total / count if count else np.full_like(total, np.nan)), count


def _batching(store: Attributions) -> str:
    """How a run's batches were cut, in words."""
    batching = (store.info or {}).get("batching", {})
    how = "sorted by length" if batching.get("sorted") else "the loader's batches"
    if batching.get("batch_dependent"):
        size = batching.get("batch_size")
        padding = batching.get("padding_dependent")
        why = f"values depend on the padding of {', '.join(padding)}" if padding else "values depend on the batch"
        how += (f" of {size}" if size and not batching.get("sorted") else "") + f" ({why})"
    return how


def _matrix(labels: Sequence[str], overlap: np.ndarray) -> str:
    """The agreement matrix as an HTML table, each cell shaded by its value."""
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    rows = []
    for label, values in zip(labels, overlap, strict=True):
        cells = "".join(f"<td style='background:rgba(74,120,181,{0.0 if np.isnan(v) else 0.65 * v:.2f})'>"
                        f"{'n/a' if np.isnan(v) else f'{v:.2f}'}</td>" for v in values)
        rows.append(f"<tr><th class=l>{html.escape(label)}</th>{cells}</tr>")
    return f"<table class=agreement>{head}{''.join(rows)}</table>"


def _faithfulness_table(runs: Sequence[tuple[str, Attributions]]) -> str:
    """Per method: its batching, scored patients, comprehensiveness and sufficiency with intervals."""
    head = ("<tr><th class=l>method</th><th class=l>interpreter</th><th class=l>batching</th><th>scored patients</th>"
            "<th>comprehensiveness</th><th>sufficiency</th></tr>")
    body, first = [], None
    for label, store in runs:
        s = scored(store)
        interpreter = str((store.info or {}).get("method", "?"))
        lead = "".join(f"<td class=l>{html.escape(cell)}</td>" for cell in (label, interpreter, _batching(store)))
        if s is None:
            body.append(f"<tr>{lead}<td colspan=3>not scored: run <code>fastattr evaluate</code> on it</td></tr>")
            continue
        first = first or s
        body.append(f"<tr>{lead}" + scores_cells(s, "drops") + "</tr>")
    if first is not None:
        body.append("<tr><td class=l>random baseline</td><td class=l>(evaluate's, same patients)</td><td class=l></td>"
                    + scores_cells(first, "random") + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def methods_section(runs: Sequence[tuple[str, Attributions]], k: int = TOP_K,
                    limit: int = AGREEMENT_PATIENTS) -> list[str]:
    """The section's HTML parts for two or more labelled runs of one cohort."""
    parts = [f"<h2>Method comparison: {len(runs)} methods</h2>",
             "<p>Faithfulness (<code>fastattr evaluate</code>): comprehensiveness is the drop of the explained class's "
             "probability when a patient's top q% attributed codes are removed (higher: more faithful), sufficiency "
             "when only they are kept (lower: more faithful), averaged over the percentages; means over the scored "
             "patients with 95% bootstrap intervals. A method whose values depend on the batch was run in the "
             "loader's batches, and its numbers hold for that batching.</p>", _faithfulness_table(runs)]
    try:
        overlap, count = top_k_agreement([store for _, store in runs], k, limit)
    except ValueError as exc:
        return parts + [f"<p class=note>{html.escape(str(exc))}: the agreement of top codes is left out.</p>"]
    parts.append(f"<h3>Agreement on each patient's top {k} codes</h3>")
    parts.append(f"<p>For each pair of methods, the mean share of a patient's {k} highest-attributed codes (each "
                 f"at its position) that both methods put in their top {k}; over {count} patients with more than {k} "
                 "codes" + (f" (the first {limit} of the cohort)" if len(runs[0][1]) > limit else "") + ". Two "
                 f"unrelated rankings share about {k}/n of an n-code patient's top {k}.</p>")
    parts.append(_matrix([label for label, _ in runs], overlap))
    return parts
