"""Methods: what scores tokens. One method per file, registered by name in :data:`METHODS`.

A KV method says what it needs observed (:meth:`KVScorer.spec`) and turns one layer's
observations into a score per cache entry (:meth:`KVScorer.score`); layer methods
(:mod:`.layer`) score the tokens still in the residual stream; prompt methods (:mod:`.prompt`)
score a prompt's text. Methods take observations and tensors and return scores: they never touch
the model, the cache or a site. Selection from scores is :mod:`.selection`; the sites
(:mod:`flowsieve.sites`) apply it. Importing this package imports every method module.
"""

from __future__ import annotations

import importlib
import pkgutil

from flowsieve.methods.base import METHODS, KVScorer, ScoreContext

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "KVScorer", "ScoreContext"]
