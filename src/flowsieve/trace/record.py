"""``trace``: observe one forward pass and score every token at every layer, for a person to read.

Signals (per layer, per token):

- ``relay_flow``: FlowCut's score of the flow into the relay position (the last token of a causal
  LM, CLS of an encoder): relay attention + value-value attention, each normalised, times the L1 norm
  of the token's head-mean value (see :mod:`flowsieve.methods.flow_signals`).
- ``relay_attention``: the relay's attention row, mean over heads.
- ``flow_accumulated``: relay flow accumulated across layers with FlowCut's EMA
  (``F_l = 0.5 F_{l-1} + 0.5 s_l`` over per-layer normalised scores), i.e. how much a token has fed
  the relay up to and including layer ``l``.
- ``attention_received``: attention the token receives, summed over all queries (H2O's accumulated
  attention), mean over heads.
- ``attention_received_mean``: the same divided by the number of queries that can see the token
  (ACT's column mean, the quantity the sink criterion thresholds).
- ``transition`` and ``transition_accumulated``: TransPrune's token transition variation of the
  layer's attention + MLP blocks, and its running sum over layers (causal decoders with separate
  attention and MLP blocks only).

Sinks and dormant heads follow :mod:`flowsieve.methods.sink_signals`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.methods.flow_signals import ema_accumulate, flowcut_score, ttv
from flowsieve.methods.sink_signals import dormant_heads, layer_sinks, mean_received, sink_share
from flowsieve.models import context_length
from flowsieve.observe import ObserveSpec, decoder_layers, is_causal, observe, supports_transitions

SIGNALS = {
    "relay_flow": "FlowCut flow into the relay token: (relay attention + value-value attention) x |mean value|_1",
    "flow_accumulated": "relay flow accumulated over layers (FlowCut EMA, weight 0.5)",
    "relay_attention": "attention of the relay token, mean over heads",
    "attention_received": "attention received from all queries, summed (H2O), mean over heads",
    "attention_received_mean": "attention received per query that can see the token (ACT column mean)",
    "transition": "TransPrune token transition variation of the layer (attention + MLP)",
    "transition_accumulated": "transition variation summed over layers so far",
}


@dataclass
class TraceConfig:
    """Settings of a trace; validated at construction.

    Attributes:
        chunk: query rows per chunk when all rows are scanned (memory O(H * chunk * T));
            None picks a cache-friendly size.
        row_stride: 1 (default) scans every query row: exact received attention and head statistics.
            k > 1 scans every k-th chunk of rows and estimates them (``attention_received`` =
            mean over scanned rows x number of rows that see the token).
        workers: threads scanning query chunks in parallel, one torch thread each (see
            :class:`flowsieve.observe.ObserveSpec`); None (default) uses one per torch thread, which
            is faster than one scan with several intra-op threads.
        sink_alpha: mean received attention above which a token is a sink (ACT's alpha).
        min_visible: keys seen by fewer queries are never called sinks.
        dormant_park: a head parking at least this share of its attention on sinks is dormant.
        dormant_quiet: a head whose output norm is below this times its layer's median is dormant.
        top_k: tokens listed per signal in ``top_tokens``.
        digits: significant digits kept in the JSON scores.
    """

    chunk: int | None = None
    row_stride: int = 1
    workers: int | None = None
    sink_alpha: float = 0.1
    min_visible: int = 16
    dormant_park: float = 0.9
    dormant_quiet: float = 0.1
    top_k: int = 20
    digits: int = 4

    def __post_init__(self) -> None:
        if (
            (self.chunk is not None and self.chunk < 1)
            or self.row_stride < 1
            or (self.workers is not None and self.workers < 1)
        ):
            raise FlowsieveError(f"chunk and row_stride must be >= 1, got {self.chunk}, {self.row_stride}")
        for name in ("sink_alpha", "dormant_park"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise FlowsieveError(f"{name} must be in (0, 1], got {v}")
        if self.dormant_quiet < 0 or self.min_visible < 1 or self.top_k < 1:
            raise FlowsieveError("dormant_quiet must be >= 0, min_visible and top_k >= 1")


def build_input(
    tokenizer: Any, text: str, question: str | None, causal: bool
) -> tuple[list[int], list[str], tuple[int, int] | None]:
    """Tokenise ``text`` (and the question after a blank line) -> ids, token strings, question token span."""
    if text is None or not text.strip():
        raise FlowsieveError("the text is empty")
    q = question.strip() if question else None
    if question is not None and not q:
        raise FlowsieveError("the question is empty")
    full = text.rstrip() + ("\n\n" + q if q else "")
    q_start = len(full) - len(q) if q else None
    try:
        enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        enc = tokenizer(full, add_special_tokens=True)
        offsets = None
    ids = list(enc["input_ids"])
    if offsets is not None:
        tokens = [full[a:b] if b > a else tokenizer.decode([i]) for i, (a, b) in zip(ids, offsets)]
    else:
        tokens = [tokenizer.decode([i]) for i in ids]
    span = None
    if q_start is not None:
        if offsets is None:
            raise FlowsieveError("this tokenizer gives no character offsets; cannot locate the question")
        idx = [k for k, (a, b) in enumerate(offsets) if b > a and a >= q_start]
        if not idx:
            raise FlowsieveError("the question produced no tokens")
        span = (idx[0], idx[-1] + 1)
    return ids, tokens, span


def _round(x: torch.Tensor, digits: int) -> list:
    """Tensor -> nested lists rounded to ``digits`` significant digits (keeps the JSON small)."""
    x = x.double()
    mag = torch.floor(torch.log10(x.abs().clamp(min=1e-300)))
    scale = torch.pow(10.0, digits - 1 - mag)
    return torch.where(x == 0, x, torch.round(x * scale) / scale).tolist()


def trace(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    question: str | None = None,
    *,
    config: TraceConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Trace the flow of information into the relay position of ``text`` (+ ``question``).

    Returns a JSON-serialisable dict with ``model``, ``tokens``, ``n_layers``, ``n_heads``, ``relay``,
    ``question_span``, ``signals``, ``scores`` ({signal: [layer][token]}), ``sinks``, ``heads``,
    ``dormant_heads``, ``top_tokens``, ``settings`` and ``timing``.
    """
    cfg = config or TraceConfig()
    causal = is_causal(model)
    ids, tokens, span = build_input(tokenizer, text, question, causal)
    T = len(ids)
    limit = context_length(model)
    if limit is not None and T > limit:
        raise FlowsieveError(f"the text is {T} tokens, longer than the model's context of {limit} tokens")
    relay = T - 1 if causal else 0
    n_layers = len(decoder_layers(model))
    transitions = causal and supports_transitions(model)
    spec = ObserveSpec(
        rows=(relay,),
        received=True,
        head_stats=True,
        transitions=transitions,
        chunk=cfg.chunk,
        workers=cfg.workers or torch.get_num_threads(),
    )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers, desc=f"trace {T} tokens", unit="layer", leave=False)
    t0 = time.perf_counter()
    x = torch.tensor([ids])
    with torch.inference_mode(), observe(model, spec) as obs:
        if bar is not None:
            obs.on_layer = lambda _i: bar.update(1)
        kw: dict[str, Any] = {"use_cache": False} if causal else {}
        if causal:
            kw["logits_to_keep"] = 1
        model(input_ids=x, **kw)
    forward_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    t1 = time.perf_counter()
    layers = [obs.layers[i] for i in range(n_layers)]
    rel_rows = torch.stack([r.rows[relay][0] for r in layers])  # (L, H, T)
    vv_rows = torch.stack([r.vv_rows[relay][0] for r in layers])  # (L, Hk, T)
    vl1 = torch.stack([r.value_l1[0] for r in layers])  # (L, T)
    visible = torch.stack([r.visible[0] for r in layers])  # (L, T) scanned rows that see each key
    visible_all = torch.stack([r.visible_all[0] for r in layers])  # (L, T) all rows that see each key
    # exact when every row is scanned; otherwise scaled from the scanned rows' mean
    received = torch.stack([r.received[0] for r in layers]) * (visible_all / visible.clamp(min=1))[:, None]
    n_rows = layers[0].n_rows
    H = received.shape[1]

    flow = torch.stack(
        [flowcut_score(rel_rows[i][None], vv_rows[i][None], vl1[i][None])[0] for i in range(n_layers)]
    )
    scores: dict[str, torch.Tensor] = {
        "relay_flow": flow,
        "flow_accumulated": ema_accumulate(flow),
        "relay_attention": rel_rows.mean(1),
        "attention_received": received.mean(1),
        "attention_received_mean": mean_received(received, visible_all[:, None]).mean(1),
    }
    if transitions:
        tv = torch.stack([_block_ttv(r.ttv["attn"]) + _block_ttv(r.ttv["mlp"]) for r in layers])
        scores["transition"] = tv
        scores["transition_accumulated"] = tv.cumsum(0)

    # sinks per layer and dormant heads
    min_vis = min(cfg.min_visible, max(1, T // 4))
    per_layer_sinks = [
        layer_sinks(received[i], visible_all[i], cfg.sink_alpha, min_vis) for i in range(n_layers)
    ]
    sink_any = torch.stack(per_layer_sinks).any(0)
    share = torch.stack(
        [sink_share(received[i], n_rows, per_layer_sinks[i]) for i in range(n_layers)]
    )  # (L,H)
    out_norm = torch.stack([r.out_norm[0] / max(r.n_rows, 1) for r in layers])  # (L, H)
    dormant = dormant_heads(share, out_norm, cfg.dormant_park, cfg.dormant_quiet)
    m_layer = mean_received(received, visible_all[:, None]).mean(1)  # (L, T)
    sink_tokens = []
    for j in sink_any.nonzero().flatten().tolist():
        ls = [i for i in range(n_layers) if per_layer_sinks[i][j]]
        sink_tokens.append(
            {
                "index": j,
                "token": tokens[j],
                "layers": ls,
                "fraction": round(len(ls) / n_layers, 4),
                "mass": round(float(m_layer[ls, j].mean()), 4),
            }
        )
    sink_tokens.sort(key=lambda s: (-s["fraction"], -s["mass"]))

    top = {}
    for name, s in scores.items():
        final = s[-1].clone()
        if name in ("relay_flow", "flow_accumulated", "relay_attention") and causal:
            final[relay] = float("-inf")  # the relay reading itself says nothing
        k = min(cfg.top_k, T)
        vals, idx = final.topk(k)
        top[name] = [
            {"index": int(i), "token": tokens[int(i)], "score": float(f"{v:.4g}")}
            for v, i in zip(vals.tolist(), idx.tolist())
        ]
    post_s = time.perf_counter() - t1
    med = out_norm.median(-1, keepdim=True).values.clamp(min=1e-12)
    return {
        "model": getattr(model, "flowsieve_name", None)
        or getattr(model.config, "_name_or_path", "")
        or type(model).__name__,
        "architecture": type(model).__name__,
        "n_layers": n_layers,
        "n_heads": H,
        "n_kv_heads": int(vv_rows.shape[1]),
        "tokens": tokens,
        "token_ids": ids,
        "relay": relay,
        "question": question.strip() if question else None,
        "question_span": list(span) if span else None,
        "signals": {k: v for k, v in SIGNALS.items() if k in scores},
        "unavailable": {}
        if transitions
        else {"transition": "needs a causal decoder with attention and MLP blocks"},
        "scores": {k: _round(v, cfg.digits) for k, v in scores.items()},
        "sinks": {
            "criterion": f"head-mean received attention per visible query > {cfg.sink_alpha} "
            f"(keys seen by >= {min_vis} queries)",
            "tokens": sink_tokens,
            "per_layer": [m.nonzero().flatten().tolist() for m in per_layer_sinks],
        },
        "heads": {
            "sink_share": _round(share, cfg.digits),
            "first_mass": _round(
                torch.stack([r.first_mass[0] / max(r.n_prob_rows, 1) for r in layers]), cfg.digits
            ),
            "row_entropy": _round(
                torch.stack([r.row_entropy[0] / max(r.n_entropy_rows, 1) for r in layers]), cfg.digits
            ),
            "out_norm_ratio": _round(out_norm / med, cfg.digits),
        },
        "dormant_heads": [[int(a), int(b)] for a, b in dormant.nonzero().tolist()],
        "dormant_criterion": f"share of attention on sink tokens >= {cfg.dormant_park} "
        f"or output norm < {cfg.dormant_quiet} x the layer's median head",
        "top_tokens": top,
        "settings": asdict(cfg) | {"n_tokens": T, "causal": causal},
        "timing": {"forward_s": round(forward_s, 3), "scoring_s": round(post_s, 3)},
    }


def _block_ttv(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """TTV of one block over the whole sequence (calls of a chunked run concatenated) -> (T,)."""
    ratio = torch.cat([p[0] for p in pairs], dim=-1)[0]
    dist = torch.cat([p[1] for p in pairs], dim=-1)[0]
    return ttv(ratio, dist)
