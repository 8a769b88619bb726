"""Faithfulness of a whole stored run: comprehensiveness and sufficiency of every patient.

:func:`evaluate_run` scores each patient of an attribution run (``attribute_dataset`` /
``fastattr attribute``) from the token ids its shards keep, and stores, per patient, the mean
comprehensiveness and sufficiency, whether the patient was scored, the probability drop at every
percentage for both metrics, and the same drops for a random attribution of the same patient (the
baseline the report draws beside each method). The scores are written to ``RUN/faithfulness/`` as a
run folder of their own (checksummed shards, resumable after a kill, one writer at a time).

A run's scores are defined on each patient's own tokens: PyHealth's Evaluator with a batch of one.
PyHealth's padded batches make a patient's score depend on who shares its batch (the top-q% quantile
is taken over the whole padded row, padding included, and a model can read padding: PyHealth's
Transformer, once a patient's first code is removed); a run is batched by length, so the patient's
own row is the definition that does not depend on the batching. Patients of the same own length are
scored together, which is exact: each row is unpadded, rows do not interact.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattr.interpret.features import model_device
from fastattr.metrics.evaluator import Evaluator
from fastattr.metrics.filters import SampleFilterFn
from fastattr.metrics.metric import PERCENTAGES, finish
from fastattr.metrics.removal import METRICS
from fastattr.runs.files import SHAPE_PREFIX, write_atomic
from fastattr.runs.reader import SCORES_FOLDER, Attributions, load_attributions, open_run
from fastattr.runs.writer import ShardStore

SCORES_INFO = "scores.json"


def scores_folder(run: str | Path | Attributions) -> Path:
    """Where a run's faithfulness scores are kept."""
    return (run.out if isinstance(run, Attributions) else Path(run)) / SCORES_FOLDER


def load_scores(run: str | Path | Attributions) -> Attributions | None:
    """The stored scores of ``run`` (a mapping from sample position to its scores), or ``None``."""
    return open_run(run).scores()


def scores_info(run: str | Path | Attributions) -> dict[str, Any]:
    """How a run's stored scores were made (``scores.json``: percentages, ablation, metrics, seed...)."""
    return json.loads((scores_folder(run) / SCORES_INFO).read_text())


def evaluate_run(run: str | Path | Attributions, model: Any, *, percentages: Sequence[float] = PERCENTAGES,
                 ablation_strategy: str = "zero", sample_filter: SampleFilterFn | None = None, resume: bool = True,
                 progress: bool | None = None, seed: int = 0) -> Attributions:
    """Score every patient of ``run`` with ``model`` (the model the run explains) and store the
    scores in ``RUN/faithfulness``; returns them opened (see :func:`load_scores`).

    Each row holds ``comprehensiveness`` and ``sufficiency`` (means over ``percentages``),
    ``valid`` (whether the sample filter scored the patient), ``drops/<metric>`` (``[P]``, the
    probability drop at each percentage) and ``random/<metric>`` (the drops of a random attribution
    of the same patient, seeded by ``seed`` and the shard). ``resume`` continues an interrupted
    scoring; a folder another process is writing is refused (:class:`fastattr.runs.locks.RunLockedError`).
    """
    store = open_run(run)
    keys = _scored_features(store, model)
    evaluator = Evaluator(model, percentages=percentages, ablation_strategy=ablation_strategy,
                          sample_filter=sample_filter, progress=False)
    out = scores_folder(store)
    if not resume and (out / "manifest.json").exists():
        raise FileExistsError(f"{out} already holds faithfulness scores of this run; resume to keep them, or remove "
                              "the folder to score again")
    out.mkdir(exist_ok=True)
    writer = ShardStore(out, 0, 1)
    writer.lock()
    try:
        done = writer.recover(resume)
        info = {"percentages": list(percentages), "ablation_strategy": ablation_strategy, "metrics": list(METRICS),
                "features": keys, "method": (store.info or {}).get("method"), "seed": seed}
        write_atomic(out / SCORES_INFO, json.dumps(info, indent=1).encode())
        bar = tqdm(total=len(store), desc="faithfulness", unit="patient",
                   disable=None if progress is None else not progress)
        for index, (positions, ids, tensors) in enumerate(store.shards_with_positions(row_shapes=True)):
            if index not in done:
                writer.write(index, _score_shard(evaluator, keys, tensors, seed * 1_000_003 + index), ids, positions)
            bar.update(len(positions))
        bar.close()
        writer.merge()
    finally:
        writer.release()
    return load_attributions(out)


def _scored_features(store: Attributions, model: Any) -> list[str]:
    """The model's features, each of which the run must keep as token ids with its padding mask."""
    first = next(store.batches(), None)
    if first is None:
        raise ValueError(f"{store.out} holds no sample to score")
    missing = [k for k in model.feature_keys if f"input/{k}" not in first or f"keep/{k}" not in first]
    if missing:
        raise ValueError(f"{store.out} does not keep the inputs of feature(s) {missing} (a run keeps the token ids of "
                         "token features only): its patients cannot be scored")
    return list(model.feature_keys)


def _own(tensors: dict[str, torch.Tensor], key: str, i: int) -> tuple[int, ...]:
    """Sample ``i``'s own size along every dim of feature ``key``: the row shape the run stored,
    else (runs written before row shapes) one past its last kept position."""
    shape = tensors.get(f"{SHAPE_PREFIX}input/{key}")
    if shape is not None:
        return tuple(int(n) for n in shape[i])
    keep = tensors[f"keep/{key}"][i]
    sizes = []
    for d in range(keep.dim()):
        present = keep.movedim(d, 0).reshape(keep.shape[d], -1).any(dim=1)
        sizes.append(int(present.nonzero().max()) + 1 if present.any() else 1)
    return tuple(sizes)


def _score_shard(evaluator: Evaluator, keys: list[str], tensors: dict[str, torch.Tensor],
                 seed: int) -> dict[str, torch.Tensor]:
    """Every sample of one shard scored on its own tokens, samples of one own length together."""
    size = tensors[f"input/{keys[0]}"].shape[0]
    own = [tuple(_own(tensors, k, i) for k in keys) for i in range(size)]
    scorer = evaluator.metrics["comprehensiveness"].scorer
    percent = len(scorer.percentages)
    out = {"comprehensiveness": torch.zeros(size), "sufficiency": torch.zeros(size),
           "valid": torch.zeros(size, dtype=torch.bool)}
    out.update({f"{part}/{m}": torch.zeros(size, percent) for part in ("drops", "random") for m in METRICS})
    generator = torch.Generator().manual_seed(seed)
    device = model_device(evaluator.model)
    for sizes in sorted(set(own)):
        rows = [i for i in range(size) if own[i] == sizes]
        cut = {k: tuple(slice(0, n) for n in s) for k, s in zip(keys, sizes, strict=False)}
        batch = {k: torch.stack([tensors[f"input/{k}"][i][cut[k]] for i in rows]).to(device) for k in keys}
        attributions = {k: torch.stack([tensors[f"attr/{k}"][i][cut[k]] for i in rows]).float().to(device)
                        for k in keys}
        noise = {k: torch.rand(a.shape, generator=generator).to(device) for k, a in attributions.items()}
        originals = scorer.originals(batch)
        for part, given in (("drops", attributions), ("random", noise)):
            for metric, drops in scorer.drops(batch, given, METRICS, originals).items():
                out[f"{part}/{metric}"][rows] = drops.t().float().cpu()
                if part == "drops":
                    score, valid = finish(drops, originals, scorer.percentages, False)
                    out[metric][rows], out["valid"][rows] = score.float().cpu(), valid.cpu()
    return out
