"""``longllmlingua``: LLMLingua-1's procedure made question-aware (LongLLMLingua).

Jiang et al., "LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt
Compression", ACL 2024, arXiv 2310.06839 (as ``rank_method="longllmlingua"`` and
``condition_compare=True`` in microsoft/LLMLingua ``prompt_compressor.py``):

- coarse: paragraphs are ranked by the mean NLL of ``question + " We can get the answer to this
  question in the given documents."`` given the paragraph (lowest first: the paragraph that makes
  the question most predictable); the budget controller of ``selfinfo`` then keeps paragraphs in
  that order;
- fine: ITPC as in ``selfinfo`` but on the contrastive score ``NLL(x_t | prefix) -
  NLL(x_t | question, prefix)`` (how much the question helps predict the token), with two KV-cached
  streams, one with the question (and a blank line) before the context and one without.

Deviations: those of ``selfinfo``, and the paper's other parts are not used (document reordering,
which would break text order; per-paragraph dynamic ratios, off by default upstream; subsequence
recovery of the answer). A question is required.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowsieve.models import context_length
from flowsieve.prompt.base import SEPARATOR, PromptDoc, prefix_ids, register
from flowsieve.prompt.lm import SurprisalStream, sequence_nll
from flowsieve.prompt.selfinfo import SelfInfo

QUESTION_SUFFIX = " We can get the answer to this question in the given documents."


@dataclass
class LongLLMLingua(SelfInfo):
    """Question-aware LLMLingua: contrastive ITPC and question-conditioned paragraph ranking.

    Attributes: as :class:`~flowsieve.prompt.selfinfo.SelfInfo`.
    """

    needs_question = True

    def _question_ids(self, doc: PromptDoc, suffix: str = "") -> list[int]:
        assert doc.question is not None
        return list(doc.tokenizer(doc.question + suffix, add_special_tokens=False)["input_ids"])

    def rank_paragraphs(self, doc: PromptDoc, model: nn.Module, spans: list[tuple[int, int]]) -> list[int]:
        """Paragraph indices by the mean NLL of the question given the paragraph, lowest first."""
        q = self._question_ids(doc, QUESTION_SUFFIX)
        sep = list(doc.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
        bos = prefix_ids(doc.tokenizer)
        ids = doc.context_ids
        nll = []
        for a, b in spans:
            ctx = bos + ids[a:b] + sep
            nll.append(float(sequence_nll(model, ctx + q, len(ctx)).mean()))
        return sorted(range(len(spans)), key=lambda i: nll[i])

    def streams(self, doc: PromptDoc, model: nn.Module) -> list[SurprisalStream]:
        bos = prefix_ids(doc.tokenizer)
        sep = list(doc.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
        limit = context_length(model)
        conditioned = SurprisalStream(model, bos + self._question_ids(doc) + sep, limit, self.keep_first)
        plain = SurprisalStream(model, bos, limit, self.keep_first)
        return [plain, conditioned]

    def window_scores(self, streams: list[SurprisalStream], window: list[int]) -> torch.Tensor:
        """(w,) contrastive scores: NLL without the question minus NLL with it."""
        plain, conditioned = streams
        return plain.score(window) - conditioned.score(window)


register("longllmlingua")(LongLLMLingua)
