"""torchrun entry point of tests/test_loop_wiring.py: trains a job (argv[1]) with hooks on both experts and writes
what this rank saw to ``<argv[2]>.rank<RANK>`` as JSON: every training forward pass (grad enabled, model in train
mode) as [expert, timesteps], and every ``on_step`` report as [step, expert]."""

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core.config import job_from_dict, load_yaml  # noqa: E402
from trainer_core.models import load_components  # noqa: E402
from trainer_core.train.loop import run_training  # noqa: E402


def main() -> None:
    cfg = job_from_dict(load_yaml(sys.argv[1]))
    components = load_components(cfg.model)
    seen: dict[str, list] = {"passes": [], "steps": []}

    def pre(expert, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            t = kwargs["timestep"] if "timestep" in kwargs else args[1]
            seen["passes"].append([expert, [float(x) for x in t.detach().reshape(-1).double()]])

    components.high.register_forward_pre_hook(partial(pre, "high"), with_kwargs=True)
    components.low.register_forward_pre_hook(partial(pre, "low"), with_kwargs=True)
    run_training(cfg, components=components, on_step=lambda info: seen["steps"].append([info.step, info.expert]),
                 progress_bar=False)
    Path(f"{sys.argv[2]}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
