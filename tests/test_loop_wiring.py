"""The training loop's wiring, end to end on the tiny preset (issue #22).

The math (sigma sampling, guidance, EMA, schedules) is tested on its own elsewhere; these tests check that the loop
connects it right: which noise levels each expert trains on, the guidance scale a step applies, exact resume from a
position inside an epoch or inside a step, and that gradients, LR schedules and EMAs follow the active expert.

Only public behaviour is observed, so the tests keep guarding after the loop is restructured: what each expert's
forward pass receives and the gradients its LoRA weights get (hooks on the models passed in as ``components``), what
``on_step`` reports and what the saved files hold. Nothing in the loop's modules is patched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import trainer_core.train.loop as loop
from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.lora import lora_file_name, lora_state_dict_comfy
from trainer_core.models import load_components
from trainer_core.regularizers import ema_lora_file_name

sys.path.insert(0, str(Path(__file__).parent))
from tiny_job import tiny_job  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BOUNDARY_T = 875.0  # multistage.boundary 0.875: t >= 875 is the high-noise expert's
EXPERTS = ("high", "low")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized models: one intra-op thread is several times faster than more on a shared CPU (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("clips"), n_clips=4, num_frames=5, size=(32, 32), seed=11)


def _job(out: Path, clips: Path, steps: int, **over) -> dict:
    over.setdefault("datasets", [{"folder": str(clips), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.0}])
    return tiny_job(out, clips, steps, name="w", seed=7, switch_every=1, trigger_word="sqz",
                    saving={"save_every": 0, "keep_last": 0, "dtype": "fp32"}, **over)


def _active(step: int, switch_every: int) -> str:
    """The expert of 0-based step ``step`` as the README defines it: blocks of ``switch_every`` steps, high first."""
    return EXPERTS[(step // switch_every) % 2]


class Watch:
    """Hooks on both experts of ``components``, recording in order: every *training* forward pass (grad enabled and
    the model in train mode; DOP's prior and previews run without grad) with the expert and its timesteps, every
    ``on_step`` report, and optionally each LoRA gradient once accumulated (``grads``) and both experts' LoRA
    weights at the first training pass and after every step (``snapshots``, ComfyUI naming, fp32 copies)."""

    def __init__(self, components, cfg, grads: bool = False, snapshots: bool = False, on_forward=None) -> None:
        self.cfg = cfg
        self.models = {"high": components.high, "low": components.low}
        self.events: list[tuple] = []
        self.grads, self.snapshots, self.on_forward = grads, snapshots, on_forward
        self.initial: dict[str, dict[str, torch.Tensor]] = {}
        self.after: list[dict[str, dict[str, torch.Tensor]]] = []  # one per on_step call
        self.n_forward = 0
        self._hooked: set[int] = set()
        for name, model in self.models.items():
            model.register_forward_pre_hook(partial(self._pre, name), with_kwargs=True)

    def _snapshot(self, model) -> dict[str, torch.Tensor] | None:
        if not getattr(model, "peft_config", None):
            return None
        return {k: v.clone() for k, v in lora_state_dict_comfy(model, self.cfg.lora, torch.float32).items()}

    def _pre(self, name, module, args, kwargs) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.events.append(("fwd", name, [float(x) for x in t.detach().reshape(-1).double()]))
        for other, model in self.models.items():
            if self.snapshots and other not in self.initial and (snap := self._snapshot(model)) is not None:
                self.initial[other] = snap
            if self.grads and id(model) not in self._hooked and any(p.requires_grad for p in model.parameters()):
                self._hooked.add(id(model))
                for pname, p in model.named_parameters():
                    if p.requires_grad:
                        p.register_post_accumulate_grad_hook(partial(self._grad, other, pname))
        self.n_forward += 1
        if self.on_forward is not None:
            self.on_forward(name, self.n_forward)

    def _grad(self, expert, pname, p) -> None:
        self.events.append(("grad", expert, pname, p.grad.detach().clone()))

    def on_step(self, info) -> None:
        self.events.append(("step", info))
        if self.snapshots:
            self.after.append({n: self._snapshot(m) for n, m in self.models.items()})

    def steps(self) -> list[tuple]:
        """Per reported step: (StepInfo, [(expert, timesteps) of its training passes], {expert: {param: grad}})."""
        out, passes, grads = [], [], {}
        for event in self.events:
            if event[0] == "fwd":
                passes.append(event[1:])
            elif event[0] == "grad":
                grads.setdefault(event[1], {})[event[2]] = event[3]  # the last one is the accumulated gradient
            else:
                out.append((event[1], passes, grads))
                passes, grads = [], {}
        return out


def _run(cfg, components=None, watch_kw: dict | None = None, double: bool = False, **kw):
    components = components or load_components(cfg.model)
    if double:
        components.high.double()
        components.low.double()
    watch = Watch(components, cfg, **(watch_kw or {}))
    result = loop.run_training(cfg, components=components, on_step=watch.on_step, progress_bar=False, **kw)
    return result, watch


# --- 1. which noise levels each expert trains on ---------------------------------------------------------------------

_TYPES = ("linear", "sigmoid", "shift", "weighted")
_BIASES = ("balanced", "high_noise", "low_noise")


def _check_noise_levels(watch: Watch, steps: int, switch_every: int) -> None:
    seen = watch.steps()
    assert [info.expert for info, _, _ in seen] == [_active(k, switch_every) for k in range(steps)]
    for info, passes, _ in seen:
        assert passes, f"step {info.step} ran no training pass"
        for expert, ts in passes:
            assert expert == info.expert, f"step {info.step} ({info.expert}) ran a training pass on {expert}"
            if expert == "high":
                assert all(BOUNDARY_T <= t < 1000.0 for t in ts), (info.step, expert, ts)
            else:
                assert all(0.0 <= t < BOUNDARY_T for t in ts), (info.step, expert, ts)
    assert {e for _, passes, _ in seen for e, _ in passes} == {"high", "low"}


# Every type and every bias runs with switch_every 1 (steps high, low) and 2 (high, high, low), in 12 runs.
_NOISE_CASES = [(t, b, 1 + (i + j) % 2) for i, t in enumerate(_TYPES) for j, b in enumerate(_BIASES)]


@pytest.mark.parametrize("timestep_type,timestep_bias,switch_every", _NOISE_CASES)
def test_each_expert_trains_only_on_its_own_noise_levels(tmp_path, clips, timestep_type, timestep_bias, switch_every):
    steps = 2 if switch_every == 1 else 3
    cfg = job_from_dict(_job(tmp_path / "out", clips, steps, multistage={"switch_every": switch_every},
                             train={"timestep_type": timestep_type, "timestep_bias": timestep_bias}))
    _, watch = _run(cfg)
    _check_noise_levels(watch, steps, switch_every)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_groups_train_each_expert_on_its_own_noise_levels(tmp_path, clips):
    """Two CPU ranks under torchrun: rank 0 holds and trains the high-noise expert, rank 1 the low-noise one, both
    in every round (tests/loop_wiring_worker.py records what each rank's experts received)."""
    steps = 4
    job = _job(tmp_path / "out", clips, steps, train={"timestep_bias": "high_noise"},
               distributed={"expert_groups": True})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    record = tmp_path / "seen"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "loop_wiring_worker.py"), str(path), str(record)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank, mine in enumerate(EXPERTS):
        seen = json.loads(Path(f"{record}.rank{rank}").read_text())
        # every rank reports every step, both groups' steps, in order
        assert [e for _, e in seen["steps"]] == [_active(k, 1) for k in range(steps)]
        passes = seen["passes"]
        assert [e for e, _ in passes] == [mine] * (steps // 2), (rank, passes)
        for _, ts in passes:
            if mine == "high":
                assert all(BOUNDARY_T <= t < 1000.0 for t in ts), (rank, ts)
            else:
                assert all(0.0 <= t < BOUNDARY_T for t in ts), (rank, ts)


# --- 2. the guidance scale as the training step applies it ------------------------------------------------------------
# DOP's preservation term is exactly 0 while a LoRA is still at its zero init, so the compared steps (3: high, 4: low)
# resume one shared state of 2 plain steps, each variant in a copy of it: identical weights, data and noise.


def _guidance_job(out: Path, clips: Path, steps: int, **advanced) -> dict:
    return _job(out, clips, steps, advanced=advanced,
                datasets=[{"folder": str(clips), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.0,
                           "prepend_trigger": True}])  # every caption holds the trigger word (DOP acts on all)


@pytest.fixture(scope="module")
def trained_two_steps(tmp_path_factory, clips) -> Path:
    out = tmp_path_factory.mktemp("base") / "out"
    _run(job_from_dict(_guidance_job(out, clips, 2)), double=True)
    return out


@pytest.fixture(scope="module")
def step_grads(tmp_path_factory, clips, trained_two_steps):
    """``get(**advanced)``: both experts' LoRA gradients of steps 3 and 4 (float64 model) resumed with ``advanced``,
    and the losses on_step reported; cached per setting."""
    cache = {}

    def get(**advanced):
        key = tuple(sorted(advanced.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("variant") / "out"
            shutil.copytree(trained_two_steps, out)
            job = {**_guidance_job(out, clips, 4, **advanced), "resume": "latest"}
            _, watch = _run(job_from_dict(job), watch_kw={"grads": True}, double=True)
            seen = watch.steps()
            assert [(info.step, info.expert) for info, _, _ in seen] == [(3, "high"), (4, "low")]
            grads = {}
            for info, _, g in seen:
                assert set(g) == {info.expert}
                grads[info.expert] = _flat(g[info.expert])
                assert grads[info.expert].abs().max() > 0
            cache[key] = grads, [info.loss for info, _, _ in seen]
        return cache[key]

    return get


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].double().reshape(-1) for k in sorted(grads)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (whole-tensor norms: the loss is computed in float32, so single elements near 0 are noisy)."""
    return float((a - b).norm() / b.norm())


def test_differential_guidance_scales_the_step_gradient_by_its_scale(step_grads):
    plain, plain_loss = step_grads()
    guided, guided_loss = step_grads(diff_guidance=True, diff_guidance_scale=2.0)
    for expert in EXPERTS:
        assert _rel(guided[expert], 2.0 * plain[expert]) < 1e-5, expert
    # the reported loss is the plain flow-matching loss, comparable across settings
    assert guided_loss == pytest.approx(plain_loss, rel=1e-5)


def test_differential_guidance_with_dop_scales_only_the_normal_loss(step_grads):
    plain, _ = step_grads()
    dop, _ = step_grads(dop=True)
    dop_guided, _ = step_grads(dop=True, diff_guidance=True, diff_guidance_scale=2.0)
    for expert in EXPERTS:
        p, d, dg = plain[expert], dop[expert], dop_guided[expert]
        assert _rel(d, p) > 1e-3, expert  # DOP acts: its preservation term changes the gradient
        # guided at 2: 2·normal + dop = (normal + dop) + normal (up to float32 rounding: DOP batches its passes)
        assert _rel(dg - d, p) < 1e-4, expert


# --- 3. exact resume from inside an epoch and inside a step ----------------------------------------------------------

_RESUME_STEPS = 6


def _resume_job(out: Path, clips: Path, accumulation: int) -> dict:
    # batch 1 over 4 clips: 4 batches per epoch, so step 3 ends inside an epoch whatever the accumulation
    return _job(out, clips, _RESUME_STEPS, multistage={"switch_every": 2},
                train={"batch_size": 1, "gradient_accumulation": accumulation})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, clips):
    runs = {}

    def get(accumulation: int):
        if accumulation not in runs:
            out = tmp_path_factory.mktemp(f"full{accumulation}")
            runs[accumulation] = loop.run_training(job_from_dict(_resume_job(out, clips, accumulation)),
                                                   progress_bar=False)
        return runs[accumulation]

    return get


def _assert_same_run(full, resumed) -> None:
    assert resumed.step == full.step == _RESUME_STEPS
    assert resumed.losses == full.losses  # bitwise-equal floats, every step
    for expert in EXPERTS:
        a, b = load_file(str(full.lora_files[expert])), load_file(str(resumed.lora_files[expert]))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (expert, k)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_after_an_odd_step_inside_an_epoch(tmp_path, clips, uninterrupted, accumulation):
    job = _resume_job(tmp_path / "out", clips, accumulation)

    def stop_at_3(info):
        if info.step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        loop.run_training(job_from_dict(job), on_step=stop_at_3, progress_bar=False)
    resumed = loop.run_training(job_from_dict({**job, "resume": "latest"}), progress_bar=False)
    _assert_same_run(uninterrupted(accumulation), resumed)


def test_resume_after_an_interrupt_between_micro_batches(tmp_path, clips, uninterrupted):
    """Ctrl-C during step 4's second micro-batch: step 3's state is written, and step 4's batches (already taken
    from the data) are drawn again on resume."""
    job = _resume_job(tmp_path / "out", clips, 2)
    cfg = job_from_dict(job)

    def interrupt(expert, n):
        if n == 2 * 3 + 2:  # the second micro-batch of step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, watch_kw={"on_forward": interrupt})
    resumed = loop.run_training(job_from_dict({**job, "resume": "latest"}), progress_bar=False)
    assert [s for s, _, _ in resumed.losses] == list(range(1, _RESUME_STEPS + 1))
    _assert_same_run(uninterrupted(2), resumed)


# --- 4. per-expert routing of gradients, LR schedules and EMA --------------------------------------------------------


def _saved(run_dir: Path, step: int, expert: str, ema: bool = False) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / (ema_lora_file_name if ema else lora_file_name)("w", step, expert)))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_active_experts_lora_gets_gradients_and_changes(tmp_path, clips):
    steps, every = 6, 2
    cfg = job_from_dict(_job(tmp_path / "out", clips, steps, multistage={"switch_every": every},
                             save={"save_every": 1}))
    result, watch = _run(cfg, watch_kw={"grads": True, "snapshots": True})
    seen = watch.steps()
    assert [info.expert for info, _, _ in seen] == [_active(k, every) for k in range(steps)]
    assert set(watch.initial) == set(EXPERTS)
    before = dict(watch.initial)
    for (info, _, grads), after in zip(seen, watch.after):
        active = info.expert
        nonzero = {e for e, g in grads.items() if any(bool(v.abs().max() > 0) for v in g.values())}
        assert nonzero == {active}, (info.step, active, sorted(grads))
        assert not _equal(after[active], before[active]), f"step {info.step}: the {active} LoRA did not change"
        for other in set(EXPERTS) - {active}:
            assert _equal(after[other], before[other]), f"step {info.step}: the inactive {other} LoRA changed"
        for expert in EXPERTS:  # what is saved is what was trained
            assert _equal(_saved(result.run_dir, info.step, expert), after[expert]), (info.step, expert)
        before = after


def _schedule_factor(kind: str, k: int, total: int, warmup: int) -> float:
    """The LR multiplier after ``k`` of an expert's ``total`` steps: linear warmup over ``warmup`` steps, then a
    cosine (half period) or linear decay to 0 at ``total``."""
    if k < warmup:
        return k / max(1, warmup)
    if kind == "linear":
        return max(0.0, (total - k) / max(1, total - warmup))
    progress = (k - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind,warmup,every,steps", [("cosine", 1, 1, 6), ("linear", 2, 2, 7)])
def test_each_experts_lr_schedule_advances_only_on_its_own_steps(tmp_path, clips, kind, warmup, every, steps):
    lr = 2e-3
    cfg = job_from_dict(_job(tmp_path / "out", clips, steps, multistage={"switch_every": every},
                             optimizer={"lr": lr, "lr_scheduler": kind, "warmup_steps": warmup}))
    _, watch = _run(cfg)
    seen = [info for info, _, _ in watch.steps()]
    names = [_active(k, every) for k in range(steps)]
    assert [info.expert for info in seen] == names
    total = {e: names.count(e) for e in EXPERTS}
    done = dict.fromkeys(EXPERTS, 0)
    reported, expected = [], []
    for info in seen:
        reported.append(info.lr)
        # the lr on_step reports is the one the step trained with: the schedule at the expert's own steps done
        expected.append(lr * _schedule_factor(kind, done[info.expert], total[info.expert], warmup))
        done[info.expert] += 1
    assert reported == pytest.approx(expected, rel=1e-9, abs=1e-15), (reported, expected)


def test_ema_follows_only_the_active_expert(tmp_path, clips):
    steps, decay = 4, 0.5
    cfg = job_from_dict(_job(tmp_path / "out", clips, steps, save={"save_every": 1},
                             advanced={"ema": True, "ema_decay": decay}))
    result, watch = _run(cfg, watch_kw={"snapshots": True})
    seen = [info for info, _, _ in watch.steps()]
    assert [info.expert for info in seen] == [_active(k, 1) for k in range(steps)]
    ema = {e: {k: v.double() for k, v in watch.initial[e].items()} for e in EXPERTS}  # the EMA starts at the init
    for info in seen:
        live = _saved(result.run_dir, info.step, info.expert)
        ema[info.expert] = {k: decay * v + (1 - decay) * live[k].double() for k, v in ema[info.expert].items()}
        for expert in EXPERTS:
            saved = _saved(result.run_dir, info.step, expert, ema=True)
            assert set(saved) == set(ema[expert])
            for k, v in ema[expert].items():
                torch.testing.assert_close(saved[k].double(), v, rtol=1e-6, atol=1e-9,
                                           msg=f"step {info.step} {expert} EMA {k}")
