"""`rlhf pipeline`: reward model, then PPO against it, in one run directory.

The recipe states both stages in full (`rm:` a train-rm config, `ppo:` a PPO config whose
`reward` points at the reward model the first stage writes). Nothing is rewritten after loading;
the job only checks that the two stages are wired together. A finished reward model is reused,
and PPO resumes from its checkpoints, so an interrupted pipeline continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf import ppo as ppo_loop
from rlhf import train_rm
from rlhf.config import ConfigError, doc, required
from rlhf.io import atomic_write_json


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    rm: train_rm.TrainRMConfig = doc(train_rm.TrainRMConfig(), "stage 1: the reward model")
    ppo: ppo_loop.PPOConfig = required("stage 2: PPO; its reward must be {type: bt|grm, path: <rm.output_dir>/model}")
    run_dir: str = doc("runs/pipeline", "where the pipeline's summary goes (stages write to their own output_dir)")

    def __post_init__(self) -> None:
        reward = self.ppo.reward
        expected = Path(self.rm.output_dir) / "model"
        if getattr(reward, "type", None) not in ("bt", "grm") or Path(getattr(reward, "path", "")) != expected:
            raise ConfigError(f"ppo.reward must be {{type: bt, path: {expected}}} (the model rm writes), got {reward}")


def run(cfg: PipelineConfig) -> dict:
    t0 = time.time()
    model_dir = Path(cfg.rm.output_dir) / "model"
    rm_summary_file = Path(cfg.rm.output_dir) / "summary.json"
    if (model_dir / "reward_model.json").is_file() and rm_summary_file.is_file():
        import json

        print(f"[1/2] reusing the reward model in {model_dir}")
        rm_summary = json.loads(rm_summary_file.read_text())
    else:
        print("[1/2] training the reward model")
        rm_summary = train_rm.run(cfg.rm)
    print("[2/2] PPO against it")
    resume = (Path(cfg.ppo.output_dir) / "checkpoints" / "latest").is_file()
    ppo_summary = ppo_loop.run(dataclasses.replace(cfg.ppo, resume=resume) if resume else cfg.ppo)
    summary = {"reward_model": rm_summary, "ppo": ppo_summary, "wall_seconds": round(time.time() - t0, 1)}
    atomic_write_json(Path(cfg.run_dir) / "summary.json", summary)
    _report(summary, cfg)
    return summary


def _report(summary: dict, cfg: PipelineConfig) -> None:
    rm_eval = summary["reward_model"].get("eval", {}).get("all")
    if rm_eval:
        print(f"reward model: held-out pairwise accuracy {rm_eval['accuracy']:.3f} on {rm_eval['pairs']} pairs")
    p = summary["ppo"]
    if "eval_before" in p:
        b, a = p["eval_before"], p["eval_after"]
        change = p.get("eval_change", {})
        se = f" ± {change['se']:.3f} paired SE" if "se" in change else ""
        print(f"policy on {a['prompts']} held-out prompts: reward {b['reward_mean']:.3f} → {a['reward_mean']:.3f} "
              f"({a['reward_mean'] - b['reward_mean']:+.3f}{se}) at KL {a['kl_mean']:.3f} nats from the start")
    print(f"PPO run: {cfg.ppo.output_dir} (metrics.jsonl, reward_kl.png, eval_samples_before/after.jsonl); "
          f"total {summary['wall_seconds']}s")
