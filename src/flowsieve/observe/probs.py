"""Attention probabilities query chunk by query chunk, so that no ``T x T`` matrix is ever held.

Per chunk of query rows [a, b) (c = b - a rows, seeing the first n keys): the mask (mirroring the
stock SDPA path), visibility counts, the fp32 softmax (in place unless autograd is recording), and
the per-key and per-head sums folded into a :class:`~flowsieve.observe.spec.LayerObs`.

Shapes: B batch, H query heads, Hk key/value heads, g = H / Hk, q new tokens, L keys (cache + new).
"""

from __future__ import annotations

from typing import Any

import torch

from flowsieve.observe.spec import LayerObs, ObserveSpec, _add_growing, _max_growing


def _mask_chunk(
    attention_mask: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, a: int, b: int
) -> tuple[str, torch.Tensor | None, int]:
    """How to mask query rows [a, b): (kind, mask, n) with kind in {"none", "causal", "bool", "float"}.

    ``n`` is the number of leading keys any of these rows can see. Mirrors the stock SDPA path for the
    same arguments (no mask + causal + q > 1 means top-left causal over the first q keys).
    """
    if attention_mask is None:
        if causal and q_len > 1:
            return "causal", None, min(b, kv_len)
        return "none", None, kv_len
    m = attention_mask[:, :, a:b, :kv_len]
    return ("bool" if m.dtype == torch.bool else "float"), m, kv_len


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _visibility(
    attention_mask: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, a: int, b: int, dev: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """For query rows [a, b): keys each row can see (B|1, 1, c) and rows that see each key (B|1, n)."""
    kind, mask, n = _mask_chunk(attention_mask, causal, q_len, kv_len, a, b)
    c = b - a
    if kind == "causal":
        rows_vis = torch.arange(a + 1, b + 1, device=dev, dtype=torch.float32).view(1, 1, c)
        cols_vis = torch.full((1, n), float(c), device=dev)
        cols_vis[0, n - c :] = torch.arange(c, 0, -1, device=dev, dtype=torch.float32)
        return rows_vis, cols_vis
    if kind == "none":
        return torch.full((1, 1, c), float(n), device=dev), torch.full((1, n), float(c), device=dev)
    assert mask is not None
    allowed = _allowed(mask)
    return allowed.sum(-1).float()[:, :1], allowed[:, 0].sum(-2).float()


def _chunk_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scaling: float,
    a: int,
    b: int,
) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]:
    """Attention probabilities of query rows [a, b) over the first n keys (all heads at once).

    Returns:
        probs (B, H, c, n) in fp32; n; and visibility counts: keys each row can see (B|1, 1, c) and
        rows that can see each key (B|1, n).
    """
    B, H, q, d = query.shape
    Hk, L = key.shape[1], key.shape[2]
    g = H // Hk
    kind, mask, n = _mask_chunk(attention_mask, causal, q, L, a, b)
    c = b - a
    # in-place softmax only when autograd is not recording
    track = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    # group query heads by their KV head instead of repeating K: (B,Hk,g*c,d) @ (B,Hk,d,n)
    qg = (query[:, :, a:b].float() * scaling).reshape(B, Hk, g * c, d)
    s = (qg @ key[:, :, :n].float().transpose(-1, -2)).view(B, H, c, n)
    vis = _visibility(attention_mask, causal, q, L, a, b, query.device)
    return _masked_softmax(s, kind, mask, track), n, vis


def _masked_softmax(s: torch.Tensor, kind: str, mask: torch.Tensor | None, track: bool) -> torch.Tensor:
    """Mask scores (B, h, c, n) of one chunk (``kind``/``mask`` from :func:`_mask_chunk`) and softmax
    over the keys, in place unless autograd is recording (``track``)."""
    c, n = s.shape[-2], s.shape[-1]
    if kind == "causal":
        # keys before the chunk are visible to every row; only the last c x c block is triangular
        tri = torch.ones(c, c, dtype=torch.bool, device=s.device).triu(1)
        s[..., n - c :].masked_fill_(tri, float("-inf"))
    elif kind in ("bool", "float"):
        assert mask is not None
        if kind == "float":
            s = s + mask.float() if track else s.add_(mask.float())
        allowed = _allowed(mask)
        s = s.masked_fill(~allowed, float("-inf")) if track else s.masked_fill_(~allowed, float("-inf"))
    # in place: one buffer per chunk instead of two
    p = torch.softmax(s, -1) if track else torch.ops.aten._softmax.out(s, -1, False, out=s)
    if kind in ("bool", "float"):
        # a fully masked row (padding) gives NaN in softmax; SDPA returns zeros there
        p = torch.nan_to_num(p, nan=0.0) if track else torch.nan_to_num_(p, nan=0.0)
    return p


def _group_probs(
    qs: torch.Tensor,
    key_t: torch.Tensor,
    h: int,
    g: int,
    kind: str,
    mask: torch.Tensor | None,
    a: int,
    b: int,
    n: int,
    buf: list[torch.Tensor | None],
    track: bool,
) -> torch.Tensor:
    """Probabilities of query rows [a, b) of the g query heads of KV head ``h`` over the first n keys.

    qs (B, H, q, d) scaled fp32 queries; key_t (B, Hk, d, L) fp32 keys. Returns (B, g, c, n) fp32,
    living in the scratch ``buf`` (valid until the next call) unless autograd is recording.
    """
    B, d, c = qs.shape[0], qs.shape[-1], b - a
    qg = qs[:, h * g : (h + 1) * g, a:b].reshape(B, g * c, d)
    kt = key_t[:, h, :, :n]
    if track:
        s = (qg @ kt).view(B, g, c, n)
    else:
        size = B * g * c * n
        if buf[0] is None or buf[0].numel() < size:
            buf[0] = torch.empty(size, dtype=torch.float32, device=qs.device)
        s = buf[0][:size].view(B, g * c, n)
        torch.bmm(qg, kt, out=s)
        s = s.view(B, g, c, n)
    return _masked_softmax(s, kind, mask, track)


def _summaries(
    probs: torch.Tensor, rows_vis: torch.Tensor, spec: ObserveSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-head sums of one chunk of probabilities (B, h, c, n): received per key (B, h, n),
    first-token mass (B, h), normalised row entropy over every ``entropy_stride``-th row (B, h), and
    the number of rows that entropy sum covers."""
    B, h = probs.shape[:2]
    colsum = probs.sum(-2)
    first = probs[..., 0].sum(-1)
    st = spec.entropy_stride
    sub = probs[:, :, ::st]
    if not spec.head_stats:
        return colsum, first, torch.zeros(B, h, device=probs.device), sub.shape[2]
    # a full pass of log over all rows costs as much as the attention itself; a head-level mean
    # needs far fewer rows
    vis = rows_vis[..., ::st].expand(B, h, -1)  # (B,h,c') keys each row could see
    e = -(sub * torch.log(sub.clamp(min=1e-30))).sum(-1)  # (B,h,c') row entropy
    norm_ent = torch.where(vis > 1, e / torch.log(vis.clamp(min=2)), torch.zeros_like(e))
    return colsum, first, norm_ent.sum(-1), sub.shape[2]


def _fold(
    rec: LayerObs,
    spec: ObserveSpec,
    colsum: torch.Tensor,
    first: torch.Tensor,
    ent: torch.Tensor,
    n_rows: int,
    n_ent: int,
    cols_vis: torch.Tensor,
    koff: int,
    total: int,
) -> None:
    """Add one chunk's per-head sums to the running per-layer statistics."""
    B = colsum.shape[0]
    rec.n_prob_rows += n_rows
    if spec.received:
        rec.received = _add_growing(rec.received, colsum, koff, total)
        rec.visible = _add_growing(rec.visible, cols_vis.expand(B, -1), koff, total)
    if spec.head_stats:
        rec.n_entropy_rows += n_ent
        rec.first_mass = _add_growing(rec.first_mass, first)
        rec.row_entropy = _add_growing(rec.row_entropy, ent)


def _accumulate(
    rec: LayerObs,
    spec: ObserveSpec,
    probs: torch.Tensor,
    vis: tuple[torch.Tensor, torch.Tensor],
    koff: int,
    total: int,
) -> None:
    """Fold one chunk of probabilities (B, H, c, n) into the running per-layer statistics."""
    colsum, first, ent, n_ent = _summaries(probs, vis[0], spec)
    _fold(rec, spec, colsum, first, ent, probs.shape[2], n_ent, vis[1], koff, total)
    if spec.received_max:
        rec.received_max = _max_growing(rec.received_max, probs.amax(-2), koff)
