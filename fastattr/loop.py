"""The oracle: PyHealth 2.1.0's two algorithms restated on their own terms, step by step as
``../shared/REFERENCE.md`` describes them, importing nothing from the fastattr code they check.

IG runs one forward and backward per path point on the padded batch; Chefer forms the full
relevance matrix R per layer. This is the baseline fastattr's speed is measured against where
PyHealth is not installed, and the reference for fastattr's own models in the tests. Keep it
plain: every rule (mask, baseline, embedding, target, shape mapping) is written out here again,
so a bug in fastattr's protocol code cannot hide behind the same bug in its oracle.
"""
from __future__ import annotations

from typing import Any

import torch


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _schema(model: Any, key: str) -> tuple[str, ...]:
    return tuple(model.dataset.input_processors[key].schema())


def _targets(target_class_idx: Any, logits: torch.Tensor) -> torch.Tensor:
    """Step 3 of PyHealth's IG: one column -> 0; a given class for every row; else the argmax."""
    batch = logits.shape[0]
    if logits.shape[-1] == 1:
        return torch.zeros(batch, dtype=torch.long, device=logits.device)
    if target_class_idx is None:
        return logits.argmax(dim=-1)
    t = torch.as_tensor(target_class_idx, device=logits.device).long().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _ig_inputs(model: Any, batch: dict, device: torch.device) -> tuple[dict, dict, dict, dict]:
    """Step 1-2 of PyHealth's IG: the feature tuples (a mask appended where the schema has none),
    their values, value slots and token-ness."""
    inputs, values, slots, token = {}, {}, {}, {}
    for key in model.feature_keys:
        if key not in batch:
            continue
        feature = batch[key]
        feature = tuple(feature) if isinstance(feature, (tuple, list)) else (feature,)
        feature = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in feature)
        schema = _schema(model, key)
        slot = schema.index("value")
        value = feature[slot]
        is_token = bool(model.dataset.input_processors[key].is_token())
        if "mask" not in schema:  # step 2: the appended mask
            if is_token:
                mask = (value != 0).int()
            elif value.dim() >= 3:
                mask = (value.abs().sum(dim=-1) != 0).int()
            else:
                mask = (value != 0).int()
            feature = feature + (mask,)
        inputs[key], values[key], slots[key], token[key] = feature, value, slot, is_token
    return inputs, values, slots, token


def step_loop_integrated_gradients(model: torch.nn.Module, steps: int = 50, baseline: dict | None = None,
                                   target_class_idx: Any = None, use_embeddings: bool = True,
                                   **batch: Any) -> dict[str, torch.Tensor]:
    """Attributions by PyHealth 2.1.0's algorithm: ``steps + 1`` single-point forward/backward passes."""
    alphas = [step / steps for step in range(steps + 1)]
    return path_loop_integrated_gradients(model, alphas, [1.0 / (steps + 1)] * (steps + 1), baseline,
                                          target_class_idx, use_embeddings, **batch)


def path_loop_integrated_gradients(model: torch.nn.Module, alphas: list[float], weights: list[float],
                                   baseline: dict | None = None, target_class_idx: Any = None,
                                   use_embeddings: bool = True, **batch: Any) -> dict[str, torch.Tensor]:
    """PyHealth's algorithm with any quadrature: one forward/backward per path point ``alphas[j]``,
    the gradients summed with ``weights[j]`` (PyHealth's own: ``k / steps``, ``1 / (steps + 1)``);
    with a converged rule, the reference integral for ``steps="auto"``."""
    model.eval()
    device = _device(model)
    inputs, values, slots, token = _ig_inputs(model, batch, device)
    raw_shapes = {k: v.shape for k, v in values.items()}

    with torch.no_grad():
        logits = model.forward(**inputs)["logit"]
    targets = _targets(target_class_idx, logits)

    # step 4: baselines in raw space
    if baseline is None:
        base = {k: torch.ones_like(v) if (use_embeddings and token[k]) else torch.zeros_like(v) + 0.01
                for k, v in values.items()}
    else:
        base = {k: baseline[k].to(device) for k in values}
    # step 5: token features' values and baselines replaced by their embeddings
    embedder = model.get_embedding_model() if use_embeddings else None
    embedded = {k for k in values if use_embeddings and token[k]}
    x = dict(values)
    if embedded:
        with torch.no_grad():
            ex = embedder({k: values[k] for k in embedded})
            eb = embedder({k: base[k] for k in embedded})
        for k in embedded:
            x[k], base[k] = ex[k], eb[k]
    x = {k: v.float() if not v.is_floating_point() else v for k, v in x.items()}
    base = {k: b.to(x[k].dtype) for k, b in base.items()}
    grads = _path_gradients(model, inputs, slots, token, x, base, targets, alphas, weights, embedder)

    # steps 7-8: the weighted sum, times (x - b), summed over the embedding dim, mapped to the raw shape
    result = {}
    for k in x:
        attr = (x[k] - base[k]) * grads[k]
        if k in embedded and attr.dim() >= 3:
            attr = attr.sum(dim=-1)
        shape = raw_shapes[k]
        if attr.shape != shape:
            while attr.dim() < len(shape):
                attr = attr.unsqueeze(-1)
            attr = attr.expand(shape)
        result[k] = attr.detach()
    return result


def _path_gradients(model: Any, inputs: dict, slots: dict, token: dict, x: dict, base: dict, targets: torch.Tensor,
                    alphas: list[float], weights: list[float], embedder: Any) -> dict[str, torch.Tensor]:
    """Step 6: one forward and backward per path point, the gradients summed with the weights."""
    grads = {k: torch.zeros_like(x[k]) for k in x}
    for alpha, weight in zip(alphas, weights, strict=True):
        points = {k: (base[k] + alpha * (x[k] - base[k])).detach().requires_grad_(True) for k in x}
        call = {}
        for k, feature in inputs.items():
            point = points[k]
            if embedder is not None and not token[k]:
                point = embedder({k: point})[k]
            parts = list(feature)
            parts[slots[k]] = point
            call[k] = tuple(parts)
        out = (model.forward_from_embedding(**call) if embedder is not None else model.forward(**call))["logit"]
        model.zero_grad()
        out.gather(1, targets.view(-1, 1)).sum().backward()
        for k in x:
            if points[k].grad is not None:
                grads[k] += weight * points[k].grad
    model.zero_grad(set_to_none=True)
    return grads


def full_relevance(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """PyHealth 2.1.0's propagation as its chefer.py writes it: R = I, then R = R + cam @ R per
    layer with cam = mean over heads of clamp(attn * grad, 0); returns the full ``[B, N, N]``."""
    attn0 = layers[0][0]
    R = torch.eye(attn0.shape[-1], device=attn0.device).unsqueeze(0).repeat(attn0.shape[0], 1, 1)
    for attn, grad in layers:
        cam = (grad * attn).clamp(min=0)
        if cam.dim() == 4:
            cam = cam.mean(dim=1)
        R = R + torch.matmul(cam, R).detach()
    return R


def full_chefer_relevance(model: torch.nn.Module, target_class_idx: Any = None,
                          **batch: Any) -> dict[str, torch.Tensor]:
    """Chefer relevance by PyHealth 2.1.0's algorithm: a full backward, then the full R per layer,
    reduced by the model and expanded to nested inputs' shapes."""
    model.eval()
    model.set_attention_hooks(True)
    try:
        logits = model(**batch)["logit"]
    finally:
        model.set_attention_hooks(False)
    targets = _targets(target_class_idx, logits.detach())
    model.zero_grad()
    (torch.nn.functional.one_hot(targets, logits.shape[1]).float() * logits).sum().backward()
    model.zero_grad(set_to_none=True)
    R = {key: full_relevance(layers) for key, layers in model.get_attention_layers().items()}
    result = model.get_relevance_tensor(R, **batch)
    out = {}
    for key, vector in result.items():
        feature = batch.get(key)
        value = feature[_schema(model, key).index("value")] if isinstance(feature, (tuple, list)) else feature
        if isinstance(value, torch.Tensor) and value.dim() > vector.dim():
            while vector.dim() < value.dim():
                vector = vector.unsqueeze(-1)
            vector = vector.expand_as(value)
        out[key] = vector
    return out


def _probs(model: Any, inputs: dict, kind: str,
           target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyHealth's get_model_predictions, less the filter: the explained class's probability and the class."""
    with torch.no_grad():
        out = model(**inputs)
    if "y_prob" in out:
        prob = out["y_prob"]
    elif kind in ("binary", "multilabel"):
        prob = torch.sigmoid(out["logit"])
    else:
        prob = torch.softmax(out["logit"], dim=-1)
    prob = prob.unsqueeze(-1) if prob.dim() == 1 else prob
    target = prob.argmax(dim=-1) if target is None else target
    return prob.gather(-1, target.unsqueeze(-1)).squeeze(-1), target


def _top_mask(attr: torch.Tensor, percentage: float) -> torch.Tensor:
    mask = torch.zeros_like(attr)
    for i in range(attr.shape[0]):
        row = attr[i].flatten()
        if row.min() == row.max():
            flat = torch.zeros_like(row)
            flat[:max(1, int(row.numel() * percentage / 100.0))] = 1.0
        else:
            flat = (row >= torch.quantile(row, 1.0 - percentage / 100.0, interpolation="higher")).float()
        mask[i] = flat.reshape(attr[i].shape)
    return mask


def _remove(model: Any, key: str, x: Any, mask: torch.Tensor, strategy: str) -> Any:
    """One feature with the masked positions removed (a tuple's value slot by its schema)."""
    if isinstance(x, tuple):
        slot = _schema(model, key).index("value")
        return x[:slot] + (_remove(model, key, x[slot], mask, strategy),) + x[slot + 1:]
    if not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        out = torch.where(mask.bool(), torch.zeros_like(x), x)
        for b in range(out.shape[0]):
            if not out[b].any():
                nonzero = (x[b] != 0).nonzero()
                if len(nonzero):
                    out[b][tuple(nonzero[0])] = x[b][tuple(nonzero[0])]
        return out
    if strategy == "zero":
        return x * (1 - mask)
    return x * (1 - mask) + x.mean(dim=0, keepdim=True) * mask  # "mean"


def loop_removal_scores(model: Any, inputs: dict, attributions: dict, *, sufficiency: bool, kind: str,
                        sample_filter: Any, percentages: list[float], strategy: str = "zero"
                        ) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """PyHealth 2.1.0's comprehensiveness (or sufficiency) of one batch, one padded forward per
    percentage: ``({percentage: drops [B]}, sample classes [B])`` (1 positive, -1 negative, 0 ignore)."""
    prob, target = _probs(model, inputs, kind)
    classes = sample_filter(prob, kind)
    prob[classes == 0], target[classes == 0] = 0.0, 0
    negative = classes == -1
    signed = {k: torch.where(negative.view(-1, *[1] * (a.dim() - 1)), -a, a) for k, a in attributions.items()}
    out = {}
    for percentage in percentages:
        ablated = dict(inputs)
        for key, attr in signed.items():
            mask = _top_mask(attr, percentage)
            ablated[key] = _remove(model, key, inputs[key], 1 - mask if sufficiency else mask, strategy)
        after, _ = _probs(model, ablated, kind, target)
        after[classes == 0] = 0.0
        drop = torch.zeros(prob.shape[0])
        for b in range(prob.shape[0]):
            if classes[b] != 0:
                drop[b] = -prob[b] + after[b] if negative[b] else prob[b] - after[b]
        out[percentage] = drop
    return out, classes


def _shap_inputs(model: Any, batch: dict, device: torch.device) -> tuple[dict, dict]:
    """The feature tuples (PyHealth's mask appended where the schema has none) and their values."""
    inputs, values = {}, {}
    for key in model.feature_keys:
        if key not in batch:
            continue
        parts = (batch[key],) if isinstance(batch[key], torch.Tensor) else tuple(batch[key])
        parts = tuple(p.to(device) if isinstance(p, torch.Tensor) else p for p in parts)
        schema = _schema(model, key)
        value = parts[schema.index("value")]
        if "mask" not in schema:
            token = model.dataset.input_processors[key].is_token()
            mask = (value != 0) if token or value.dim() < 3 else (value.abs().sum(-1) != 0)
            parts = (*parts, mask.int())
        inputs[key], values[key] = parts, value
    return inputs, values


def _shap_coalitions(total: int, count: int, random_seed: int | None, device: torch.device) -> list[torch.Tensor]:
    """Empty, full, then ``torch.randint(2, (M,))`` one per coalition from the global generator,
    seeded for the call (its state restored) unless ``random_seed`` is ``None``."""
    state = torch.get_rng_state()
    if random_seed is not None:
        torch.manual_seed(random_seed)
    coalitions = [torch.zeros(total, device=device), torch.ones(total, device=device)]
    for _ in range(max(0, count - 2)):
        coalitions.append(torch.randint(2, (total,), device=device).float())
    if random_seed is not None:
        torch.set_rng_state(state)
    return coalitions


def _shap_fit(coalitions: list[torch.Tensor], preds: list[torch.Tensor], regularization: float) -> torch.Tensor:
    """PyHealth's weighted ridge least squares, float32, built and solved as PyHealth does (its float32
    solution depends on the construction: the system is ill-conditioned)."""
    import math

    x = torch.stack(coalitions)
    total = x.shape[1]
    weights = [torch.tensor(1000.0 if z in (0, total) else (total - 1) / (math.comb(total, z) * z * (total - z)),
                            dtype=torch.float32) for z in x.sum(1).long().tolist()]
    root = torch.stack(weights).to(x.device).sqrt()[:, None]
    ridge = torch.sqrt(torch.tensor(regularization, device=x.device)) * torch.eye(total, device=x.device)
    y = torch.stack(preds)
    a = torch.cat([root * x, ridge])
    b = torch.cat([root * y, torch.zeros((total, y.shape[1]), device=x.device)])
    return torch.linalg.lstsq(a, b).solution.T


def loop_kernel_shap(model: Any, batch: dict, *, use_embeddings: bool = True, max_coalitions: int = 1000,
                     regularization: float = 1e-6, random_seed: int | None = 42, baseline: dict | None = None,
                     target_class_idx: Any = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """PyHealth 2.1.0's Kernel SHAP, one forward of the whole padded batch per coalition, over the
    batch's ``M`` positions (each key's ``shape[1]``, keys sorted): ``(attributions, logits [N, B])``."""
    device = _device(model)
    inputs, values = _shap_inputs(model, batch, device)
    logits = model.forward(**inputs)["logit"].detach()
    targets = _targets(target_class_idx, logits if logits.dim() > 1 else logits[:, None])
    token = {k: bool(model.dataset.input_processors[k].is_token()) for k in values}
    if baseline is None:
        baseline = {k: torch.ones_like(v) if token[k] else torch.zeros_like(v) + 0.01 for k, v in values.items()}
    embed = model.get_embedding_model() if use_embeddings else None
    xs = {k: embed({k: v})[k] if embed is not None and token[k] else v for k, v in values.items()}
    bs = {k: embed({k: baseline[k].to(device)})[k] if embed is not None and token[k] else baseline[k].to(device)
          for k in values}
    keys = sorted(values)
    counts = [values[k].shape[1] if values[k].dim() >= 2 else values[k].shape[-1] for k in keys]
    size = next(iter(values.values())).shape[0]
    coalitions = _shap_coalitions(sum(counts), min(2 ** sum(counts), max_coalitions), random_seed, device)
    preds = []
    with torch.no_grad():
        for coalition in coalitions:
            call = dict(inputs)
            for key, gate in zip(keys, coalition.split(counts), strict=True):
                g = gate.expand(size, -1)
                while g.dim() < xs[key].dim():
                    g = g.unsqueeze(-1)
                mixed = torch.where(g == 1, xs[key], bs[key])
                if embed is not None and not token[key]:
                    mixed = embed({key: mixed})[key]
                slot = _schema(model, key).index("value")
                call[key] = (*inputs[key][:slot], mixed, *inputs[key][slot + 1:])
            out = model.forward_from_embedding(**call) if embed is not None else model.forward(**call)
            column = out["logit"] if out["logit"].dim() > 1 else out["logit"][:, None]
            preds.append(column.gather(1, targets[:, None])[:, 0])
    out = {}
    for key, part in zip(keys, _shap_fit(coalitions, preds, regularization).split(counts, dim=1), strict=True):
        shape = values[key].shape
        while part.dim() < len(shape):
            part = part.unsqueeze(-1)
        out[key] = part.expand(shape) if part.shape != shape else part
    return out, torch.stack(preds)
