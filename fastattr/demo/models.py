"""Small clinical models of fastattr's own that speak the PyHealth model protocol.

They let the demo, the tests and users without PyHealth explain real models. A feature is either
token codes (``[B, N]`` ids, 0 = padding, 1 = unknown; or nested visits ``[B, V, C]``) or
continuous values ``[B, N, F]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastattr.interpret.features import FeatureBatch, FeatureLayout


@dataclass(frozen=True)
class FeatureProcessor:
    """What PyHealth's input processors tell a model: the tuple layout and token-ness."""

    token: bool
    size: int
    layout: tuple[str, ...] = ("value",)

    def schema(self) -> tuple[str, ...]:
        return self.layout

    def is_token(self) -> bool:
        return self.token


@dataclass
class FeatureSpec:
    """``input_processors`` and ``output_schema`` of a model, as PyHealth's datasets hold them."""

    input_processors: dict[str, FeatureProcessor]
    output_schema: dict[str, str] = field(default_factory=lambda: {"label": "multiclass"})


class EmbeddingModel(nn.Module):
    """``{key: value}`` -> ``{key: embedding}``: tokens through ``nn.Embedding`` (padding 0 embeds
    to zeros; nested visits gain the embedding as a trailing dim), continuous values through a
    linear map."""

    def __init__(self, processors: dict[str, FeatureProcessor], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({
            k: nn.Embedding(p.size, dim, padding_idx=0) if p.token else nn.Linear(p.size, dim)
            for k, p in processors.items()
        })

    def forward(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in values.items():
            layer = self.layers[key]
            out[key] = layer(value.long()) if isinstance(layer, nn.Embedding) else layer(value.float())
        return out


class ProtocolModel(nn.Module):
    """Shared protocol plumbing: ``feature_keys``, ``dataset``, ``device``, ``forward``."""

    def __init__(self, spec: FeatureSpec, num_classes: int, dim: int) -> None:
        super().__init__()
        self.dataset = spec
        self.feature_keys = list(spec.input_processors)
        self.label_keys = list(spec.output_schema)
        self.num_classes = num_classes
        self.embedding_model = EmbeddingModel(spec.input_processors, dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_embedding_model(self) -> nn.Module:
        return self.embedding_model

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        """Embeds each feature's value (masks taken from the raw values), then ``forward_from_embedding``."""
        features = FeatureBatch.from_batch(self, batch, device=self.device)
        embedded = self.embedding_model(features.values())
        labels = {k: batch[k] for k in self.label_keys if k in batch}
        return self.forward_from_embedding(**features.call(embedded), **labels)

    def _outputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {"logit": logits, "y_prob": logits.softmax(-1) if logits.shape[1] > 1 else logits.sigmoid()}
        label = batch.get(self.label_keys[0]) if self.label_keys else None
        if isinstance(label, torch.Tensor):
            label = label.to(logits.device)
            if logits.shape[1] == 1:
                out["loss"] = nn.functional.binary_cross_entropy_with_logits(logits, label.float().view(-1, 1))
            else:
                out["loss"] = nn.functional.cross_entropy(logits, label.long().view(-1))
            out["y_true"] = label
        return out

    def _tokens(self, key: str, feature: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded value as ``[B, N, D]`` and its boolean mask ``[B, N]``."""
        layout = FeatureLayout.of(self, key)
        value, mask = layout.value(feature), layout.mask(feature)
        value = value.to(self.device)
        if value.dim() == 4:  # nested visits: sum the codes of a visit (padding codes left out)
            keep = mask.to(self.device).to(value.dtype).unsqueeze(-1) if mask is not None and mask.dim() == 3 else 1
            value = (value * keep).sum(dim=2)
        if mask is not None:
            mask = mask.to(self.device).bool()
            if value.dim() == 2:  # one vector per sample: a single token
                mask = mask.reshape(mask.shape[0], -1).any(dim=-1, keepdim=True)
            elif mask.dim() == 3:
                mask = mask.any(dim=-1)
        if value.dim() == 2:
            value = value.unsqueeze(1)
        if mask is None:
            mask = value.abs().sum(-1) != 0
        return value, mask


class MultiHeadSelfAttention(nn.Module):
    """Self-attention that can keep its map and, after backward, the map's gradient."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_map: torch.Tensor | None = None
        self.attn_grad: torch.Tensor | None = None

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.attn_grad = grad.detach()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, capture: bool) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = self.softmax(scores)
        self.attn_map, self.attn_grad = (attn.detach(), None) if capture else (None, None)
        if capture:
            attn.register_hook(self._keep_grad)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = MultiHeadSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, capture: bool) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), mask, capture))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TransformerClassifier(ProtocolModel):
    """A CLS-token Transformer per feature; the CLS outputs are concatenated and classified.

    Follows the PyHealth protocol including Chefer's: attention maps ``[B, H, N+1, N+1]`` (CLS
    first) and relevance read from the CLS row without the CLS column.
    """

    def __init__(self, spec: FeatureSpec, num_classes: int = 2, dim: int = 32, heads: int = 2,
                 layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__(spec, num_classes, dim)
        self.config = {"num_classes": num_classes, "dim": dim, "heads": heads, "layers": layers, "dropout": dropout}
        self.cls = nn.ParameterDict({k: nn.Parameter(torch.randn(dim) * 0.02) for k in self.feature_keys})
        self.encoders = nn.ModuleDict({
            k: nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers)) for k in self.feature_keys
        })
        self.norm = nn.LayerNorm(dim * len(self.feature_keys))
        self.head = nn.Linear(dim * len(self.feature_keys), 1 if num_classes == 2 else num_classes)
        self._capture = False

    def forward_from_embedding(self, **batch: Any) -> dict[str, torch.Tensor]:
        pooled = []
        for key in self.feature_keys:
            x, mask = self._tokens(key, batch[key])
            cls = self.cls[key].to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
            for block in self.encoders[key]:
                x = block(x, mask, self._capture)
            pooled.append(x[:, 0])
        return self._outputs(self.head(self.norm(torch.cat(pooled, dim=-1))), batch)

    def set_attention_hooks(self, enabled: bool) -> None:
        self._capture = bool(enabled)

    def get_attention_layers(self) -> dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]]:
        return {k: [(blk.attention.attn_map, blk.attention.attn_grad) for blk in self.encoders[k]]
                for k in self.feature_keys}

    def get_relevance_tensor(self, R: dict[str, torch.Tensor], **batch: Any) -> dict[str, torch.Tensor]:
        return {k: r[:, 0, 1:] for k, r in R.items()}


class MLPClassifier(ProtocolModel):
    """Masked mean of each feature's embeddings, concatenated, through a two-layer MLP."""

    def __init__(self, spec: FeatureSpec, num_classes: int = 2, dim: int = 32, hidden: int = 64) -> None:
        super().__init__(spec, num_classes, dim)
        self.config = {"num_classes": num_classes, "dim": dim, "hidden": hidden}
        self.mlp = nn.Sequential(nn.Linear(dim * len(self.feature_keys), hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1 if num_classes == 2 else num_classes))

    def forward_from_embedding(self, **batch: Any) -> dict[str, torch.Tensor]:
        pooled = []
        for key in self.feature_keys:
            x, mask = self._tokens(key, batch[key])
            m = mask.to(x.dtype).unsqueeze(-1)
            pooled.append((x * m).sum(1) / m.sum(1).clamp_min(1.0))
        return self._outputs(self.mlp(torch.cat(pooled, dim=-1)), batch)


MODELS = {cls.__name__: cls for cls in (TransformerClassifier, MLPClassifier)}


def save_checkpoint(model: ProtocolModel, path: str | Any, **extra: Any) -> None:
    """Save a fastattr model (class, configuration, features, weights) and ``extra`` metadata."""
    if type(model).__name__ not in MODELS:
        raise TypeError(f"save_checkpoint saves fastattr.demo.models models; got {type(model).__name__}")
    torch.save({
        "format": "fastattr-model/1",
        "class": type(model).__name__,
        "config": model.config,
        "features": {k: {"token": p.token, "size": p.size, "layout": list(p.layout)}
                     for k, p in model.dataset.input_processors.items()},
        "output_schema": dict(model.dataset.output_schema),
        "state_dict": model.state_dict(),
        "extra": extra,
    }, path)


def load_checkpoint(path: str | Any, map_location: str | torch.device = "cpu") -> tuple[ProtocolModel, dict]:
    """Load a model saved by :func:`save_checkpoint`, in eval mode; returns ``(model, extra)``."""
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != "fastattr-model/1":
        raise ValueError(f"{path} is not a fastattr model checkpoint")
    spec = FeatureSpec({k: FeatureProcessor(token=v["token"], size=v["size"], layout=tuple(v["layout"]))
                        for k, v in data["features"].items()}, data["output_schema"])
    model = MODELS[data["class"]](spec, **data["config"])
    model.load_state_dict(data["state_dict"])
    return model.eval(), data["extra"]
