"""The site protocol: every cache site is one object with ``check`` and ``prefill``, reached through
one registry, and a sieve is validated by its site."""

import pytest
import torch
from conftest import CharTokenizer, tiny_gemma3, tiny_llama

from flowsieve.errors import FlowsieveError
from flowsieve.generate import generate, score_continuation
from flowsieve.inputs import build_prompt
from flowsieve.kvcache import layer_types
from flowsieve.sieve import SITES as SIEVE_SITES
from flowsieve.sieve import Sieve
from flowsieve.sites import SITES, TEXT_SITES, Prefilled, get_site, prefill_cache

CONTEXT = "The keeper lit the lamp at dusk. Rain fell on the rocks. " * 3
QUESTION = "Who lit the lamp?"
ONE_PER_SITE = {"prefill": "snapkv", "decode": "h2o", "select": "tokenselect", "layer": "fastv"}


def _prompt(tok=None):
    return build_prompt(tok or CharTokenizer(), CONTEXT, QUESTION, chat=False)


def test_registry_names_every_cache_site_once_and_the_sieve_knows_them_all():
    assert set(SITES) == {"prefill", "decode", "select", "layer"}
    assert all(site.name == name for name, site in SITES.items())
    assert set(SIEVE_SITES) == set(SITES) | set(TEXT_SITES)


def test_unknown_site_is_a_one_line_error_and_the_text_site_says_where_it_is():
    with pytest.raises(FlowsieveError, match=r"no cache site 'prefil'.*did you mean 'prefill'"):
        get_site("prefil")
    with pytest.raises(FlowsieveError, match="compress_prompt"):
        get_site("prompt")


def test_the_sieve_is_checked_by_its_site():
    with pytest.raises(FlowsieveError, match="the layer site takes keep"):
        Sieve("fastv", budget=10, site="layer")
    with pytest.raises(FlowsieveError, match="the layer site takes keep"):
        Sieve("fastv", keep=0.5, site="layer", chunk=64)


@pytest.mark.parametrize("site", sorted(ONE_PER_SITE))
@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_every_site_returns_a_prefilled_cache_whose_hook_decodes_it(site, mode):
    model = tiny_llama(layers=4)
    sieve = Sieve(
        ONE_PER_SITE[site], keep=0.5, site=site, window=4, options={"layer": 1} if site == "layer" else {}
    )
    prompt = _prompt()
    pre = prefill_cache(model, prompt, sieve, mode)
    assert isinstance(pre, Prefilled)
    assert pre.logits.shape == (1, 1, model.config.vocab_size)
    assert pre.kept == pre.extra["kept_entries"]
    if site == "select":
        assert pre.kept == len(prompt)  # nothing evicted
    else:
        assert pre.kept < len(prompt)
    # a hook exactly where later passes need one
    assert (pre.hook is None) == (site == "prefill")
    assert (pre.step is not None) == (site == "decode")
    nll, _ = score_continuation(model, pre, [65, 66, 67, 68])
    assert torch.isfinite(torch.tensor(nll)) and nll > 0


def test_without_a_sieve_the_prefill_is_the_plain_forward():
    model = tiny_llama()
    prompt = _prompt()
    pre = prefill_cache(model, prompt, None, "query_aware")
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([prompt.ids])).logits[:, -1:]
    torch.testing.assert_close(pre.logits, ref)
    assert pre.kept == len(prompt) and pre.hook is None and pre.step is None


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_keep_everything_at_every_site_gives_the_full_tokens(build):
    model = build()
    tok = CharTokenizer()
    full = generate(model, tok, CONTEXT, QUESTION, chat=False, max_new_tokens=6)
    for site, method in ONE_PER_SITE.items():
        types = layer_types(model)
        first_full = types.index("full_attention")
        if site == "layer" and first_full + 1 >= len(types):
            continue  # tiny Gemma-3: its only full-attention layer is the last, nothing to prune after
        options = {"layer": first_full + 1} if site == "layer" else {}
        sieve = Sieve(method, keep=1.0, site=site, window=4, options=options)
        out = generate(model, tok, CONTEXT, QUESTION, chat=False, max_new_tokens=6, sieve=sieve)
        assert out.token_ids == full.token_ids, site


def test_score_continuation_feeds_token_by_token_under_a_hook_and_agrees_with_one_chunk():
    model = tiny_llama()
    prompt = _prompt()
    cont = [70, 71, 72, 73, 74]
    chunk = prefill_cache(model, prompt, Sieve("snapkv", keep=0.5, window=4), "query_aware")
    steps = prefill_cache(model, prompt, Sieve("snapkv", keep=0.5, window=4), "query_aware")
    steps.hook = _CountingHook()  # forces the token-by-token path, under the hook
    a, _ = score_continuation(model, chunk, cont)
    b, _ = score_continuation(model, steps, cont)
    assert steps.hook.entered == 1
    assert a == pytest.approx(b, rel=1e-4)


class _CountingHook:
    def __init__(self):
        self.entered = 0

    def active(self):
        import contextlib

        self.entered += 1
        return contextlib.nullcontext()

    def summary(self):
        return {}
