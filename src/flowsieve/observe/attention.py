"""The attention function registered with transformers, and key selection.

:func:`register` registers :func:`_attention` with transformers' ``AttentionInterface`` (and its
mask with ``AttentionMaskInterface``, without which a multi-token chunk on top of a cache is
silently computed with the wrong causal alignment). It produces the model's attention output and,
while an :class:`~flowsieve.observe.spec.Observer` is active, records per layer what the observer's
spec asks for; inside :func:`select_keys` it first gathers the keys the selector picks.

Shapes: B batch, H query heads, Hk key/value heads, g = H / Hk, q new tokens, L keys (cache + new).

When a signal that needs every query row is requested (``received``, ``received_max`` or
``head_stats``), the output is computed in the same chunked pass from the same probabilities
(``softmax(q k^T) v``, fp32 softmax), so the attention is not computed twice; it matches stock SDPA
to float tolerance (tested to 1e-5). Otherwise the stock SDPA function produces the output.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.observe.adapter import attention_modules
from flowsieve.observe.probs import (
    _accumulate,
    _chunk_probs,
    _fold,
    _group_probs,
    _mask_chunk,
    _summaries,
    _visibility,
)
from flowsieve.observe.spec import LayerObs, Observer, _add_growing, _max_growing

ATTN_NAME = "flowsieve"
_ACTIVE: contextvars.ContextVar[Observer | None] = contextvars.ContextVar("flowsieve_observer", default=None)
# (ids of the attention modules it applies to, selector) while a select_keys block is active
KeySelector = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], "torch.Tensor | None"]
_SELECT: contextvars.ContextVar[tuple[frozenset[int], KeySelector] | None] = contextvars.ContextVar(
    "flowsieve_key_selector", default=None
)
_REGISTERED = False


def register() -> None:
    """Register the observation attention and its mask function with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _REGISTERED = True


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (B, H, q, d); key/value (B, Hk, L, d) after the cache update -> output (B, q, H, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    obs = _ACTIVE.get()
    idx = getattr(module, "layer_idx", None)
    sel = _SELECT.get()
    if sel is not None and id(module) in sel[0]:
        picked = sel[1](module, query, key, query.shape[-1] ** -0.5 if scaling is None else scaling)
        if picked is not None:
            if obs is not None and id(module) in obs._module_ids and idx is not None and obs.wants(idx):
                raise FlowsieveError("observation and key selection cannot run in the same attention call")
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
            key, value, attention_mask = _gather_keys(picked, query, key, value, attention_mask, causal)
    if obs is None or id(module) not in obs._module_ids or idx is None or not obs.wants(idx):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise FlowsieveError("observation does not support attention soft-capping or position bias")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    spec = obs.spec
    rec = obs.layer(idx)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    B, H, q, _ = query.shape
    Hk, L = key.shape[1], key.shape[2]
    g = H // Hk
    # absolute coordinates: queries are tokens [seen, seen+q); the L keys are tokens [koff, koff+L)
    # (a sliding-window layer stores only the last tokens, so koff > 0 there)
    seen = obs._seen.get(idx, 0)
    total = seen + q
    koff = total - L
    rows = [p for p in obs.row_positions(total) if seen <= p < total]
    if spec.current and total - 1 not in rows:
        rows.append(total - 1)
    # where per-key values are placed: absolute token index, or the key's slot in this call's cache
    pk, pt = (0, L) if spec.slots else (koff, total)

    if spec.norms or rows:
        # FlowCut weights a token by the L1 norm of its head-mean value vector
        rec.value_l1 = _absolute(value.float().mean(1).abs().sum(-1), pk, pt)
    if spec.norms:
        rec.key_norm = _absolute(key.float().norm(dim=-1), pk, pt)
        rec.value_norm = _absolute(value.float().norm(dim=-1), pk, pt)

    out: torch.Tensor | None = None
    if spec.needs_all_rows and spec.row_stride == 1:
        # exact: every query row, and the output from the same probabilities, one KV-head group
        # (g query heads) at a time so that a chunk's scores (g x chunk x L floats, ~6 MiB) stay
        # in cache between the two matmuls and the softmax
        chunk = spec.chunk or max(16, min(1024, (3 << 19) // max(1, g * L)))
        out = torch.empty(B, q, H, value.shape[-1], dtype=query.dtype, device=query.device)
        starts = list(range(0, q, chunk))
        key_t = key.float().transpose(-1, -2).contiguous()  # (B,Hk,d,L)
        val = value.float()
        qs = query.float() * scaling
        track = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)

        def scan(part: list[int], acc: LayerObs) -> None:
            buf: list[torch.Tensor | None] = [None]  # scratch reused by this worker's chunks
            for a in part:
                b = min(a + chunk, q)
                c = b - a
                kind, mask, n = _mask_chunk(attention_mask, causal, q, L, a, b)
                vis = _visibility(attention_mask, causal, q, L, a, b, query.device)
                colsum = torch.empty(B, H, n, device=query.device)
                colmax = torch.empty(B, H, n, device=query.device) if spec.received_max else None
                first = torch.empty(B, H, device=query.device)
                ent = torch.empty(B, H, device=query.device)
                for h in range(Hk):
                    hs = slice(h * g, (h + 1) * g)
                    probs = _group_probs(qs, key_t, h, g, kind, mask, a, b, n, buf, track)  # (B,g,c,n)
                    o = probs.reshape(B, g * c, n) @ val[:, h, :n]  # (B, g*c, d)
                    out[:, a:b, hs] = o.view(B, g, c, -1).transpose(1, 2).to(out.dtype)
                    colsum[:, hs], first[:, hs], ent[:, hs], n_ent = _summaries(probs, vis[0], spec)
                    if colmax is not None:
                        colmax[:, hs] = probs.amax(-2)
                    for p in rows:
                        if seen + a <= p < seen + b:
                            acc.rows.setdefault(p, torch.empty(B, H, n, device=query.device))[:, hs] = probs[
                                :, :, p - seen - a
                            ]
                _fold(acc, spec, colsum, first, ent, c, n_ent, vis[1], pk, pt)
                if colmax is not None:
                    acc.received_max = _max_growing(acc.received_max, colmax, pk)
                for p in rows:
                    if seen + a <= p < seen + b:
                        acc.rows[p] = _absolute(acc.rows[p], pk, pt)

        workers = min(torch.get_num_threads(), len(starts), spec.workers or torch.get_num_threads())
        if workers > 1:
            _scan_parallel(scan, starts, workers, rec)
        else:
            scan(starts, rec)
    else:
        chunk = spec.chunk or max(16, min(1024, (1 << 21) // max(1, H * L)))
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if spec.needs_all_rows:
            # sampled: every ``row_stride``-th chunk of query rows; visibility counted for all rows
            for ci, a in enumerate(range(0, q, chunk)):
                b = min(a + chunk, q)
                if ci % spec.row_stride == 0 or b == q:  # the last chunk always: recent keys
                    probs, _, vis = _chunk_probs(query, key, attention_mask, causal, scaling, a, b)
                    _accumulate(rec, spec, probs, vis, pk, pt)
                if spec.received:
                    cols_all = _visibility(attention_mask, causal, q, L, a, b, query.device)[1]
                    rec.visible_all = _add_growing(rec.visible_all, cols_all.expand(B, -1), pk, pt)
        if rows:
            # one pass over the span of requested rows when it is short (an observation window),
            # row by row otherwise
            lo, hi = rows[0] - seen, rows[-1] - seen + 1
            spans = [(lo, hi)] if hi - lo <= 256 else [(p - seen, p - seen + 1) for p in rows]
            for a, b in spans:
                probs, _, _ = _chunk_probs(query, key, attention_mask, causal, scaling, a, b)
                for p in rows:
                    if a <= p - seen < b:
                        rec.rows[p] = _absolute(probs[:, :, p - seen - a], pk, pt)
    if spec.head_stats:
        # per-head output norm over every row: (B,q,H,d) -> (B,H)
        rec.out_norm = _add_growing(rec.out_norm, out.float().norm(dim=-1).sum(1))
        rec.n_rows += q
    if spec.received and spec.row_stride == 1:
        rec.visible_all = rec.visible
    if spec.current:
        rec.rows[-1] = rec.rows[total - 1]
    for p in rows:
        # value-value "semantic" attention of FlowCut: softmax_j(v_p . v_j / sqrt(d)) per KV head,
        # over the keys the query can see (causal: up to and including p)
        vf = value[:, :, : p - koff + 1].float() if causal else value.float()
        vp = value[:, :, p - koff : p - koff + 1].float()  # (B,Hk,1,d)
        vv = (vp @ vf.transpose(-1, -2)) / math.sqrt(value.shape[-1])
        rec.vv_rows[p] = _absolute(torch.softmax(vv[:, :, 0], dim=-1), pk, pt)
    if obs.on_layer is not None:
        obs.on_layer(idx)
    return out, None


def _gather_keys(
    picked: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep only the key slots ``picked`` (n,) of key/value (B, Hk, L, d) and of the mask's columns.

    The mask keeps its meaning: a chunk of q > 1 queries with no mask (a first pass, bottom-right
    causal over the L keys) gets an explicit causal mask before its columns are gathered.
    """
    picked = picked.to(device=key.device, dtype=torch.long)
    q, L = query.shape[2], key.shape[2]
    if attention_mask is None and causal and q > 1:
        rows = torch.arange(L - q, L, device=key.device)[:, None]
        attention_mask = (torch.arange(L, device=key.device)[None, :] <= rows)[None, None]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :L].index_select(-1, picked)
    return key.index_select(2, picked), value.index_select(2, picked), attention_mask


@contextlib.contextmanager
def select_keys(model: nn.Module, selector: KeySelector) -> Iterator[None]:
    """Inside the block, every attention call of ``model`` attends only to the keys its selector picks.

    ``selector(module, query, key, scaling)`` gets the call's queries (B, H, q, d) and all its keys
    (B, Hk, L, d) after the cache update, and returns the key slots to attend to, a sorted int
    tensor (n,) shared by all heads, or None to attend to all L keys. The cache is not changed.
    The attention implementation is switched to the flowsieve function and restored on exit.
    """
    register()
    ids = frozenset(id(m) for m in attention_modules(model))
    previous = model.config._attn_implementation
    token = _SELECT.set((ids, selector))
    try:
        model.set_attn_implementation(ATTN_NAME)
        yield
    finally:
        _SELECT.reset(token)
        model.set_attn_implementation(previous)


_POOL: Any = None


def _pool(workers: int) -> Any:
    """A persistent thread pool: threads (and their allocator arenas) are reused across layers."""
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowsieve-scan")
    return _POOL


def _scan_parallel(
    scan: Callable[[list[int], LayerObs], None], starts: list[int], workers: int, rec: LayerObs
) -> None:
    """Run ``scan`` over interleaved shares of the chunks in ``workers`` threads, one torch thread each.

    The chunk matmuls are thin (head dim 64) and gain little from intra-op threads, while separate
    chunks are independent: one chunk per core is faster. Each worker accumulates into its own
    :class:`LayerObs`; the sums are merged into ``rec`` afterwards.
    """
    parts = [starts[i::workers] for i in range(workers)]
    accs = [LayerObs() for _ in parts]
    threads = torch.get_num_threads()
    # grad and inference modes are thread-local: carry the caller's into the workers
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(part: list[int], acc: LayerObs) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            scan(part, acc)

    pool = _pool(workers)
    torch.set_num_threads(1)
    try:
        for f in [pool.submit(run, part, acc) for part, acc in zip(parts, accs)]:
            f.result()
    finally:
        torch.set_num_threads(threads)
    for acc in accs:
        rec.rows.update(acc.rows)
        rec.n_prob_rows += acc.n_prob_rows
        rec.n_entropy_rows += acc.n_entropy_rows
        for name in ("received", "visible", "first_mass", "row_entropy"):
            part = getattr(acc, name)
            if part is not None:
                setattr(rec, name, _add_growing(getattr(rec, name), part))
        if acc.received_max is not None:
            rec.received_max = _max_growing(rec.received_max, acc.received_max)


def _absolute(x: torch.Tensor, koff: int, total: int) -> torch.Tensor:
    """Place per-key values (..., n) for tokens [koff, koff+n) into a zero row of length ``total``."""
    return torch.nn.functional.pad(x.float(), (koff, total - koff - x.shape[-1]))
