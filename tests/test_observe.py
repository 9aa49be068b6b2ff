"""The observation attention reproduces stock SDPA outputs and eager attention rows."""

from __future__ import annotations

import pytest
import torch

from flowsieve.observe import ObserveSpec, observe, supports_transitions

TOL = 1e-5


def _eager_attentions(model, ids, **kw):
    model.set_attn_implementation("eager")
    try:
        out = model(ids, output_attentions=True, **kw)
    finally:
        model.set_attn_implementation("sdpa")
    return out


@pytest.mark.parametrize(
    "spec", [ObserveSpec(rows=(-1,)), ObserveSpec(rows=(-1, 3), received=True, head_stats=True, chunk=7)]
)
def test_logits_match_sdpa(tiny_causal, spec):
    _, model = tiny_causal
    ids = torch.randint(0, 128, (2, 29))
    ref = model(ids).logits
    with observe(model, spec):
        got = model(ids).logits
    assert (got - ref).abs().max().item() <= TOL
    assert model.config._attn_implementation == "sdpa"  # restored


def test_rows_and_received_match_eager(tiny_causal):
    _, model = tiny_causal
    ids = torch.randint(0, 128, (1, 23))
    att = _eager_attentions(model, ids).attentions
    with observe(model, ObserveSpec(rows=(-1, 5, 0), received=True, head_stats=True, chunk=4)) as obs:
        model(ids)
    for i, a in enumerate(att):
        rec = obs.layers[i]
        for p in (22, 5, 0):
            assert (rec.rows[p] - a[:, :, p]).abs().max().item() <= TOL
        assert (rec.received - a.sum(-2)).abs().max().item() <= 1e-4
        visible = (a[0, 0] > 0).sum(0).float()  # causal (and window) visibility per key
        assert torch.equal(rec.visible[0], visible)
        assert rec.n_rows == 23
        assert (rec.first_mass / rec.n_rows - a[..., 0].mean(-1)).abs().max().item() <= TOL


def test_chunk_on_cache_matches_eager(tiny_causal):
    """A multi-token chunk on top of an existing cache: same output as SDPA, same rows as eager."""
    from transformers import DynamicCache

    _, model = tiny_causal
    ids = torch.randint(0, 128, (1, 30))
    full = _eager_attentions(model, ids).attentions
    ref_logits = model(ids).logits
    cache = DynamicCache(config=model.config)
    spec = ObserveSpec(rows=(25, 29), received=True, chunk=3)
    with observe(model, spec) as obs:
        model(ids[:, :20], cache=cache, use_cache=True)
        out = model(ids[:, 20:], cache=cache, use_cache=True)
    assert (out.logits - ref_logits[:, 20:]).abs().max().item() <= TOL
    for i, a in enumerate(full):
        for p in (25, 29):
            assert (obs.layers[i].rows[p] - a[:, :, p]).abs().max().item() <= TOL
        # received summed over both forward passes equals the full column sums
        assert (obs.layers[i].received - a.sum(-2)).abs().max().item() <= 1e-4


def test_rows_only_path_on_cache_uses_sdpa_output(tiny_causal):
    from transformers import DynamicCache

    _, model = tiny_causal
    ids = torch.randint(0, 128, (1, 26))
    full = _eager_attentions(model, ids).attentions
    ref = model(ids).logits
    cache = DynamicCache(config=model.config)
    with observe(model, ObserveSpec(rows=(24,))) as obs:
        model(ids[:, :21], cache=cache, use_cache=True)
        out = model(ids[:, 21:], cache=cache, use_cache=True)
    assert (out.logits - ref[:, 21:]).abs().max().item() <= TOL
    for i, a in enumerate(full):
        assert (obs.layers[i].rows[24] - a[:, :, 24]).abs().max().item() <= TOL


def test_bidirectional_encoder_rows():
    from conftest import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, 128, (1, 17))
    ref = model(ids).last_hidden_state
    model.set_attn_implementation("eager")
    att = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    with observe(model, ObserveSpec(rows=(0,), received=True, chunk=5)) as obs:
        got = model(ids).last_hidden_state
    assert (got - ref).abs().max().item() <= TOL
    for i, a in enumerate(att):
        assert (obs.layers[i].rows[0] - a[:, :, 0]).abs().max().item() <= TOL
        assert (obs.layers[i].received - a.sum(-2)).abs().max().item() <= 1e-4


def test_transitions_identity_ratio(tiny_causal):
    _, model = tiny_causal
    assert supports_transitions(model)
    ids = torch.randint(0, 128, (1, 12))
    with observe(model, ObserveSpec(transitions=True)) as obs:
        model(ids)
    for rec in obs.layers.values():
        assert set(rec.ttv) == {"attn", "mlp"}
        ratio, dist = rec.ttv["attn"][0]
        assert ratio.shape == (1, 12) and dist.shape == (1, 12)
        assert (ratio > 0).all() and (dist >= -1e-6).all() and (dist <= 2 + 1e-6).all()


def test_hooks_removed_on_error(tiny_causal):
    _, model = tiny_causal
    with pytest.raises(RuntimeError, match="boom"), observe(model, ObserveSpec(transitions=True)):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    for layer in model.model.layers:
        assert not layer.self_attn._forward_hooks and not layer.mlp._forward_hooks


def test_row_stride_scans_chosen_chunks_exactly(tiny_causal):
    """row_stride=k: SDPA output, received = exact sum over the scanned chunks (0, k, 2k, ... and the last)."""
    _, model = tiny_causal
    T, chunk, k = 23, 4, 2
    ids = torch.randint(0, 128, (1, T))
    att = _eager_attentions(model, ids).attentions
    ref = model(ids).logits
    spec = ObserveSpec(rows=(-1,), received=True, head_stats=True, chunk=chunk, row_stride=k)
    with observe(model, spec) as obs:
        got = model(ids).logits
    assert (got - ref).abs().max().item() <= TOL
    starts = list(range(0, T, chunk))
    scanned = [
        r for ci, a in enumerate(starts) if ci % k == 0 or a + chunk >= T for r in range(a, min(a + chunk, T))
    ]
    for i, a in enumerate(att):
        rec = obs.layers[i]
        assert (rec.received - a[:, :, scanned].sum(-2)).abs().max().item() <= 1e-4
        assert torch.equal(rec.visible_all[0], (a[0, 0] > 0).sum(0).float())
        assert torch.equal(rec.visible[0], (a[0, 0, scanned] > 0).sum(0).float())
        assert rec.n_prob_rows == len(scanned) and rec.n_rows == T
        assert (rec.rows[T - 1] - a[:, :, -1]).abs().max().item() <= TOL


def test_parallel_scan_matches_serial(tiny_causal):
    """workers=2 (chunks split over threads) gives the same output and statistics as one scan."""
    _, model = tiny_causal
    assert torch.get_num_threads() >= 2
    ids = torch.randint(0, 128, (1, 31))
    got = {}
    for w in (1, 2):
        spec = ObserveSpec(rows=(-1, 7), received=True, head_stats=True, chunk=4, workers=w)
        with torch.inference_mode(), observe(model, spec) as obs:
            logits = model(ids).logits
        got[w] = (logits, obs.layers)
    assert (got[1][0] - got[2][0]).abs().max().item() <= 1e-6
    for i, a in got[1][1].items():
        b = got[2][1][i]
        for name in ("received", "visible", "first_mass", "row_entropy", "out_norm"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
        assert a.n_prob_rows == b.n_prob_rows == 31 and a.n_entropy_rows == b.n_entropy_rows
        for p in (30, 7):
            assert torch.allclose(a.rows[p], b.rows[p], atol=1e-6)
