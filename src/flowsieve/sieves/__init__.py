"""KV-cache scorers: one method per file, registered by name in :data:`METHODS`.

A scorer says what it needs observed during prefill (:meth:`KVScorer.spec`) and turns one layer's
observations into a score per cache entry (:meth:`KVScorer.score`); selection and the cache write
happen in :mod:`flowsieve.sieve`. Importing this package imports every method module.
"""

from __future__ import annotations

import importlib
import pkgutil

from flowsieve.sieves.base import METHODS, KVScorer, ScoreContext

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "KVScorer", "ScoreContext"]
