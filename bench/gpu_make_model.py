"""Build a randomly initialised Llama-shaped causal LM from a config and save it as a model
directory (safetensors + tokenizer), for bench/gpu_check.sh: the GPU machine has no model hub
and the embedded SmolLM2 GGUF doesn't travel there, so the checks run on random weights of the
right shapes. Speed and memory depend on the shapes, not on the values.

    python bench/gpu_make_model.py --shape tinyllama-1.1b --tokenizer tests/assets/smollm2-tokenizer --out /tmp/m

Shapes: `tinyllama-1.1b` (TinyLlama-1.1B's layers: hidden 2048, 22 layers, 32 heads, 4 KV heads,
MLP 5632, untied LM head; 1.17B parameters with SmolLM2's 49152-token vocabulary),
`smollm2-135m` (SmolLM2-135M-Instruct's: hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536,
tied), and for CPU dry runs `tiny` (hidden 64, 8 layers, so LoRA on the last 8 layers works)
and `small` (hidden 256, 4 layers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048),
    "llama-1b-16l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024),
}


def build(shape: str, tokenizer: Path, out: Path, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.pad_token_id is None:
        raise SystemExit(f"{tokenizer}: tokenizer has no pad token")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
        **SHAPES[shape],
    )
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch_dtype  # recorded in config.json; loads pick their own dtype anyway
    params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"shape": shape, "parameters": params, "dtype": dtype, "vocab_size": len(tok), "seconds": round(time.time() - t0, 1),
            "dir": str(out), "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}
    (out / "gpu_check_model.json").write_text(json.dumps(info, indent=1) + "\n")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="directory with the tokenizer files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster for 1B)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = build(args.shape, args.tokenizer, args.out, args.device, args.dtype, args.seed)
    print(f"built {info['shape']}: {info['parameters'] / 1e6:.1f}M parameters, {info['dtype']}, "
          f"{info['bytes_on_disk'] / 2**30:.2f} GiB on disk in {info['seconds']} s -> {info['dir']}", flush=True)


if __name__ == "__main__":
    main()
