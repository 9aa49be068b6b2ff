"""``distilled``: LLMLingua-2's keep/drop token classifier, trained locally on distilled labels.

Pan et al., "LLMLingua-2: Data Distillation for Efficient and Faithful Task-Agnostic Prompt
Compression", Findings of ACL 2024, arXiv 2403.12968. Inference follows ``__compress`` of
microsoft/LLMLingua ``prompt_compressor.py``:

1. one pass of a bidirectional encoder over the context in chunks of at most 512 tokens;
2. ``p_t = softmax(logits_t)[1]`` per encoder token; a word's probability is the mean over its
   tokens; force-kept words get probability 1;
3. the threshold is the ``int(100 * (1 - tau) + 1)``-th percentile of the word probabilities
   expanded by each word's length in tokens of the counting tokenizer (upstream: tiktoken);
4. words with ``p > threshold`` are kept, in order.

The classifier is trained here instead of downloaded (``scripts/train_distilled.py``): labels are
the words ``selfinfo`` (LLMLingua-1 with the bundled SmolLM2) keeps at a fixed rate on packaged
natural text (Paul Graham's essays, SQuAD paragraphs); the encoder is the bundled all-MiniLM-L6-v2,
frozen; the classifier is a two-layer MLP on its hidden states; the loss is token-level
cross-entropy with class weights. The trained head ships in ``flowsieve/methods/prompt/assets/``.

Deviations: the teacher is LLMLingua-1, not GPT-4 extractive compression (so no word alignment or
quality filtering is needed: the labels are already on the original words); the encoder is frozen
and only a probe is trained (upstream fine-tunes xlm-roberta-large end to end, Adam lr 1e-5), so the
probe's learning rate is higher (1e-3); no context-level filter (off by default upstream). Like
every scorer here, the budget is then met exactly: words above the threshold first, then the rest
by probability.

Shapes: P encoder tokens (pieces) of the context; D feature size; W words.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.methods.prompt.base import (
    PromptDoc,
    PromptScorer,
    Scores,
    count_words,
    register,
    token_runs,
    tokenize_spans,
)
from flowsieve.methods.prompt.lm import model_device

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_HEAD = ASSETS / "distilled_minilm.safetensors"


class DistilledHead(nn.Module):
    """Keep/drop classifier on frozen encoder features: (..., D) -> (..., 2) logits.

    Args:
        in_dim: feature size (encoder hidden size x number of layers used).
        hidden: width of the hidden layer.
        layers: encoder hidden-state indices concatenated into the features (0 = embeddings).
        meta: training provenance stored with the weights.
    """

    def __init__(
        self, in_dim: int, hidden: int = 256, layers: tuple[int, ...] = (-1,), meta: dict | None = None
    ) -> None:
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        self.meta = dict(meta or {})
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def keep_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (...,) probability of "keep"."""
        return torch.softmax(self.forward(x).float(), dim=-1)[..., 1]


def save_head(head: DistilledHead, path: str | Path) -> None:
    """Write the head's weights and its settings (in the safetensors metadata)."""
    from safetensors.torch import save_file

    lin0 = head.net[0]
    assert isinstance(lin0, nn.Linear)
    meta = {"in_dim": lin0.in_features, "hidden": lin0.out_features, "layers": list(head.layers), **head.meta}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"flowsieve_head": json.dumps(meta)})


def load_head(path: str | Path) -> DistilledHead:
    """Read a head written by :func:`save_head`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FlowsieveError(
            f"no trained head at {p}; train one with: python scripts/train_distilled.py --out {p}"
        )
    with safe_open(str(p), framework="pt") as f:
        raw = (f.metadata() or {}).get("flowsieve_head")
    if raw is None:
        raise FlowsieveError(f"{p} is not a flowsieve distilled head (no metadata)")
    meta = json.loads(raw)
    head = DistilledHead(
        int(meta.pop("in_dim")), int(meta.pop("hidden")), tuple(meta.pop("layers")), meta=meta
    )
    head.load_state_dict(load_file(str(p)))
    return head.eval()


@functools.lru_cache(maxsize=4)
def _cached_head(path: str) -> DistilledHead:
    return load_head(path)


@functools.lru_cache(maxsize=2)
def _cached_encoder(name: str) -> tuple[Any, Any]:
    from flowsieve.models import load

    return load(name)


# ------------------------------------------------------------------------------------------ features


def _chunks(runs: list[int], limit: int) -> list[tuple[int, int]]:
    """Cut P pieces into runs of at most ``limit``, at word starts where possible: [(a, b), ...]."""
    out, a = [], 0
    while a < len(runs):
        b = min(a + limit, len(runs))
        if b < len(runs):
            cut = b
            while cut > a + 1 and runs[cut] == runs[cut - 1]:
                cut -= 1  # do not split a word between two chunks
            b = cut if cut > a + 1 else b
        out.append((a, b))
        a = b
    return out


def encoder_features(
    encoder: nn.Module,
    tokenizer: Any,
    text: str,
    layers: tuple[int, ...],
    max_length: int = 512,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of every piece of ``text``: ((P, D) features, (P,) word index of each piece).

    The text is tokenised without special tokens, cut into chunks of at most ``max_length`` tokens
    (CLS and SEP included, when the tokenizer has them) of about equal size at word boundaries,
    and encoded in padded batches; ``layers`` selects the hidden states that are concatenated.
    Word indices count maximal runs of non-space characters (-1: a piece of only whitespace).
    """
    ids, spans = tokenize_spans(tokenizer, text)
    if not ids:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    runs = token_runs(text, spans)  # (P,) word of each piece
    cls = getattr(tokenizer, "cls_token_id", None)
    sep = getattr(tokenizer, "sep_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    specials = (cls is not None) + (sep is not None)
    limit = max_length - specials
    # as few chunks as the limit allows, of about equal size (less padding in the batch)
    n_chunks = math.ceil(len(ids) / limit)
    chunks = _chunks(runs.tolist(), min(limit, math.ceil(len(ids) / n_chunks) + 16))
    feats: list[torch.Tensor] = []
    dev = model_device(encoder)
    for c0 in range(0, len(chunks), batch_size):
        batch = chunks[c0 : c0 + batch_size]
        rows = [
            ([cls] if cls is not None else []) + ids[a:b] + ([sep] if sep is not None else [])
            for a, b in batch
        ]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.inference_mode():
            out = encoder(input_ids=x.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
        hs = torch.cat([out.hidden_states[k] for k in layers], dim=-1).float().cpu()  # (B, width, D)
        off = 1 if cls is not None else 0
        for i, (a, b) in enumerate(batch):
            feats.append(hs[i, off : off + b - a])
    return torch.cat(feats), runs


def word_probabilities(
    head: DistilledHead,
    encoder: nn.Module,
    tokenizer: Any,
    text: str,
    max_length: int = 512,
    batch_size: int = 16,
) -> torch.Tensor:
    """(W,) keep probability of every word of ``text``: the mean over its encoder pieces."""
    feats, runs = encoder_features(encoder, tokenizer, text, head.layers, max_length, batch_size)
    n_words = count_words(text)
    if feats.numel() == 0:
        return torch.zeros(n_words)
    with torch.inference_mode():
        p = head.keep_prob(feats).double()  # (P,)
    ok = runs >= 0
    total = torch.zeros(n_words, dtype=torch.float64).index_add_(0, runs[ok], p[ok])
    count = torch.zeros(n_words, dtype=torch.float64).index_add_(0, runs[ok], torch.ones_like(p[ok]))
    return (total / count.clamp(min=1)).float()


def percentile_threshold(expanded: np.ndarray, tau: float) -> float:
    """LLMLingua-2's threshold: the ``int(100 * (1 - tau) + 1)``-th percentile of ``expanded``."""
    if expanded.size == 0:
        return math.inf
    q = min(100.0, float(int(100 * (1 - tau) + 1)))
    return float(np.percentile(expanded, q))


# ------------------------------------------------------------------------------------------ the scorer


@dataclass
class Distilled(PromptScorer):
    """A locally trained LLMLingua-2-style classifier (see the module docstring).

    Attributes:
        head: path of a trained head (default: the one shipped in ``flowsieve/methods/prompt/assets``).
        encoder: bundled name or path of the encoder (default: the one the head was trained on).
        max_length: encoder chunk length, special tokens included.
        batch_size: chunks per encoder batch.
        encoder_model, encoder_tokenizer, head_module: objects to use instead of loading (tests).
    """

    paper = "Pan et al. 2024, LLMLingua-2 (recipe, local labels), arXiv 2403.12968"

    level = "word"
    needs_model = False
    head: str | None = None
    encoder: str | None = None
    max_length: int = 512
    batch_size: int = 16
    encoder_model: Any = field(default=None, repr=False)
    encoder_tokenizer: Any = field(default=None, repr=False)
    head_module: DistilledHead | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_length < 3 or self.batch_size < 1:
            raise FlowsieveError("max_length must be >= 3 and batch_size >= 1")
        if (self.encoder_model is None) != (self.encoder_tokenizer is None):
            raise FlowsieveError("give encoder_model and encoder_tokenizer together")

    def resolve(self) -> tuple[DistilledHead, nn.Module, Any]:
        head = self.head_module or _cached_head(str(Path(self.head or DEFAULT_HEAD).expanduser()))
        if self.encoder_model is not None:
            return head, self.encoder_model, self.encoder_tokenizer
        name = self.encoder or head.meta.get("encoder", "minilm")
        enc, tok = _cached_encoder(str(name))
        return head, enc, tok

    def score(self, doc: PromptDoc, model: Any) -> Scores:
        head, enc, etok = self.resolve()
        word_p = word_probabilities(head, enc, etok, doc.context, self.max_length, self.batch_size)
        runs = token_runs(doc.text, doc.spans[: doc.n_context])  # (n,) word of each counting token
        p = torch.where(runs >= 0, word_p[runs.clamp(min=0)] if word_p.numel() else 0.0, 0.0).float()
        # a word's leading whitespace token (same unit) carries the word's probability
        unit_p = torch.zeros(int(doc.words.max()) + 1).scatter_reduce(0, doc.words, p, reduce="amax")
        p = unit_p[doc.words]
        p = torch.where(doc.forced, torch.ones_like(p), p)
        # every token carries its word's probability: the words expanded by their token length
        tau = min(1.0, max(doc.budget, 0) / max(doc.n_context, 1))
        threshold = percentile_threshold(p.double().numpy(), tau)
        above = p > threshold
        return Scores(priority=p, tier=above.long(), extra={"threshold": threshold, "tau": tau})


register("distilled")(Distilled)


# ------------------------------------------------------------------------------------------ training


def word_labels(doc: PromptDoc, kept: torch.Tensor, min_share: float = 0.5) -> torch.Tensor:
    """(W,) float labels of the context's words from a teacher's (n,) keep mask over counting tokens:
    1 when at least ``min_share`` of the word's tokens were kept."""
    runs = token_runs(doc.text, doc.spans[: doc.n_context])
    n_words = count_words(doc.context)
    ok = runs >= 0
    kept_n = torch.zeros(n_words).index_add_(0, runs[ok], kept[: doc.n_context][ok].float())
    count = torch.zeros(n_words).index_add_(0, runs[ok], torch.ones(int(ok.sum())))
    return (kept_n / count.clamp(min=1) >= min_share).float()


def piece_dataset(
    encoder: nn.Module,
    tokenizer: Any,
    text: str,
    labels: torch.Tensor,
    layers: tuple[int, ...],
    max_length: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features (P, D) and (P,) long labels: every piece inherits its word's label."""
    feats, runs = encoder_features(encoder, tokenizer, text, layers, max_length)
    ok = runs >= 0
    return feats[ok], labels[runs[ok]].long()


@dataclass
class TrainConfig:
    """Settings of :func:`train_head`; validated at construction.

    Attributes:
        hidden: width of the head's hidden layer.
        epochs: passes over the training pieces.
        lr: Adam learning rate.
        batch: pieces per step.
        weight_decay: L2 penalty (AdamW).
        seed: torch seed for initialisation and shuffling.
    """

    hidden: int = 256
    epochs: int = 10
    lr: float = 1e-3
    batch: int = 256
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch < 1:
            raise FlowsieveError("hidden, epochs and batch must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise FlowsieveError("lr must be > 0 and weight_decay >= 0")


def classification_stats(prob: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the "keep" class at p > 0.5, and ROC AUC."""
    pred = prob > 0.5
    y = labels.bool()
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    prec = tp / max(tp + fp, 1)
    rec = tp / max(tp + fn, 1)
    # AUC by ranks (ties get their mean rank)
    order = prob.double().numpy()
    ranks = _rankdata(order)
    n1 = int(y.sum())
    n0 = len(y) - n1
    auc = float((ranks[y.numpy()].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1))
    return {
        "accuracy": float((pred == y).float().mean()),
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / max(prec + rec, 1e-12),
        "auc": auc,
        "positive_share": n1 / max(len(y), 1),
    }


def _rankdata(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    layers: tuple[int, ...],
    config: TrainConfig | None = None,
    meta: dict | None = None,
) -> DistilledHead:
    """Train a :class:`DistilledHead` on (N, D) features and (N,) 0/1 labels with class-weighted CE."""
    cfg = config or TrainConfig()
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise FlowsieveError(
            f"features (N, D) and labels (N,) expected, got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = DistilledHead(features.shape[1], cfg.hidden, layers, meta=meta)
    counts = torch.bincount(labels.long(), minlength=2).float()
    weight = counts.sum() / (2 * counts.clamp(min=1))
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    N = features.shape[0]
    head.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(N, generator=g)
        for a in range(0, N, cfg.batch):
            idx = perm[a : a + cfg.batch]
            opt.zero_grad()
            loss = loss_fn(head(features[idx]), labels[idx].long())
            loss.backward()
            opt.step()
    return head.eval()
