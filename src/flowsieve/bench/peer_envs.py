"""The peers' specs and names, and their virtual environments (built once, reused afterwards).

:data:`PEERS` says how each peer's environment is built and which of its methods run under which of
our names (:func:`parse_peer_method`, :func:`peer_method`); :func:`ensure_env` creates the
environment under ``.venv-peers/<system>/`` (:func:`peers_dir`) and :func:`runner_path` finds the
peer's runner script in the checkout (``benchmarks/peers/<system>_runner.py``). Running a peer:
:mod:`flowsieve.bench.peers`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flowsieve.bench.config import parse_method
from flowsieve.errors import FlowsieveError, did_you_mean, unknown

MODES = ("query_aware", "query_agnostic")

TORCH_PIN = "torch==2.13.0"
"""Installed first, alone: the local CPU wheel. An unpinned torch pulls a multi-GB CUDA build."""


@dataclass(frozen=True)
class PeerSpec:
    """How to build a peer's environment and run it."""

    system: str
    package: str
    """The peer's pip requirement, pinned."""
    requirements: tuple[str, ...]
    """Installed together with ``package`` (after torch)."""
    methods: dict[str, str]
    """Our method name -> the peer's class or method it runs."""
    runner: str
    """File name of the runner script in ``benchmarks/peers/``."""
    only_modes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Methods that run in some modes only (method -> modes); the rest run in both."""
    models: tuple[str, ...] = ("smollm2",)
    """The bundled models (``flowsieve.models.BUNDLED``) the runner loads."""
    models_note: str = ""
    """Why other bundled models are not supported (said in the error)."""
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Method options, spelled ``method@name=value`` (name -> its values, the first the default)."""

    def modes(self, method: str) -> tuple[str, ...]:
        return self.only_modes.get(method, MODES)


PEERS: dict[str, PeerSpec] = {
    "kvpress": PeerSpec(
        system="kvpress",
        package="kvpress==0.5.5",
        requirements=("transformers>=4.56,<5.3", "gguf>=0.10", "accelerate>=1.0", "psutil>=5.9"),
        methods={
            "snapkv": "SnapKVPress",
            "streaming_llm": "StreamingLLMPress",
            "tova": "TOVAPress",
            "knorm": "KnormPress",
            "observed_attention": "ObservedAttentionPress",
            "expected_attention": "ExpectedAttentionPress",
            "keydiff": "KeyDiffPress",
            "pyramidkv": "PyramidKVPress",
            "adakv_expected_attention": "AdaKVPress(ExpectedAttentionPress)",
        },
        runner="kvpress_runner.py",
        models=("smollm2", "gemma3-270m"),
        # full: only full-attention layers are pressed (our adaptation for Gemma-3's sliding-window
        # layers; every layer of SmolLM2); all: every layer, kvpress 0.5.5 as shipped
        options={"layers": ("full", "all")},
    ),
    "llmlingua": PeerSpec(
        system="llmlingua",
        package="llmlingua==0.2.2",
        # LLMLingua-1 unpacks tuple caches: transformers 5 fails ("too many values to unpack")
        requirements=("transformers==4.44.*", "gguf>=0.10", "accelerate>=1.0", "psutil>=5.9"),
        methods={
            "llmlingua": "LLMLingua-1 (PromptCompressor.compress_prompt, rank_method='llmlingua')",
            "longllmlingua": "LongLLMLingua (PromptCompressor.compress_prompt, rank_method='longllmlingua')",
        },
        runner="llmlingua_runner.py",
        # LongLLMLingua ranks and prunes with the question; compress_prompt refuses to run without one
        only_modes={"longllmlingua": ("query_aware",)},
        models_note="its environment's transformers 4.44 cannot read Gemma-3",
    ),
}

PEER_METHODS: dict[str, dict[str, str]] = {s: dict(p.methods) for s, p in PEERS.items()}
"""Per peer system: our method name -> what the peer runs (kvpress press class, LLMLingua variant)."""

BUILD_TIMEOUT_S = 1800
ERROR_TAG = "FLOWSIEVE-PEER-ERROR:"
"""A runner's last stderr line starting with this is its one-line reason for failing."""


# --- names -------------------------------------------------------------------------------------------


def peer_spec(system: str) -> PeerSpec:
    """The spec of peer ``system``; unknown names raise :class:`FlowsieveError` with a suggestion."""
    spec = PEERS.get(system)
    if spec is None:
        raise unknown("peer", str(system), PEERS)
    return spec


def parse_peer_method(system: str, method: str) -> tuple[str, dict[str, str]]:
    """``"snapkv@layers=all"`` -> ``("snapkv", {"layers": "all"})``: our method name and its options,
    every option of the peer filled in (the default where not given). Unknown names and values raise
    :class:`FlowsieveError` with a suggestion."""
    spec = peer_spec(system)
    name, given = parse_method(str(method))
    if name not in spec.methods:
        names = list(spec.methods)
        raise FlowsieveError(
            f"{system} has no method '{name}'{did_you_mean(name, names)}; methods: {', '.join(names)}"
        )
    options = {k: values[0] for k, values in spec.options.items()}
    for key, value in given.items():
        if key not in spec.options:
            known = list(spec.options)
            raise FlowsieveError(
                f"{system} has no method option '{key}'{did_you_mean(key, known)}; "
                f"options: {', '.join(known) or '(none)'}"
            )
        values = spec.options[key]
        if str(value) not in values:
            raise FlowsieveError(
                f"{system} option {key} must be one of {', '.join(values)}, got {value!r}"
                f"{did_you_mean(str(value), values)}"
            )
        options[key] = str(value)
    return name, options


def peer_method(system: str, method: str) -> str:
    """What the peer runs for our method name ``method`` (e.g. ``snapkv`` -> ``SnapKVPress``); options
    given in the name are added (``snapkv@layers=all`` -> ``SnapKVPress (layers=all)``)."""
    name, options = parse_peer_method(system, method)
    what = peer_spec(system).methods[name]
    given = parse_method(str(method))[1]
    return f"{what} ({', '.join(f'{k}={options[k]}' for k in given)})" if given else what


# --- environments ------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The checkout flowsieve runs from (peer environments and runner scripts live there)."""
    return Path(__file__).resolve().parents[3]


def peers_dir() -> Path:
    """Where the peer environments live: ``$FLOWSIEVE_PEERS_DIR`` or ``<repo>/.venv-peers``."""
    env = os.environ.get("FLOWSIEVE_PEERS_DIR")
    return Path(env) if env else repo_root() / ".venv-peers"


def runner_path(system: str) -> Path:
    """The runner script of peer ``system`` (``benchmarks/peers/<system>_runner.py`` in the checkout)."""
    path = repo_root() / "benchmarks" / "peers" / peer_spec(system).runner
    if not path.is_file():
        raise FlowsieveError(
            f"the {system} runner script {path} is missing (peers run from a flowsieve checkout, "
            "not from an installed wheel)"
        )
    return path


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def _install_steps(spec: PeerSpec) -> list[list[str]]:
    # torch alone first, so the resolver sees it installed and never reaches for a CUDA build
    return [[TORCH_PIN], [spec.package, *spec.requirements]]


def _spec_hash(spec: PeerSpec) -> str:
    key = json.dumps({"steps": _install_steps(spec), "python": sys.version_info[:2]})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


STAMP = ".flowsieve-peer.json"


def env_ready(system: str) -> bool:
    """Whether the environment of ``system`` exists and was built from the current spec."""
    env = peers_dir() / system
    try:
        stamp = json.loads((env / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("spec") == _spec_hash(peer_spec(system)) and env_python(env).exists()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (two bench processes must not build one env at once)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def one_line(text: str, limit: int = 400) -> str:
    """The most telling line of a tool's output: the last ``ERROR``/exception line, else the last line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    tagged = [ln for ln in lines if ln.startswith(ERROR_TAG)]
    if tagged:
        line = tagged[-1][len(ERROR_TAG) :].strip()
    else:
        errs = [ln for ln in lines if ln.startswith("ERROR") or "Error:" in ln or "Exception:" in ln]
        line = errs[-1] if errs else lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _run_step(cmd: Sequence[str], what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise FlowsieveError(f"{what} took longer than {timeout:.0f}s") from e
    except OSError as e:
        raise FlowsieveError(f"{what} could not start: {e}") from e
    if proc.returncode != 0:
        raise FlowsieveError(f"{what} failed: {one_line(proc.stderr or proc.stdout)}")


def ensure_env(system: str, *, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """The virtual environment of peer ``system``, created on first use and reused afterwards.

    Created under ``.venv-peers/<system>/`` (see :func:`peers_dir`) with this interpreter's ``venv``;
    ``torch==2.13.0`` is installed first and alone (the local CPU wheel), then the peer pinned with
    its transformers range, gguf and accelerate. A stamp file records the spec it was built from: a
    changed spec, or a build that was interrupted, rebuilds it from scratch. Downloads from PyPI
    (minutes). Failures raise :class:`FlowsieveError` with pip's reason in one line.
    """
    spec = peer_spec(system)
    root = peers_dir()
    env = root / system
    with _locked(root / f".{system}.lock"):
        if env_ready(system):
            return env
        shutil.rmtree(env, ignore_errors=True)
        t0 = time.perf_counter()
        _run_step([sys.executable, "-m", "venv", str(env)], f"creating the {system} environment", timeout)
        pip = [str(env_python(env)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for step in _install_steps(spec):
            _run_step(pip + step, f"installing {' '.join(step)} into the {system} environment", timeout)
        versions = _env_versions(env)
        stamp = {
            "spec": _spec_hash(spec),
            "steps": _install_steps(spec),
            "built_s": round(time.perf_counter() - t0, 1),
            "versions": versions,
        }
        (env / STAMP).write_text(json.dumps(stamp, indent=1))
    return env


def _env_versions(env: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for p in ('torch', 'transformers', 'tokenizers', 'kvpress', 'llmlingua', 'gguf', 'accelerate'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    try:
        proc = subprocess.run([str(env_python(env)), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


__all__ = [
    "PEERS",
    "PEER_METHODS",
    "PeerSpec",
    "ensure_env",
    "env_python",
    "env_ready",
    "one_line",
    "parse_peer_method",
    "peer_method",
    "peer_spec",
    "peers_dir",
    "repo_root",
    "runner_path",
]
