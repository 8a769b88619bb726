"""Drop-in replacement for ``pyhealth.interpret.methods.CheferRelevance``."""
from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.core import relevance as chefer_core
from fastattr.core.backend import resolve_backend
from fastattr.core.precision import model_precision
from fastattr.core.relevance import apply_self_attention_rules, avg_heads  # noqa: F401  (PyHealth-like path)
from fastattr.core.targets import resolve_targets, target_tensor
from fastattr.interpret.attention import capture
from fastattr.interpret.attention.row_picks import RowPicks, detect_row_picks  # noqa: F401  (detect_row_picks: public path)
from fastattr.interpret.base import Interpreter
from fastattr.interpret.batches import select_samples
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.lengths import Group, GroupedTask, layout_key, place_rows, relative_difference
from fastattr.interpret.outputs import logits_of, reported_probabilities
from fastattr.interpret.padding import PADDING_RTOL, extended_difference, input_logits

propagate = chefer_core.propagate
CHEFER_METHODS = ("forward", "set_attention_hooks", "get_attention_layers", "get_relevance_tensor")


@dataclass
class _Pass:
    """One forward with attention hooks and its backward, on a batch or a length group: the
    relevance per key as ``get_relevance_tensor`` shapes it, the logits, the probabilities and
    the targets explained."""

    relevance: dict[str, torch.Tensor]
    logits: torch.Tensor
    prob: torch.Tensor
    targets: torch.Tensor


@dataclass
class _Backward:
    """One hooked forward and its backward: the logits, probabilities and targets, the model's
    attention layers read after the backward, the first stale gradient among them as ``(key,
    layer)`` (or ``None``), and whether the backward went to the weights."""

    logits: torch.Tensor
    prob: torch.Tensor
    targets: torch.Tensor
    layers: Any
    stale: tuple[str, int] | None
    reached_weights: bool


class CheferRelevance(Interpreter):
    """Chefer et al.'s gradient-weighted attention relevance for PyHealth-protocol models.

    Same results (to float rounding) as PyHealth 2.1.0's ``CheferRelevance``. Faster because:
    samples run in groups of similar length, each padded only to its own longest (as IG's do;
    the padding check runs once per model and feature layout); the backward takes gradients only
    to the attention maps the model hooks (never the weights, nothing below the first map); and,
    for maps too large for the whole R to be cheap, when the model's ``get_relevance_tensor``
    only picks one row of R per sample (detected once per model and layout with index-coded
    probes, or stated by an optional ``get_relevance_rows(**batch) -> {key: LongTensor[B]}``),
    that row is computed directly from the last layer to the first in O(L N^2) instead of
    forming R in O(L N^3).

    Args:
        model: a model with ``feature_keys``, ``dataset.input_processors``, ``forward``,
            ``set_attention_hooks``, ``get_attention_layers`` and ``get_relevance_tensor``.
            It is put in eval mode.
        backend: default backend, ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.
        pack_lengths: ``"auto"`` (default): run samples in length groups once a check shows the
            model's logits and relevance ignore padding (checked once per model and feature
            layout; a model that fails runs padded, with a warning); ``True``: the same, but a
            failed check is an error; ``False``: always run the batch as given.
        precision: the model's arithmetic, ``"fp32"`` (default: exact, PyHealth's), ``"tf32"`` or
            ``"bf16"`` (:mod:`fastattr.core.precision`; the relevance recursion stays float32).

    Examples:
        A small Transformer of fastattr's own (any model with PyHealth's Chefer protocol works):

        >>> import torch
        >>> from fastattr import CheferRelevance
        >>> from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier
        >>> _ = torch.manual_seed(0)
        >>> spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=20)})
        >>> model = TransformerClassifier(spec, num_classes=3, dim=8, heads=2, layers=1)
        >>> batch = {"codes": torch.tensor([[3, 5, 7, 9], [4, 2, 0, 0]])}  # 0: padding
        >>> relevance = CheferRelevance(model).attribute(**batch)
        >>> relevance["codes"].shape
        torch.Size([2, 4])
        >>> relevance["codes"][1, 2:].tolist()  # exact zeros at padding, as in PyHealth
        [0.0, 0.0]
    """

    def __init__(self, model: torch.nn.Module, *, backend: str | None = None,
                 pack_lengths: bool | str = "auto", precision: str = "fp32") -> None:
        super().__init__(model, CHEFER_METHODS, group_method="chefer", compared="logits and relevance",
                         backend=backend, pack_lengths=pack_lengths, precision=precision)
        self._row_picks = RowPicks()  # per layout: is get_relevance_tensor a row pick
        self._state = capture.ModuleState(model)
        self._read: list[tuple[weakref.ref, int]] = []  # the gradients the last pass read, while they live
        self._hooks_tensors = False  # whether the model's last forward registered gradient hooks on tensors

    def get_relevance_matrix(self, **data: Any) -> dict[str, torch.Tensor]:
        """Alias of ``attribute`` (PyHealth's name)."""
        return self.attribute(**data)

    def attribute(self, target_class_idx: int | torch.Tensor | None = None, *, backend: str | None = None,
                  pack_lengths: bool | str | None = None, precision: str | None = None,
                  **data: Any) -> dict[str, torch.Tensor]:
        """Relevance per feature key, ``[batch, tokens]`` as the model's ``get_relevance_tensor``
        gives it (expanded to a nested input's shape where the input has more dims).

        Args:
            target_class_idx: class to explain, an int or one class per sample; ``None`` takes
                the argmax of the logits. Ignored for a single logit.
            backend: ``"auto" | "torch" | "triton"`` for this call.
            pack_lengths: ``"auto" | True | False`` for this call (default: the constructor's).
            precision: ``"fp32" | "tf32" | "bf16"`` for this call (default: the constructor's).
            **data: a dataloader batch, passed to the model as it is (or cut to a length group).
        """
        model = self.model
        device, call = self.begin(data, backend, pack_lengths, precision)
        use, pack, mode = resolve_backend(call.backend, device), call.pack_lengths, call.precision
        features = FeatureBatch.from_batch(model, data)
        key = layout_key(features)
        task = self._task(features, data, target_class_idx, use, key, mode, device)
        done, groups = self._lengths.execute(features, key, task, pack=pack, points=1, device=device)
        self.last_groups = [(features.size, None)] if groups is None else [(len(i), sizes) for i, sizes in groups]
        self.last_predictions, self.last_logits = (done.prob, done.targets), done.logits.float()
        if groups is not None:  # trimmed groups' probabilities are not the batch's as given, to the bit
            self.last_predictions_as_given = False
        return features.expand(done.relevance, nested_only=True)

    # -- pieces ------------------------------------------------------------------------------
    def _task(self, features: FeatureBatch, data: dict[str, Any], target: Any, use: str, key: tuple, mode: str,
              device: torch.device) -> GroupedTask:
        """Chefer's pass on a length group (the group's rows of the caller's batch, features cut) or on
        the batch as given, its putting back, and its padding checks: every trimmed batch's groups'
        logits against the same samples with one more padding position (a no-grad forward at the
        groups' own widths), and the relevance once per layout (in float32 whatever the precision: the
        checks are about the model, not rounding)."""
        rest = {k: v for k, v in data.items() if k not in features.keys}
        per_sample = target
        if target is not None and not isinstance(target, numbers.Integral):
            per_sample = target_tensor(target, features.size, torch.device("cpu"))
        ran: list[Group] = []

        def pass_in(precision: str):
            def run(group: Group | None, part: FeatureBatch) -> _Pass:
                if group is None:
                    return self._pass(data, target, use, key, precision, device)
                ran.append(group)
                rows = {**select_samples(rest, group[0], features.size), **part.inputs()}
                chosen = per_sample[group[0]] if isinstance(per_sample, torch.Tensor) else per_sample
                done = self._pass(rows, chosen, use, key, precision, device)
                fixed = None if chosen is not None else padded_argmax(self.model, features, group[0], done)
                return done if fixed is None else self._pass(rows, fixed, use, key, precision, device)
            return run

        def logits(part: FeatureBatch) -> torch.Tensor:
            return input_logits(self.model, part)

        run = pass_in(mode)
        check = (lambda placed: extended_difference(logits, features, ran, placed.logits)) if mode == "fp32" else None
        probe = None if mode == "fp32" else lambda groups: extended_difference(logits, features, groups)
        return GroupedTask(run, lambda parts: self._place(features, parts), probe=probe, check=check,
                           difference=_difference, check_run=run if mode == "fp32" else pass_in("fp32"))

    def _place(self, features: FeatureBatch, passes: list[tuple[torch.Tensor, FeatureBatch, _Pass]]) -> _Pass | None:
        """The groups' passes as one pass over the whole batch; ``None`` when the relevance of
        the groups cannot be put back in one shape (see :meth:`FeatureBatch.place_relevance`)."""
        relevance = features.place_relevance([(index, part, p.relevance) for index, part, p in passes])
        if relevance is None:
            return None
        rows = {name: place_rows(features.size, [(index, getattr(p, name)) for index, _, p in passes])
                for name in ("logits", "prob", "targets")}
        return _Pass(relevance, **rows)

    def _pass(self, data: dict[str, Any], target: Any, use: str, key: tuple, precision: str,
              device: torch.device) -> _Pass:
        """Forward with hooks, backward from the target logits, relevance: PyHealth's algorithm on
        ``data``. A backward to the embedding outputs reaches every attention map the logits
        depend on through the inputs; where a map is reached only through weights, the pass is
        redone with the backward taken to the weights too (as PyHealth's is)."""
        model = self.model
        for reach_weights in (False, True):
            done = self._forward_backward(data, target, reach_weights, precision, device)
            if done.reached_weights or done.stale is None and capture.all_gradients(done.layers):
                break
        logits, layers, stale = done.logits, done.layers, done.stale
        if not isinstance(layers, dict) or not layers:
            raise ValueError("model.get_attention_layers() must return {feature key: [(attn, grad), ...]}")
        tokens = {k: chefer_core.check_layers(pairs, f"attention layers of {k!r}")[1] for k, pairs in layers.items()}
        if stale is not None:
            raise ValueError(f"attention layer {stale[1]} of {stale[0]!r} still holds the gradient of an earlier "
                             "call: this backward did not reach it")
        self._read = [(weakref.ref(grad), grad._version) for pairs in layers.values() for _, grad in pairs]
        batch = logits.shape[0]
        maps = next(iter(layers.values()))[0][0].device
        stated = getattr(model, "get_relevance_rows", None)
        if callable(stated):
            rows = stated(**data)
            relevance = {k: chefer_core.chefer_relevance(layers[k], rows[k].to(maps), backend=use) for k in layers}
        else:
            picks = None
            small = all(chefer_core.full_path_is_cheaper(batch, n, len(layers[k]), maps) for k, n in tokens.items())
            if not small:
                picks = self._row_picks.find(model, key, tokens, batch, data, maps)
            if picks is not None:
                relevance = {k: propagate(layers[k], rows, use).gather(1, cols) for k, (rows, cols) in picks.items()}
            else:
                relevance = model.get_relevance_tensor({k: propagate(layers[k], None, use) for k in layers}, **data)
        return _Pass(relevance, logits, done.prob, done.targets)

    def _forward_backward(self, data: dict[str, Any], target: Any, reach_weights: bool, precision: str,
                          device: torch.device) -> _Backward:
        """One forward with the attention hooks on (off again after, even on error), the targets
        and the backward; then the model's attention layers, read after the backward as PyHealth
        reads them."""
        model = self.model
        embedded: list[torch.Tensor] = []
        handle = None
        embed = getattr(model, "get_embedding_model", None)
        embed = embed() if callable(embed) else None
        # The embedding outputs are collected (and made to require grad) unless the model is known
        # to hook its maps and no embedding weight is frozen: then its maps require grad anyway.
        if isinstance(embed, torch.nn.Module) and not (
                self._hooks_tensors and all(p.requires_grad for p in embed.parameters())):
            handle = embed.register_forward_hook(capture.gradient_sinks(embedded))
        model.set_attention_hooks(True)
        try:
            with torch.enable_grad(), capture.HookedTensors() as hooked, model_precision(precision, device):
                out = model(**data)
                logits = logits_of(out)
        finally:
            model.set_attention_hooks(False)
            if handle is not None:
                handle.remove()
        # The backward ends at the tensors the model hooked (its attention maps); a model that
        # keeps gradients some other way (module hooks) gets it down to the embedding outputs,
        # which every attention map lies above, frozen embedding weights or not (and a model that
        # stopped hooking tensors, to its weights).
        self._hooks_tensors = bool(hooked)
        sinks = hooked or embedded
        batch, classes = logits.shape
        if batch == 0:
            raise ValueError("the batch is empty (batch size 0)")
        targets = resolve_targets(target, logits.detach(), batch, classes, logits.device)
        prob, given = reported_probabilities(out, logits)
        self.last_predictions_as_given = given and precision == "fp32"
        del out
        score = logits.gather(1, targets.unsqueeze(1)).sum()  # sum(one_hot(target) * logits): the same gradient
        old = capture.OldTensors(self._state, self._read)
        reach_weights = reach_weights or not sinks
        weights = [p for p in model.parameters() if p.requires_grad] if reach_weights else []
        if not sinks and not weights:
            raise ValueError("CheferRelevance found nothing to take gradients to: the model registered no gradient "
                             "hook in its forward, its embedding module (get_embedding_model()) was not called, and "
                             "no parameter requires grad")
        # only the hooks' gradients are wanted: autograd.grad leaves every .grad untouched
        torch.autograd.grad(score, sinks + weights, allow_unused=True)
        del score, sinks, weights, hooked, embedded
        layers = model.get_attention_layers()
        stale = capture.first_stale(layers, old)
        return _Backward(logits.detach(), prob, targets, layers, stale, reach_weights)


# Classes whose logits are this close (relative to the largest logit, at least 1) could swap places
# between a trimmed group and the padded batch by float rounding, which the padding check bounds by
# PADDING_RTOL: their class is taken from the padded batch's logits, as PyHealth takes it.
TIE_RTOL = 10 * PADDING_RTOL


def padded_argmax(model: Any, features: FeatureBatch, index: torch.Tensor, done: _Pass) -> torch.Tensor | None:
    """A trimmed group's classes where a near-tie (:data:`TIE_RTOL`) resolves otherwise at the batch's
    width (those samples' logits there, PyHealth's argmax), else ``None``: the group's argmax stands."""
    logits = done.logits
    if logits.shape[1] == 1:
        return None
    top = logits.topk(2, dim=1).values
    near = (top[:, 0] - top[:, 1]) <= TIE_RTOL * logits.abs().amax(dim=1).clamp_min(1.0)
    if not bool(near.any()):
        return None
    targets = done.targets.clone()
    targets[near] = input_logits(model, features.subset(index[near.cpu()])).argmax(dim=1).to(targets.device)
    return None if torch.equal(targets, done.targets) else targets


def _difference(whole: _Pass, packed: _Pass) -> float:
    """The padding check: logits and relevance of the padded batch against the groups'."""
    worst = relative_difference(whole.logits, packed.logits)
    for key, ref in whole.relevance.items():
        worst = max(worst, relative_difference(ref, packed.relevance.get(key, torch.empty(0))))
    return worst
