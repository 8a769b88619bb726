"""Drop-in replacement for ``pyhealth.interpret.methods.CheferRelevance``."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.core.backend import check_backend_name, resolve_backend
from fastattr.core.targets import resolve_targets
from fastattr.interpret.features import FeatureBatch, model_device, require_feature_protocol, require_methods
from fastattr.core.relevance import chefer_relevance, check_layers, propagate

CHEFER_METHODS = ("forward", "set_attention_hooks", "get_attention_layers", "get_relevance_tensor")


def avg_heads(cam: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """PyHealth's ``avg_heads``: mean over heads of ``clamp(grad * cam, 0)``; 3-D inputs are
    taken as one head and only clamped."""
    if cam.dim() < 4 and grad.dim() < 4:
        return (grad * cam).clamp(min=0)
    return (grad * cam).clamp(min=0).mean(dim=1)


def apply_self_attention_rules(R_ss: torch.Tensor, cam_ss: torch.Tensor) -> torch.Tensor:
    """PyHealth's ``apply_self_attention_rules``: ``cam_ss @ R_ss``."""
    return torch.matmul(cam_ss, R_ss)


def _probes(tokens: int, batch: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """Index-coded and random [B, N, N] probes that cost at most N*N memory (stride-0 expands)."""
    idx = torch.arange(tokens, dtype=torch.float32, device=device)
    rows = idx.view(1, tokens, 1).expand(batch, tokens, tokens)
    cols = idx.view(1, 1, tokens).expand(batch, tokens, tokens)
    # Random values of both signs: a reduction that sums, averages, scales or rectifies rows
    # cannot reproduce them exactly, only a selection can.
    per_entry = torch.randn(tokens, tokens, generator=generator).to(device).expand(batch, tokens, tokens)
    per_row = torch.randn(batch, tokens, 1, generator=generator).to(device).expand(batch, tokens, tokens)
    return [rows, cols, per_entry, per_row]


def detect_row_picks(model: Any, tokens: dict[str, int], batch: int, data: dict[str, Any],
                     device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Whether ``model.get_relevance_tensor`` returns, per key and sample, entries of one row of R.

    Returns ``{key: (rows [B], cols [B, M])}`` such that the reduction equals
    ``R[b, rows[b], cols[b, m]]``, or ``None`` when any key's reduction is something else.
    """
    generator = torch.Generator().manual_seed(0)
    probes = {k: _probes(n, batch, generator, device) for k, n in tokens.items()}
    outputs = []
    for i in range(4):
        try:
            out = model.get_relevance_tensor({k: p[i] for k, p in probes.items()}, **data)
        except Exception:  # a reduction that cannot take the probes (in-place writes...) is no row pick
            return None
        if not isinstance(out, dict) or set(out) != set(tokens):
            return None
        outputs.append(out)
    picks = {}
    for key, n in tokens.items():
        o_rows, o_cols, o_entry, o_row = (out[key] for out in outputs)
        if any(not isinstance(o, torch.Tensor) or o.dim() != 2 or o.shape[0] != batch for o in (o_rows, o_cols, o_entry, o_row)):
            return None
        if len({o.shape for o in (o_rows, o_cols, o_entry, o_row)}) != 1 or o_rows.shape[1] == 0:
            return None
        o_rows, o_cols = o_rows.float(), o_cols.float()
        if not (torch.equal(o_rows, o_rows.round()) and torch.equal(o_cols, o_cols.round())):
            return None
        if not bool((o_rows == o_rows[:, :1]).all()):
            return None
        if bool(((o_rows < 0) | (o_rows >= n) | (o_cols < 0) | (o_cols >= n)).any()):
            return None
        rows, cols = o_rows[:, 0].long(), o_cols.long()
        entry = probes[key][2][0][rows[:, None], cols]
        row = probes[key][3][torch.arange(batch, device=device), rows, 0][:, None].expand_as(o_row)
        if not (torch.equal(o_entry.float(), entry) and torch.equal(o_row.float(), row)):
            return None
        picks[key] = (rows, cols)
    return picks


def _gradient_sinks(sinks: list[torch.Tensor]):
    """A forward hook for the embedding module that collects its floating outputs as the ends of
    Chefer's backward, made to require grad where frozen weights left them outside the graph."""
    def sink(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not value.requires_grad:
                value = value.detach().requires_grad_(True)
            sinks.append(value)
        return value

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, dict):
            return {k: sink(v) for k, v in output.items()}
        if isinstance(output, (tuple, list)):
            return type(output)(sink(v) for v in output)
        return sink(output)
    return hook


def _grad_objects(layers: Any) -> list[torch.Tensor]:
    """The attention-gradient tensors the model holds right now (to recognise stale ones)."""
    if not isinstance(layers, dict):
        return []
    return [pair[1] for pairs in layers.values() for pair in pairs
            if isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], torch.Tensor)]


class CheferRelevance:
    """Chefer et al.'s gradient-weighted attention relevance for PyHealth-protocol models.

    Same results (to float rounding) as PyHealth 2.1.0's ``CheferRelevance``. Faster because
    the backward takes gradients only down to the embedding parameters (never the other weights),
    and because, when the model's ``get_relevance_tensor`` only picks one row of R per sample
    (detected with index-coded probes, or stated by an optional
    ``get_relevance_rows(**batch) -> {key: LongTensor[B]}``), that row is computed directly from
    the last layer to the first in O(L N^2) instead of forming R in O(L N^3).

    Args:
        model: a model with ``feature_keys``, ``dataset.input_processors``, ``forward``,
            ``set_attention_hooks``, ``get_attention_layers`` and ``get_relevance_tensor``.
            It is put in eval mode.
        backend: default backend, ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.
    """

    def __init__(self, model: torch.nn.Module, *, backend: str | None = None) -> None:
        require_feature_protocol(model, "CheferRelevance")
        require_methods(model, CHEFER_METHODS, "CheferRelevance")
        check_backend_name(backend)
        self.model = model
        self.backend = backend
        #: ``(probabilities [B, C], targets [B])`` of the last call's forward, for the cohort runner
        self.last_predictions: tuple[torch.Tensor, torch.Tensor] | None = None
        model.eval()

    def __call__(self, **data: Any) -> dict[str, torch.Tensor]:
        return self.attribute(**data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"

    def get_relevance_matrix(self, **data: Any) -> dict[str, torch.Tensor]:
        """Alias of ``attribute`` (PyHealth's name)."""
        return self.attribute(**data)

    def attribute(self, target_class_idx: int | torch.Tensor | None = None, *, backend: str | None = None,
                  **data: Any) -> dict[str, torch.Tensor]:
        """Relevance per feature key, ``[batch, tokens]`` (expanded to nested inputs' shapes).

        Args:
            target_class_idx: class to explain, an int or one class per sample; ``None`` takes
                the argmax of the logits. Ignored for a single logit.
            backend: ``"auto" | "torch" | "triton"`` for this call.
            **data: a dataloader batch, passed to the model as it is.
        """
        model = self.model
        use = resolve_backend(backend if backend is not None else self.backend, model_device(model))
        features = FeatureBatch.from_batch(model, data, add_masks=False)
        sinks: list[torch.Tensor] = []
        embed = getattr(model, "get_embedding_model", None)
        embed = embed() if callable(embed) else None
        handle = embed.register_forward_hook(_gradient_sinks(sinks)) if isinstance(embed, torch.nn.Module) else None
        model.set_attention_hooks(True)
        try:
            with torch.enable_grad():
                out = model(**data)
                logits = out["logit"]
        finally:
            model.set_attention_hooks(False)
            if handle is not None:
                handle.remove()
        if logits.dim() == 1:
            logits = logits.unsqueeze(1)
        batch, classes = logits.shape
        if batch == 0:
            raise ValueError("the batch is empty (batch size 0)")
        targets = resolve_targets(target_class_idx, logits.detach(), batch, classes, logits.device)
        prob = out.get("y_prob", logits) if isinstance(out, dict) else logits
        self.last_predictions = (prob.detach().float().reshape(batch, -1), targets)
        del out, prob
        score = (torch.nn.functional.one_hot(targets, classes).to(logits.dtype) * logits).sum()
        before = _grad_objects(model.get_attention_layers())
        self._backward(score, sinks)
        del score, logits, sinks
        layers = model.get_attention_layers()
        if not isinstance(layers, dict) or not layers:
            raise ValueError("model.get_attention_layers() must return {feature key: [(attn, grad), ...]}")
        for key, pairs in layers.items():
            for i, (_, grad) in enumerate(pairs):
                if grad is not None and any(grad is old for old in before):
                    raise ValueError(f"attention layer {i} of {key!r} still holds the gradient of an earlier call: "
                                     "this backward did not reach it")
        tokens = {key: check_layers(pairs, f"attention layers of {key!r}")[1] for key, pairs in layers.items()}
        device = next(iter(layers.values()))[0][0].device

        stated = getattr(model, "get_relevance_rows", None)
        if callable(stated):
            rows = stated(**data)
            result = {k: chefer_relevance(layers[k], rows[k].to(device), backend=use) for k in layers}
        else:
            picks = detect_row_picks(model, tokens, batch, data, device)
            if picks is not None:
                result = {k: propagate(layers[k], rows, use).gather(1, cols)
                          for k, (rows, cols) in picks.items()}
            else:
                full = {k: propagate(layers[k], None, use) for k in layers}
                result = model.get_relevance_tensor(full, **data)
        del layers
        return features.expand(result, nested_only=True)

    def _backward(self, score: torch.Tensor, sinks: list[torch.Tensor]) -> None:
        """Backward far enough that every attention gradient hook fires, leaving no ``.grad``:
        down to the embedding outputs (every attention map lies between them and the logits,
        whatever ``requires_grad`` says of the embedding weights), or, for a model whose
        embedding module is not called in its forward, to every parameter that requires grad."""
        if not sinks:
            sinks = [p for p in self.model.parameters() if p.requires_grad]
        if not sinks:
            raise ValueError("CheferRelevance found nothing to take gradients to: the model's embedding module "
                             "(get_embedding_model()) was not called in its forward and no parameter requires grad")
        torch.autograd.grad(score, sinks, allow_unused=True)
