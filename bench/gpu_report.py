"""Helpers of bench/gpu_check.sh that are easier in Python than in bash.

    python bench/gpu_report.py env OUT.json           versions, CUDA, a 4-bit bitsandbytes round trip
    python bench/gpu_report.py quickstart RUN_DIR     the quickstart smoke run's outputs, checked as
                                                      tests/test_recipes_real_model.py checks them
    python bench/gpu_report.py summary WORK OUT       summary.json and summary.md from the stages
                                                      table and the stages' result files
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path

PACKAGES = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "trl", "datasets", "safetensors", "tokenizers",
            "huggingface_hub", "numpy", "pyarrow", "pandas", "dill", "multiprocess", "fsspec", "pyyaml", "tqdm",
            "matplotlib", "pytest", "pluggy", "tensorboard", "wandb", "gguf", "jinja2", "psutil"]
MODULES = {"pyyaml": "yaml", "huggingface_hub": "huggingface_hub"}


def env(out: Path) -> int:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}, "import_errors": {}}
    for name in PACKAGES:
        mod = MODULES.get(name, name)
        try:
            m = importlib.import_module(mod)
            info["packages"][name] = getattr(m, "__version__", None) or importlib.metadata.version(name)
            info.setdefault("files", {})[name] = str(getattr(m, "__file__", ""))
        except Exception as err:  # noqa: BLE001 - a missing or broken package is what this reports
            info["packages"][name] = None
            info["import_errors"][name] = f"{type(err).__name__}: {str(err)[:300]}"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    problems = []
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                       "bf16": torch.cuda.is_bf16_supported()}
        try:  # the NF4 kernels that QLoRA uses, end to end
            import bitsandbytes.functional as F

            w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            q, state = F.quantize_4bit(w, quant_type="nf4")
            err = (F.dequantize_4bit(q, state) - w).abs().mean().item()
            info["bnb_nf4_roundtrip_mean_abs_err"] = err
            if not err < 0.2:
                problems.append(f"bitsandbytes NF4 round trip error {err}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"bitsandbytes on CUDA: {type(e).__name__}: {e}")
    try:
        for mod in ("rlhf.cli", "rlhf.ppo", "policies.models", "rewards.registry"):  # the project's own imports
            importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        problems.append(f"project import: {type(e).__name__}: {e}")
    for need in ("transformers", "accelerate", "peft", "bitsandbytes", "pytest"):
        if info["packages"].get(need) is None:
            problems.append(f"{need} not importable: {info['import_errors'].get(need)}")
    info["problems"] = problems
    out.write_text(json.dumps(info, indent=1) + "\n")
    width = max(map(len, PACKAGES))
    for name in PACKAGES:
        v = info["packages"][name]
        where = info.get("files", {}).get(name, "")
        print(f"  {name:<{width}} {v or '-':<14} {where if v else info['import_errors'].get(name, '')[:100]}")
    print(f"  python {info['python']} ({info['executable']}); torch CUDA {info['torch_cuda']}; GPU {info.get('gpu')}")
    if "bnb_nf4_roundtrip_mean_abs_err" in info:
        print(f"  bitsandbytes NF4 round trip on the GPU: mean |error| {info['bnb_nf4_roundtrip_mean_abs_err']:.4f}")
    for p in problems:
        print(f"  PROBLEM: {p}")
    return 1 if problems else 0


def quickstart(run_dir: Path) -> int:
    """The checks of tests/test_recipes_real_model.py::test_quickstart_recipe_smoke, on its output."""
    problems = []
    summary = json.loads((run_dir / "summary.json").read_text())
    ppo_dir = Path(summary.get("ppo_dir") or run_dir / "ppo")
    if summary.get("reward_model", {}).get("eval", {}).get("all", {}).get("pairs") != 8:
        problems.append(f"reward model eval pairs: {summary.get('reward_model', {}).get('eval')}")
    ppo = summary.get("ppo", {})
    if ppo.get("updates") != 2 or (ppo.get("eval_before") or {}).get("prompts") != 4:
        problems.append(f"ppo summary: updates {ppo.get('updates')}, eval_before {ppo.get('eval_before')}")
    rows = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if [r.get("step") for r in rows] != [1, 2] or not all(r.get("response/length", 0) > 0 for r in rows):
        problems.append(f"metrics.jsonl steps {[r.get('step') for r in rows]}")
    png = ppo_dir / "reward_kl.png"
    if not png.is_file() or png.stat().st_size <= 1000:
        problems.append("no reward_kl.png")
    secs = [round(r["seconds_per_update"], 2) for r in rows if "seconds_per_update" in r]
    result = {"ok": not problems, "problems": problems, "seconds_per_update": secs, "wall_seconds": ppo.get("wall_seconds")}
    (run_dir / "gpu_check_quickstart.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"quickstart outputs: {'ok' if not problems else 'PROBLEMS: ' + '; '.join(problems)}; PPO seconds per update {secs}")
    return 0 if not problems else 1


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001
        return None


def summary(work: Path, out: Path) -> int:
    stages = []
    tsv = work / "stages.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, status, rc, secs, limit, note = (line.split("\t") + [""] * 6)[:6]
        stages.append({"stage": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                       "seconds": float(secs or 0), "limit_s": int(limit or 0), "note": note})
    env_info = _read(work / "env.json") or {}
    engines = sorted((p.stem.removeprefix("qlora_") for p in work.glob("qlora_*.json")), key=lambda e: (e != "hf", e))
    qlora = {e: _read(work / f"qlora_{e}.json") for e in engines or ["hf", "packed"]}
    models = {n: _read(Path(p) / "gpu_check_model.json") for n, p in (("quickstart", work / "model-qs"), ("qlora", work / "model-1b"))}
    quick = _read(work / "quickstart" / "gpu_check_quickstart.json")
    pytest_counts = _pytest_counts(work / "pytest.xml")
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": (work / "mode").read_text().strip() if (work / "mode").is_file() else None,
        "ok": bool(stages) and all(s["status"] == "pass" for s in stages),
        "stages": stages,
        "gpu": env_info.get("gpu"),
        "python": env_info.get("python"),
        "packages": env_info.get("packages"),
        "problems": env_info.get("problems"),
        "pytest": pytest_counts,
        "quickstart": quick,
        "models": models,
        "qlora": qlora,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")

    md = [f"# GPU check ({doc['mode']}), {doc['when']}", ""]
    g = doc["gpu"] or {}
    pk = doc["packages"] or {}
    md.append(f"GPU: {g.get('name', 'none')} ({g.get('memory_gib', '-')} GiB); python {doc['python']}; "
              + ", ".join(f"{k} {pk.get(k)}" for k in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "trl", "datasets")))
    md += ["", "| stage | status | seconds | limit | note |", "| --- | --- | ---: | ---: | --- |"]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} | {s['note']} |" for s in stages]
    if pytest_counts:
        md += ["", "pytest: " + ", ".join(f"{v} {k}" for k, v in pytest_counts.items())]
    md += ["", "4-bit QLoRA PPO update (function reward; settings of recipes/hh_qlora_7b.yaml's PPO stage):", "",
           "| engine | model | params | s/update (each) | steady s/update | peak GPU GiB (all) | peak GiB (updates) | peak by phase | max RSS GiB | ok |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for e, r in qlora.items():
        if r is None:
            md.append(f"| {e} | - | - | - | - | - | - | - | - | no result |")
            continue
        mi = r.get("model_info") or {}
        secs = ", ".join(f"{s:.2f}" for s in r.get("seconds_per_update") or [])
        steady = r.get("steady_update_s")
        md.append(f"| {e} | {mi.get('shape', r.get('model'))} | {mi.get('parameters', 0) / 1e9:.2f}B | {secs} | "
                  f"{'-' if steady is None else f'{steady:.2f}'} | {r.get('peak_gpu_gib', '-')} | {r.get('peak_update_gib', '-')} | "
                  f"{r.get('peak_gib_by_phase', '-')} | {r.get('max_rss_gib', '-')} | {'yes' if r.get('ok') else 'NO: ' + str(r.get('error', ''))[:200]} |")
    if quick:
        md += ["", f"Quickstart at smoke size: {'ok' if quick.get('ok') else 'PROBLEMS: ' + '; '.join(quick.get('problems', []))}; "
                   f"PPO seconds per update {quick.get('seconds_per_update')}"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if doc["ok"] else 1


def _pytest_counts(xml: Path) -> dict | None:
    if not xml.is_file():
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    total = int(suite.get("tests", 0))
    failed, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped,
            "seconds": round(float(suite.get("time", 0)), 1)}


def main() -> int:
    cmd, *rest = sys.argv[1:] or ["-h"]
    if cmd == "env":
        return env(Path(rest[0]))
    if cmd == "quickstart":
        return quickstart(Path(rest[0]))
    if cmd == "summary":
        return summary(Path(rest[0]), Path(rest[1]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
