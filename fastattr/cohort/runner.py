"""The cohort runner: :func:`attribute_dataset` streams every batch of a dataloader to a run folder as
checksummed shards (:mod:`fastattr.runs`), resumable after any interruption, and shardable
across processes with torch.distributed."""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastattr.cohort.batching import DatasetBatches, choose_batching, in_order
from fastattr.cohort.distributed import barrier, on_every_rank, start_process_group
from fastattr.cohort.methods import batch_dependent, settings
from fastattr.cohort.pipeline import Prefetch, ShardWriter
from fastattr.core.targets import resolve_targets
from fastattr.interpret.base import Attributor, Interpreter
from fastattr.interpret.batches import batch_size, select_samples
from fastattr.interpret.features import FeatureBatch, model_device
from fastattr.interpret.outputs import logits_of, reported_probabilities
from fastattr.runs.files import read_run_info, record_timing, run_info, write_run_info
from fastattr.runs.row_shapes import AloneShapes, row_shapes
from fastattr.runs.writer import ShardStore

ID_KEYS = ("patient_id", "visit_id")


def _ids(batch: dict[str, Any], size: int, index: int) -> dict[str, list[str]]:
    ids = {k: [str(v) for v in batch[k]] for k in ID_KEYS if isinstance(batch.get(k), (list, tuple))}
    if "patient_id" not in ids:
        ids["patient_id"] = [f"batch{index}:{i}" for i in range(size)]
    return ids


class _Part(NamedTuple):
    """One ``attribute`` call's output for consecutive patients of a batch: the result, the
    interpreter's own predictions (``last_predictions``: no extra forward) and its path report."""

    result: Any
    predictions: Any
    report: dict[str, torch.Tensor]


def _attribute_with_retry(interpreter: Any, batch: dict[str, Any], index: int, kwargs: dict[str, Any]
                          ) -> list[_Part]:
    """Attribute ``batch``; on CUDA out-of-memory, retry in halves down to one patient. Returns the
    parts in patient order."""
    size = batch_size(batch)
    before = getattr(interpreter, "last_predictions", None)
    try:
        result = interpreter.attribute(**kwargs, **batch)
        predictions = getattr(interpreter, "last_predictions", None)
        if predictions is before:  # not this call's (an interpreter that records none): never store stale ones
            predictions = None
        return [_Part(result, predictions, _path_report(interpreter))]
    except torch.cuda.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size == 1:
            raise RuntimeError(f"batch {index} ran out of memory even one patient at a time") from exc
    half = (size + 1) // 2
    return [part for start, stop in ((0, half), (half, size))
            for part in _attribute_with_retry(interpreter, select_samples(batch, slice(start, stop)), index, kwargs)]


def _path_report(interpreter: Any) -> dict[str, torch.Tensor]:
    """What ``IntegratedGradients(steps="auto")`` says about each patient's path: ``steps`` (the
    path points it took) and ``error_estimate`` (its estimated relative error); empty for a fixed
    rule (every patient takes the rule's points: ``run.json`` has them) and other interpreters."""
    steps, error = getattr(interpreter, "last_steps", None), getattr(interpreter, "last_error_estimates", None)
    if not isinstance(steps, torch.Tensor) or not isinstance(error, torch.Tensor):
        return {}
    return {"steps": steps.detach().cpu().contiguous(), "error_estimate": error.detach().cpu().contiguous()}


def _concat(parts: list[_Part]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Any, dict[str, torch.Tensor]]:
    """``(attributions, convergence delta or None, (probabilities, targets) or None, path report)``
    of the parts (a report entry only where every part has it)."""
    pairs = [p.result if isinstance(p.result, tuple) else (p.result, None) for p in parts]
    attributions = {k: torch.cat([a[k] for a, _ in pairs]) for k in pairs[0][0]}
    delta = torch.cat([d for _, d in pairs]) if pairs[0][1] is not None else None
    preds = [p.predictions for p in parts]
    predictions = None if any(p is None for p in preds) else \
        (torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]))
    report = {k: torch.cat([p.report[k] for p in parts]) for k in parts[0].report if all(k in p.report for p in parts)}
    return attributions, delta, predictions, report


def _inputs(model: Any, batch: dict[str, Any], tensors: dict[str, torch.Tensor],
            alone: list[AloneShapes] | None) -> dict[str, torch.Tensor]:
    """What a table needs beside each attribution (``attr/<key>`` in ``tensors``): the token ids
    (``input/<key>``, token features) and a bool tensor of the attribution's shape that is
    ``False`` at padding (``keep/<key>``); and each sample's own row shape (``shape/<name>``,
    :mod:`fastattr.runs.row_shapes`, from ``alone`` where the runner saw the samples)."""
    features = FeatureBatch.from_batch(model, batch)
    out = {}
    for key in features.keys:
        attr = tensors.get(f"attr/{key}")
        if attr is None:
            continue
        if features.layouts[key].token and features.value(key).shape == attr.shape:
            out[f"input/{key}"] = features.value(key).detach().cpu().contiguous()
        try:
            out[f"keep/{key}"] = features.keep(key, attr.shape)
        except RuntimeError:  # a result that does not broadcast with the mask: every entry is kept
            pass
    out.update(row_shapes(features, {**tensors, **out}, alone))
    return out


def _predictions(model: Any, batch: dict[str, Any], target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted probabilities ``[B, C]`` and the class each patient is explained for, for an
    interpreter that does not report its own (one extra forward)."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in model.feature_keys})
    logits = logits_of(out)
    targets = resolve_targets(target, logits, logits.shape[0], logits.shape[1], logits.device)
    return reported_probabilities(out, logits)[0], targets


def _info(interpreter: Any, model: Any, vocab: Any, annotations: Any, attribute_kwargs: dict[str, Any],
          batching: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """``run.json``: :func:`fastattr.runs.files.run_info` with the interpreter's ``settings``
    (:func:`fastattr.cohort.methods.settings`); a resumed run whose settings differ is refused."""
    info = {**run_info(interpreter, model, vocab, annotations, attribute_kwargs, batching),
            "settings": settings(interpreter)}
    before = (old or {}).get("settings")
    if before and info["settings"] and old.get("method") == info["method"] and before != info["settings"]:
        changed = sorted(k for k in {*before, *info["settings"]} if before.get(k) != info["settings"].get(k))
        were = ", ".join(f"{k}={before.get(k)!r}" for k in changed)
        raise ValueError(f"this run was attributed with other {type(interpreter).__name__} settings ({were}); "
                         "resume it with the same settings, or use another folder")
    return info


def attribute_dataset(interpreter: Interpreter | Attributor, dataloader: Iterable[dict[str, Any]], out: str | Path, *,
                      save_probabilities: bool = True, resume: bool = True, progress: bool | None = None,
                      sort_by_length: bool | str = "auto", batch_tokens: int | None = None,
                      vocab: Mapping[str, Any] | None = None,
                      annotations: Mapping[str, Mapping[str, str]] | None = None,
                      **attribute_kwargs: Any) -> Path:
    """Attribute every batch of ``dataloader`` with ``interpreter`` and stream the results to ``out``.

    Args:
        interpreter: a fastattr interpreter (``IntegratedGradients``, ``CheferRelevance``) or any
            object with ``attribute(**kwargs, **batch)`` and ``model``.
        dataloader: batches as dicts (a PyHealth dataloader, ``fastattr.cohort.CohortDataset``
            through a ``DataLoader``, or :class:`LengthSortedBatches`). Its order must be the same
            on every run and rank (``shuffle=False``); ids come from ``patient_id`` / ``visit_id``.
            Batches are moved to the model's device.
        out: a folder; created if needed.
        save_probabilities: also store the model's predicted probabilities and the class each
            patient was explained for (``target``), as the interpreter's own forward gave them.
        resume: continue a run found in ``out`` (verifying its shards by checksum and redoing any
            corrupt one); ``False`` refuses to touch a folder that already holds a run.
        progress: progress bar with patients/s and ETA (``None``: only on a terminal).
        sort_by_length: ``"auto"`` (default): when ``dataloader`` is a ``DataLoader`` over a
            map-style dataset in order (``shuffle=False``, no sampler of its own), its dataset is
            rebatched through its ``collate_fn`` as :class:`LengthSortedBatches`: batches of
            ``dataloader.batch_size`` similar-length samples (a loader of batch size 1 gets
            batches of ``COHORT_BATCH_TOKENS`` padded positions for the model's device), each
            padded only to its own longest; any other loader runs in its own order, with one
            warning saying why. ``True``: the same, but a loader that cannot be sorted is an
            error; ``False``: the loader's batches as they are. Results keep their dataset
            positions in the store, so readers see the same run whichever way it was batched.
            A method whose values for a patient depend on its batch (SHAP, LIME, RandomBaseline:
            :func:`fastattr.cohort.methods.batch_dependent`) keeps the loader's batches and order
            under ``"auto"``, since sorting would change its values; ``run.json``'s ``batching``
            then says ``batch_dependent`` with the batch size, order and padding used (the
            manifest lists which patients shared each shard; ``True`` sorts it anyway, recorded).
            So does a method whose values depend on padding through the model (PyHealth's
            Transformer attends the padded steps of a bias-embedded continuous feature when run as
            the batch gives it, as Chefer runs it): before sorting a fresh run, the dataset's first
            ``PADDING_PROBE_SAMPLES`` samples (which the run then uses: each is read once) are
            probed, the model with :func:`fastattr.check_padding` (no-grad) and, where its output
            depends on padding, the method on them batched and on ``CONFIRM_ALONE`` of them alone
            (IG passes each feature's mask, which such models honour, and stays sorted). Where the
            values depend on padding, ``"auto"`` runs the loader's own batches (each patient with the
            same neighbours as over the loader: PyHealth's results) and ``True`` sorts anyway, each
            with one warning, and ``run.json``'s ``batching`` names the features
            (``padding_dependent``). A dependence that shows only on later samples is not seen by the
            probe: pass ``False`` for such a model.
        batch_tokens: padded positions per sorted batch instead of a count of samples.
        vocab: ``{feature: {code: id} or [name by id]}`` to decode codes in tables and reports;
            by default each processor's ``code_vocab`` (PyHealth's), else codes are shown as ids.
            Stored in the run's ``run.json`` with the method, the model and how the batches were
            cut (a resumed run is cut the same way), so the folder is self-describing. Each
            shard also stores the token ids (``input/<key>``) and where the padding is
            (``keep/<key>``) beside the attributions.
        annotations: ``{feature: {code name: label}}`` marked in reports (e.g. known risk
            factors; the synthetic cohort's planted codes and distractors).
        **attribute_kwargs: passed to ``interpreter.attribute`` (``steps``, ``target_class_idx``,
            ``return_convergence_delta``...). With ``return_convergence_delta`` the delta is stored;
            with ``steps="auto"`` each patient's path points (``steps``) and estimated relative
            error (``error_estimate``).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started (NCCL on GPUs, gloo on
    CPUs) and rank r takes batches r, r + W, ...: the same batches as a single process. On CPUs the
    results are bitwise those of a single process with the same number of intra-op threads (torchrun
    gives each rank ``OMP_NUM_THREADS=1``) and otherwise agree to float rounding
    (:mod:`fastattr.cohort.distributed` says why the runner leaves the thread count alone).
    Every rank writes its own shards and rank 0 merges the manifest.
    A batch that runs out of CUDA memory is retried in halves before failing.
    """
    model = getattr(interpreter, "model", None)
    out = Path(out)
    rank, world, started = start_process_group()
    out.mkdir(parents=True, exist_ok=True)
    info = read_run_info(out) if resume else None
    # how an interrupted run's batches were cut (runs written before run.json said so were in order)
    recorded = None if info is None else info.get("batching", {"sorted": False})
    dataloader, batching = choose_batching(dataloader, model, sort_by_length, batch_tokens, recorded,
                                           batch_dependent(interpreter),
                                           lambda batch: interpreter.attribute(**attribute_kwargs, **batch))
    device = model_device(model) if isinstance(model, torch.nn.Module) else None
    store = ShardStore(out, rank, world)
    on_every_rank(store.lock)
    try:
        done = on_every_rank(lambda: store.recover(resume))
        if rank == 0 and model is not None:
            write_run_info(out, _info(interpreter, model, vocab, annotations, attribute_kwargs, batching, info),
                           resume)
        barrier()  # every rank has read the previous state before any rank writes
        timing = _run(interpreter, model, dataloader, store, done, rank, world, device, progress,
                      save_probabilities, attribute_kwargs)
        barrier()
        if rank == 0:
            store.merge()
            if model is not None:
                record_timing(out, timing)
        barrier()
        if progress is not False and timing["patients"]:
            share = timing["attributing_s"] / max(timing["wall_s"], 1e-9)
            tqdm.write(f"attributed {timing['patients']} patients in {timing['wall_s']:.1f} s "
                       f"({timing['patients'] / max(timing['wall_s'], 1e-9):.0f} patients/s); {share:.0%} of the time "
                       "inside the interpreter" + (f" (rank {rank})" if world > 1 else ""))
    finally:
        store.release()
        if started:
            dist.destroy_process_group()
    return out


def _run(interpreter: Any, model: Any, dataloader: Any, store: ShardStore, done: dict[int, dict], rank: int,
         world: int, device: torch.device | None, progress: bool | None, save_probabilities: bool,
         attribute_kwargs: dict[str, Any]) -> dict[str, float]:
    """This rank's batches: attribute each one not done and write its shard, with the next batch
    read and the previous shard written while the current one is attributed. Returns the wall
    time, the time inside the interpreter (results on the host) and the patients attributed."""
    try:
        total_patients = len(dataloader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        total_patients = None
    bar = tqdm(total=total_patients, unit="patient", desc=f"attributing (rank {rank}/{world})" if world > 1 else
               "attributing", disable=None if progress is None else not progress, smoothing=0.1)
    if isinstance(dataloader, DatasetBatches):
        batches = dataloader.for_run(skip=lambda i: i % world != rank and i not in done)
    else:
        batches = in_order(dataloader)
    mine = lambda index: index % world == rank and index not in done  # noqa: E731
    start, attributing, patients = time.perf_counter(), 0.0, 0
    source, writer = Prefetch(batches, device, mine), ShardWriter(store)
    try:
        for index, positions, batch, alone in source:
            size = len(positions)
            if batch is None:  # another rank's batch, not collated here
                bar.update(size)
                continue
            ids = _ids(batch, size, index)
            if index in done:
                if done[index]["ids"] != ids:
                    raise ValueError(f"batch {index} holds other patients than in the interrupted run; the "
                                     "dataloader must keep its order (shuffle=False) to resume")
                bar.update(size)
                continue
            if not mine(index):
                bar.update(size)
                continue
            began = time.perf_counter()
            parts = _attribute_with_retry(interpreter, batch, index, attribute_kwargs)
            attributions, delta, predictions, report = _concat(parts)
            tensors = {f"attr/{k}": v.detach().contiguous().cpu() for k, v in attributions.items()}
            tensors.update(report)
            if delta is not None:
                tensors["convergence_delta"] = delta.detach().contiguous().cpu()
            if model is not None and hasattr(model, "feature_keys"):
                tensors.update(_inputs(model, batch, tensors, alone))
            if save_probabilities and model is not None:
                if predictions is None:
                    predictions = _predictions(model, batch, attribute_kwargs.get("target_class_idx"))
                tensors["probability"] = predictions[0].cpu().contiguous()
                tensors["target"] = predictions[1].cpu().contiguous()
            attributing += time.perf_counter() - began
            patients += size
            writer.put(index, tensors, ids, positions)
            bar.update(size)
    finally:
        source.close()
        try:
            writer.close()  # every finished batch is written (and listed) before anything else happens
        finally:
            bar.close()
    return {"wall_s": time.perf_counter() - start, "attributing_s": attributing, "patients": patients}
