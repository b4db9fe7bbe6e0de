"""What a ``cdeq run`` depends on: every setting with its default, the presets, what each task
changes, and :class:`PipelineConfig`, which resolves them and rejects unknown names and values."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

from cdeq.config import check_bool, check_choice, check_int, check_number
from cdeq.precision import AMP_CHOICES

if TYPE_CHECKING:
    from cdeq.consistency import DistillConfig

# Settings of every stage; presets change some, `--set key=value` any.
DEFAULTS: dict[str, Any] = {
    "teacher_preset": "cpu",       # the task's training recipe (tiny | cpu | gpu)
    "teacher_from": None,          # a finished teacher run (`python -m cdeq.tasks.train`) to load instead
    "explicit_from": None,         # likewise for the explicit baseline
    "explicit_steps": None,        # training steps of the explicit baseline (None: the task recipe's)
    "traj_from": None,             # a finished trajectory stage (RUN_DIR/trajectories-KEY) of the same teacher and
                                   # settings to copy instead of sampling (seed repeats that share the teacher)
    "traj_steps": 30,              # K: Anderson steps of the teacher trajectory
    "traj_batches": None,          # training batches to sample trajectories on (None: all)
    "traj_batch_size": None,       # None: the task's batch size
    "traj_dtype": "float16",       # storage dtype of the states
    "traj_store": "full",          # "full": every state z_0..z_K; "subset": z_0, z_K and traj_keep steps per item;
                                   # "online": inputs and z_K alone stored, the teacher solves each distillation batch
    "traj_keep": None,             # steps kept per item beside z_0 and z_K by the subset store
    "amp": None,                   # "bf16": f under bfloat16 autocast in teacher training, sampling, the online
                                   # teacher and the training of the students and baselines (cdeq.precision)
    "p_aug": 0.0,                  # Eq. 13 augmentation probability
    "anderson_m": 5,               # the teacher's Anderson window (trajectories and teacher rows)
    "gamma": 1.0, "eps": 0.01, "T": 1.0, "rho": 0.25, "beta": None,   # Eq. 5-6, B.3
    "student_init": "linear",      # where the students start: a learned z_0(u), "linear" or "mlp" (zero-initialised),
                                   # or "zeros", the teacher's z_0 as in the paper
    "student_proj_rank": None,     # W of Eq. 8 in the students: None a full C x (C + 1) matrix (the paper), r the
                                   # identity plus a rank-r map and the time column (cheaper on graphs)
    "distill_steps": 2000, "distill_batch_size": 64, "distill_lr": 1e-3,
    "lambda_global": 0.8, "lambda_task": 0.05, "ema": 0.999, "distance": "mse",
    "rollout_steps": None,         # self-rollout steps in distillation (None: the largest NFE evaluated,
                                   # so the student trains on every state inference visits; 0: Algorithm 2)
    "rollout_weight": 10.0,        # weight of the rollout term against the teacher-state term of L_global
    "anchor_weight": 10.0,         # weight of L_anchor = d(h(z*, t), z*): ties the students' fixed point to the teacher's
    "hyper_steps": 1000, "direct_steps": 1000,
    "nfe": (1, 2, 4, 8),           # budgets of every method
    "teacher_nfe": (12, 16, 32),   # extra budgets of the teacher rows (one solve gives them all)
    "extra_nfe": (12, 16),         # budgets past training for HyperDEQ, the students and cdeq+anderson
    "eval_batch_size": None,       # None: the task's batch size
    "eval_limit": None,            # test batches to evaluate (None: all)
    "time_repeats": 5,
    "fused_inference": True,       # C-DEQ's no-grad Anderson step compiled into fused loops (torch.compile;
                                   # ConsistencyDEQ.fused); eager when it cannot compile
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"teacher_preset": "tiny", "traj_steps": 6, "traj_batches": 2, "traj_batch_size": 8,
             "distill_steps": 6, "distill_batch_size": 4, "hyper_steps": 4, "direct_steps": 4,
             "nfe": (1, 2), "teacher_nfe": (4,), "extra_nfe": (), "eval_limit": 2, "eval_batch_size": 8, "time_repeats": 1,
             "fused_inference": False},
    "small": {"distill_steps": 300, "hyper_steps": 200, "direct_steps": 200},
    "cpu": {},
    "gpu": {"teacher_preset": "gpu", "distill_steps": 6000, "hyper_steps": 3000, "direct_steps": 3000},
}

# MDEQ and the DEQ transformer cost far more per call than IGNN: on 2 CPU cores the trajectory
# set, the training lengths and the evaluated test batches are cut so a run fits in an hour.
_MDEQ_SETTINGS: dict[str, dict[str, Any]] = {
    "*": {"traj_batches": 16, "distill_batch_size": 32},
    "cpu": {"distill_steps": 500, "hyper_steps": 300, "direct_steps": 200, "eval_limit": 20, "explicit_steps": 300},
    "gpu": {"traj_batches": 200, "distill_batch_size": 128},
}

# Per task: what differs from DEQ to DEQ (one graph is one sample; images and text have many).
TASK_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "cora": {"*": {"distill_batch_size": 1, "traj_steps": 30},
             "cpu": {"distill_steps": 800, "hyper_steps": 400, "direct_steps": 400}},
    "citeseer": {"*": {"distill_batch_size": 1, "traj_steps": 30},
                 "cpu": {"distill_steps": 800, "hyper_steps": 400, "direct_steps": 400}},
    "fashion-mnist": _MDEQ_SETTINGS,
    "mnist": _MDEQ_SETTINGS,
    "gutenberg": {"*": {"traj_batches": 64, "distill_batch_size": 16},
                  # lambda_task 0: the 10k-word LM head in the task loss would dominate a distillation step
                  "cpu": {"distill_steps": 500, "hyper_steps": 300, "direct_steps": 200, "eval_limit": 40,
                          "lambda_task": 0.0},
                  "gpu": {"traj_batches": 400, "distill_batch_size": 64}},
    # eval_limit None: perplexity on the whole test split, the benchmark's convention (issue 17)
    "wikitext-2": {"*": {"traj_batches": 64, "distill_batch_size": 16},
                   "cpu": {"distill_steps": 500, "hyper_steps": 300, "direct_steps": 200, "eval_limit": None,
                           "lambda_task": 0.0},
                   "gpu": {"traj_batches": 400, "distill_batch_size": 64}},
}


# Bumped when a stage's code changes what it computes, so run directories of older code recompute it.
STAGE_VERSION: dict[str, int] = {"teacher": 2, "explicit": 2, "trajectories": 2, "student": 2, "hyperdeq": 2,
                                 "direct": 2, "evaluation": 1}


def distill_config(s: dict[str, Any], seed: int) -> "DistillConfig":
    """The :class:`~cdeq.consistency.DistillConfig` of resolved settings ``s``: the rollout runs
    for the largest NFE evaluated unless ``rollout_steps`` says otherwise."""
    from cdeq.consistency import DistillConfig

    rollout = max(s["nfe"]) if s["rollout_steps"] is None else s["rollout_steps"]
    return DistillConfig(steps=s["distill_steps"], lr=s["distill_lr"], batch_size=s["distill_batch_size"],
                         lambda_global=s["lambda_global"], lambda_task=s["lambda_task"], ema=s["ema"],
                         distance=s["distance"], rollout_steps=rollout, rollout_weight=s["rollout_weight"],
                         anchor_weight=s["anchor_weight"], seed=seed, amp=s["amp"])


# Settings whose default is None but whose values are integers.
_INT_SETTINGS = {"traj_keep", "traj_batches", "traj_batch_size", "eval_batch_size", "eval_limit", "rollout_steps", "explicit_steps",
                 "student_proj_rank"}


def _parse_value(key: str, text: str, default: Any) -> Any:
    """``text`` read as the type of ``default`` (tuples are comma-separated ints)."""
    if text.lower() == "none":
        return None
    try:
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split(",") if v.strip())
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, int) or key in _INT_SETTINGS:
            return int(text)
        if isinstance(default, float) or key == "beta":
            return float(text)
    except ValueError:
        raise ValueError(f"--set {key}: expected a value like {default!r}, got {text!r}") from None
    return text


def check_settings(s: dict[str, Any]) -> None:
    """Raise a ValueError naming the first resolved setting that is out of range, so a bad
    ``--set`` fails before the first stage rather than an hour into the run."""
    from cdeq.consistency.schedule import TimeSchedule
    from cdeq.consistency.student import INITS
    from cdeq.consistency.trajectories import STORAGE_DTYPES

    check_choice("teacher_preset", s["teacher_preset"], ("tiny", "cpu", "gpu"))
    check_choice("student_init", s["student_init"], INITS)
    check_choice("traj_dtype", s["traj_dtype"], [name for name in STORAGE_DTYPES if name is not None])
    check_choice("traj_store", s["traj_store"], ("full", "subset", "online"))
    if (s["traj_store"] == "subset") != (s["traj_keep"] is not None):
        raise ValueError(f"traj_keep: the subset store needs it and the full store takes none "
                         f"(traj_store={s['traj_store']!r}, traj_keep={s['traj_keep']!r})")
    if s["traj_keep"] is not None:
        check_int("traj_keep", s["traj_keep"], 0)
    if s["amp"] is not None:
        check_choice("amp", s["amp"], AMP_CHOICES)
    for name in ("traj_steps", "anderson_m", "distill_steps", "distill_batch_size", "hyper_steps", "direct_steps",
                 "time_repeats"):
        check_int(name, s[name], 1)
    for name in ("traj_batches", "traj_batch_size", "explicit_steps", "eval_batch_size", "eval_limit",
                 "student_proj_rank"):
        if s[name] is not None:
            check_int(name, s[name], 1)
    if s["rollout_steps"] is not None:
        check_int("rollout_steps", s["rollout_steps"], 0)
    for name in ("nfe", "teacher_nfe", "extra_nfe"):
        if not isinstance(s[name], (tuple, list)) or (name == "nfe" and not s[name]):
            raise ValueError(f"{name}: expected a{' non-empty' if name == 'nfe' else ''} tuple of ints >= 1, "
                             f"got {s[name]!r}")
        for k in s[name]:
            check_int(name, k, 1)
    check_number("p_aug", s["p_aug"], 0.0, 1.0)
    check_bool("fused_inference", s["fused_inference"])
    check_number("distill_lr", s["distill_lr"], 0.0, low_open=True)
    distill_config(s, seed=0)  # raises naming a bad loss or optimiser setting
    TimeSchedule(eps=s["eps"], T=s["T"], gamma=s["gamma"], rho=s["rho"], beta=s["beta"])  # raises on a bad map


def check_device(device: str) -> None:
    """Raise a ValueError unless ``device`` names a torch device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but this torch build sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {device!r}")


@dataclasses.dataclass
class PipelineConfig:
    """Everything one run depends on. ``settings`` holds :data:`DEFAULTS` after the preset, the
    task's adjustments and the overrides; ``deq`` the teacher's DEQ options set on the command line."""

    task: str
    preset: str = "cpu"
    device: str = "cpu"
    seed: int = 0
    out: Optional[str] = None
    command: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    deq: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        unknown = sorted(set(self.settings) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"settings: unknown {unknown}; valid settings: {sorted(DEFAULTS)}")
        task_adjust = TASK_SETTINGS.get(self.task, {})
        resolved = {**DEFAULTS, **PRESETS[self.preset], **task_adjust.get("*", {}),
                    **task_adjust.get(self.preset, {}), **self.settings}
        if self.preset == "tiny":  # the smoke test keeps its own sizes whatever the task says
            resolved.update({k: v for k, v in PRESETS["tiny"].items() if k not in self.settings})
            resolved.update({k: v for k, v in task_adjust.get("*", {}).items() if k.endswith("batch_size")})
        self.settings = resolved
        from cdeq import tasks

        check_choice("task", self.task, tasks.NAMES)
        check_int("seed", self.seed, 0)
        check_device(self.device)
        check_settings(resolved)
        if self.out is None:
            self.out = f"runs/{self.task}-{self.preset}-seed{self.seed}"

    @classmethod
    def from_args(cls, args: Any, command: str = "") -> "PipelineConfig":
        """Build from the parsed ``cdeq run`` arguments (``--set KEY=VALUE`` and the DEQ flags)."""
        overrides: dict[str, Any] = {}
        for item in args.overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
            if key not in DEFAULTS:
                raise ValueError(f"--set {key}: unknown setting; valid settings: {sorted(DEFAULTS)}")
            overrides[key] = _parse_value(key, value, DEFAULTS[key])
        return cls(task=args.task, preset=args.preset, device=args.device, seed=args.seed, out=args.out,
                   command=command, settings=overrides, deq=_deq_flags_set(args))

    def describe(self) -> str:
        lines = [f"task {self.task}, preset {self.preset}, device {self.device}, seed {self.seed}, out {self.out}"]
        lines += [f"  {k} = {v!r}" for k, v in sorted(self.settings.items())]
        if self.deq:
            lines.append(f"  teacher DEQ options: {self.deq}")
        return "\n".join(lines)


def _deq_flags_set(args: Any) -> dict[str, Any]:
    """The teacher DEQ options given on the command line (TorchDEQ flags that differ from their
    defaults), as :class:`cdeq.DEQ` keyword arguments."""
    import argparse

    from cdeq.config import DEQ_OPTIONS, DEQConfig, add_deq_args

    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    defaults = vars(parser.parse_args([]))
    given = {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    if not given:
        return {}
    base = DEQConfig.from_args(argparse.Namespace(**defaults))
    chosen = DEQConfig.from_args(argparse.Namespace(**{**defaults, **given}))
    return {k: getattr(chosen, k) for k in DEQ_OPTIONS if getattr(chosen, k) != getattr(base, k)}

