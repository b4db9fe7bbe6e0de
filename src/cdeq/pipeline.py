"""``cdeq run TASK``: the whole C-DEQ method on a real task, stage by stage.

teacher DEQ -> its Anderson trajectories -> the C-DEQ student (and its plain ablation) ->
HyperDEQ -> the explicit baseline -> the direct baseline (one per J) -> the evaluation grid ->
``table.json``, ``table.md`` and the figures.

Every stage lives in ``RUN_DIR/<stage>-<key>/``, where the key hashes the stage's settings and the
keys of the stages it reads, and is marked done by a ``done.json`` holding its one-line summary.
A rerun skips finished stages and resumes an interrupted one from its own checkpoints; a changed
setting gives the stages it touches a new key, so no stale result is reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from cdeq.io import atomic_write_json, load_checkpoint, save_checkpoint
from cdeq.measure import peak_memory_mb, time_ms, time_rounds_ms
from cdeq.state import batch_norm2, to_device
from cdeq.training import BEST, CHECKPOINT, METRICS

# Settings of every stage; presets change some, `--set key=value` any.
DEFAULTS: dict[str, Any] = {
    "teacher_preset": "cpu",       # the task's training recipe (tiny | cpu | gpu)
    "teacher_from": None,          # a finished teacher run (`python -m cdeq.tasks.train`) to load instead
    "explicit_from": None,         # likewise for the explicit baseline
    "explicit_steps": None,        # training steps of the explicit baseline (None: the task recipe's)
    "traj_steps": 30,              # K: Anderson steps of the teacher trajectory
    "traj_batches": None,          # training batches to sample trajectories on (None: all)
    "traj_batch_size": None,       # None: the task's batch size
    "traj_dtype": "float16",       # storage dtype of the states
    "p_aug": 0.0,                  # Eq. 13 augmentation probability
    "anderson_m": 5,               # the teacher's Anderson window (trajectories and teacher rows)
    "gamma": 1.0, "eps": 0.01, "T": 1.0, "rho": 0.25, "beta": None,   # Eq. 5-6, B.3
    "student_init": "linear",      # where the students start: a learned z_0(u), "linear" or "mlp" (zero-initialised),
                                   # or "zeros", the teacher's z_0 as in the paper (MNIST, NFE 1: 98.7% vs 97.1%)
    "distill_steps": 2000, "distill_batch_size": 64, "distill_lr": 1e-3,
    "lambda_global": 0.8, "lambda_task": 0.05, "ema": 0.999, "distance": "mse",
    "rollout_steps": None,         # self-rollout steps in distillation (None: the largest NFE evaluated,
                                   # so the student trains on every state inference visits; 0: Algorithm 2)
    "rollout_weight": 10.0,        # weight of the rollout term against the teacher-state term of L_global
                                   # (1 -> 10, Cora: C-DEQ 82.3 / 82.4 / 82.6 / 83.1 -> 82.6 / 82.8 / 83.2 / 83.4)
    "anchor_weight": 10.0,         # weight of L_anchor = d(h(z*, t), z*), which ties the students' own fixed point
                                   # to the teacher's (0 -> 10, Fashion-MNIST residual at NFE 8: 4.3e-2 -> 8.6e-3)
    "hyper_steps": 1000, "direct_steps": 1000,
    "nfe": (1, 2, 4, 8),           # budgets of every method
    "teacher_nfe": (16, 32),       # extra budgets of the teacher rows
    "eval_batch_size": None,       # None: the task's batch size
    "eval_limit": None,            # test batches to evaluate (None: all)
    "time_repeats": 5,
    "fused_inference": True,       # C-DEQ's no-grad Anderson step compiled into fused loops (torch.compile;
                                   # ConsistencyDEQ.fused); eager when it cannot compile
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"teacher_preset": "tiny", "traj_steps": 6, "traj_batches": 2, "traj_batch_size": 8,
             "distill_steps": 6, "distill_batch_size": 4, "hyper_steps": 4, "direct_steps": 4,
             "nfe": (1, 2), "teacher_nfe": (4,), "eval_limit": 2, "eval_batch_size": 8, "time_repeats": 1,
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
                  # lambda_task 0: the 10k-word LM head in the task loss made a distillation step 4x slower
                  "cpu": {"distill_steps": 500, "hyper_steps": 300, "direct_steps": 200, "eval_limit": 40,
                          "lambda_task": 0.0},
                  "gpu": {"traj_batches": 400, "distill_batch_size": 64}},
}


# Settings added after runs were made, with the value those runs had: a stage key holds them only
# when they differ from it (Run._since, _key_fields); the stage itself always gets the value.
_VALUE_BEFORE: dict[str, Any] = {"student_init": "zeros", "rollout_weight": 1.0, "anchor_weight": 0.0}


def _key_fields(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` less those at the value runs made before the setting existed had
    (:data:`_VALUE_BEFORE`): the stage key they enter, so earlier runs' stages stay cached."""
    return {k: v for k, v in settings.items() if not (k in _VALUE_BEFORE and v == _VALUE_BEFORE[k])}


# Settings whose default is None but whose values are integers.
_INT_SETTINGS = {"traj_batches", "traj_batch_size", "eval_batch_size", "eval_limit", "rollout_steps", "explicit_steps"}


def _parse_value(key: str, text: str, default: Any) -> Any:
    """``text`` read as the type of ``default`` (tuples are comma-separated ints)."""
    if text.lower() == "none":
        return None
    try:
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split(","))
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
        from cdeq.consistency.student import INITS

        if resolved["student_init"] not in INITS:
            raise ValueError(f"student_init: expected one of {INITS}, got {resolved['student_init']!r}")
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


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def git_commit() -> str:
    """The commit of the cdeq checkout this runs from (``-dirty`` with uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """A human description of the device the run used."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


LATENCY_RATIO = "median of per-round ratios"  # how table.json's latency ratio is formed (earlier: ratio of medians)


def student_latency(student: ConsistencyDEQ, teacher: Any, x: Any, budgets: list[int], device: torch.device,
                    repeats: int = 21) -> dict[str, dict[str, float]]:
    """C-DEQ's time per batch at NFE=k against its floor: the injection, k bare calls of the
    teacher's layer and the readout, on the same batch ``x``. Every budget of both is timed in each
    round; ``cdeq_ms``/``bare_ms`` are medians over rounds, ``ratio`` the median of the ratios within
    a round (steady under load from other processes, which changes between rounds)."""
    def bare(k: int) -> Tensor:
        u = teacher.inject(x)
        z = teacher.init_state(u)
        for _ in range(k):
            z = teacher.layer(z, u)
        return teacher.readout(z)
    fns: dict[str, Callable[[], object]] = {}
    for k in budgets:
        fns[f"cdeq{k}"] = lambda k=k: student.predict(x, steps=k)
        fns[f"bare{k}"] = lambda k=k: bare(k)
    times = time_rounds_ms(fns, device, warmup=3, repeats=repeats)
    return {str(k): {"cdeq_ms": statistics.median(times[f"cdeq{k}"]), "bare_ms": statistics.median(times[f"bare{k}"]),
                     "ratio": statistics.median(c / b for c, b in zip(times[f"cdeq{k}"], times[f"bare{k}"]))}
            for k in budgets}


class Stage:
    """One cached, resumable stage of a run: ``RUN_DIR/<name>-<key>/`` with ``done.json``."""

    def __init__(self, run_dir: Path, name: str, payload: dict[str, Any]) -> None:
        self.name = name
        self.key = _key(payload)
        self.dir = run_dir / f"{name}-{self.key}"
        self.payload = payload

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()

    def run(self, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(dir) -> summary`` unless done; print and return the one-line summary."""
        if self.done:
            summary = json.loads((self.dir / "done.json").read_text())["summary"]
            print(f"[{self.name}] cached ({self.dir.name}): {_line(summary)}", flush=True)
            return summary
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "settings.json", self.payload)
        t0 = time.perf_counter()
        summary = fn(self.dir)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(self.dir / "done.json", {"summary": summary})
        print(f"[{self.name}] done ({self.dir.name}): {_line(summary)}", flush=True)
        return summary


def _line(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Run:
    """The stages of one ``cdeq run``, sharing the task, the teacher and the trajectories."""

    def __init__(self, config: PipelineConfig) -> None:
        from cdeq import tasks

        self.config = config
        self.commit = git_commit()  # the code this run executes (taken before any stage runs)
        self.s = config.settings
        self.device = torch.device(config.device)
        self.run_dir = Path(config.out)
        self.task = tasks.get(config.task)
        torch.manual_seed(config.seed)
        base = {"task": config.task, "seed": config.seed}
        self.teacher_stage = Stage(self.run_dir, "teacher", {**base, "preset": self.s["teacher_preset"], "deq": config.deq,
                                                             "from": self._source_hash("teacher_from")})
        self.explicit_stage = Stage(self.run_dir, "explicit", {**base, "preset": self.s["teacher_preset"],
                                                               "from": self._source_hash("explicit_from"),
                                                               "steps": self.s["explicit_steps"]})
        traj_keys = ("traj_steps", "traj_batches", "traj_batch_size", "traj_dtype", "p_aug", "anderson_m")
        self.traj_stage = Stage(self.run_dir, "trajectories", {"teacher": self.teacher_stage.key,
                                                                **{k: self.s[k] for k in traj_keys}})
        self._teacher = None
        self._trajectories = None

    def _source_hash(self, setting: str) -> Optional[str]:
        """The checkpoint hash of a finished run named by ``setting`` (None when unset)."""
        from cdeq.io import sha256_file

        source = self.s[setting]
        if source is None:
            return None
        if not (Path(source) / CHECKPOINT).exists():
            raise FileNotFoundError(f"{setting}: no {CHECKPOINT} in {source} (a finished training run directory)")
        return sha256_file(Path(source) / CHECKPOINT)

    def _copy_run(self, source: Path, d: Path) -> dict[str, Any]:
        """Take a finished training run's checkpoints and metrics into a stage directory."""
        import shutil

        for name in (CHECKPOINT, BEST, METRICS):
            if (source / name).exists():
                shutil.copyfile(source / name, d / f".{name}.tmp")
                (d / f".{name}.tmp").replace(d / name)
        metrics = json.loads((d / METRICS).read_text())
        return {self.task.metric: metrics["test"][self.task.metric], "from": str(source)}

    # -- shared artefacts -------------------------------------------------------------------------
    def teacher(self):
        if self._teacher is None:
            self._teacher = self.task.load_teacher(self.teacher_stage.dir, device=str(self.device))
            self._teacher.requires_grad_(False)
        return self._teacher

    def explicit(self) -> torch.nn.Module:
        """The trained explicit baseline (its best weights if selected, else the last), in eval mode."""
        d = self.explicit_stage.dir
        ckpt = load_checkpoint(d / CHECKPOINT, map_location=self.device)
        if ckpt["meta"].get("kind") != "explicit" or ckpt["meta"].get("task") != self.task.name:
            raise ValueError(f"explicit_from: {d} holds a {ckpt['meta'].get('task')}/{ckpt['meta'].get('kind')} run, "
                             f"not a {self.task.name} explicit baseline")
        model = self.task.build_explicit(**ckpt["meta"]["recipe"]["explicit"])
        state = load_checkpoint(d / BEST, map_location=self.device)["model"] if (d / BEST).exists() else ckpt["model"]
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def trajectories(self):
        from cdeq.consistency import Trajectories

        if self._trajectories is None:
            self._trajectories = Trajectories.open(self.traj_stage.dir / "cache", teacher=self.teacher())
        return self._trajectories

    def timemap(self) -> dict[str, Any]:
        return {k: self.s[k] for k in ("gamma", "eps", "T", "rho", "beta")}

    def _since(self, setting: str, name: str) -> dict[str, Any]:
        """``{name: value}`` of a setting added after runs were made, empty at the value those runs
        used (:data:`_VALUE_BEFORE`), so their stage keys, and so their cached stages, stay valid."""
        value = self.s[setting]
        return {} if value == _VALUE_BEFORE[setting] else {name: value}

    def student_options(self) -> dict[str, Any]:
        """ConsistencyDEQ options of the students and the direct baseline (also their stage keys)."""
        return {**self.timemap(), **self._since("student_init", "init")}

    # -- stages ---------------------------------------------------------------------------------------
    def train_teacher(self) -> dict[str, Any]:
        def fn(d: Path) -> dict[str, Any]:
            if self.s["teacher_from"] is not None:
                summary = self._copy_run(Path(self.s["teacher_from"]), d)
                self.task.load_teacher(d)  # a run of another task or kind is an error here
                return summary
            overrides = {"deq": self.config.deq} if self.config.deq else {}
            metrics = self.task.train_teacher(d, preset=self.s["teacher_preset"], seed=self.config.seed,
                                              device=str(self.device), **overrides)
            return {self.task.metric: metrics["test"][self.task.metric], "params": metrics.get("params", _params(self.teacher()))}
        return self.teacher_stage.run(fn)

    def train_explicit(self) -> dict[str, Any]:
        def fn(d: Path) -> dict[str, Any]:
            if self.s["explicit_from"] is not None:
                return self._copy_run(Path(self.s["explicit_from"]), d)
            overrides = {}
            if self.s["explicit_steps"] is not None:
                recipe = self.task.recipe(self.s["teacher_preset"])
                overrides["explicit_train"] = {**recipe.get("explicit_train", recipe["train"]), "steps": self.s["explicit_steps"]}
            metrics = self.task.train_explicit(d, preset=self.s["teacher_preset"], seed=self.config.seed,
                                               device=str(self.device), **overrides)
            return {self.task.metric: metrics["test"][self.task.metric]}
        return self.explicit_stage.run(fn)

    def sample(self) -> dict[str, Any]:
        from cdeq.consistency import sample_trajectories

        def fn(d: Path) -> dict[str, Any]:
            batches = self.task.batches("train", batch_size=self.s["traj_batch_size"], shuffle=True,
                                        limit=self.s["traj_batches"], seed=self.config.seed)
            traj = sample_trajectories(self.teacher(), ((to_device(x, self.device), y) for x, y in batches),
                                       steps=self.s["traj_steps"], solver="anderson",
                                       solver_options={"m": self.s["anderson_m"]}, p_aug=self.s["p_aug"],
                                       cache_dir=d / "cache", dtype=getattr(torch, self.s["traj_dtype"]),
                                       seed=self.config.seed)
            final = float(torch.cat([traj.residuals(i)[:, -1].float() for i in range(traj.num_shards)]).mean())
            return {"items": len(traj), "K": traj.steps, "final_rel_residual": final}
        return self.traj_stage.run(fn)

    def distill_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`cdeq.consistency.distill` (every one given, so distill's
        own defaults never stand in for a setting)."""
        return {"steps": self.s["distill_steps"], "lr": self.s["distill_lr"], "batch_size": self.s["distill_batch_size"],
                "lambda_global": self.s["lambda_global"], "lambda_task": self.s["lambda_task"], "ema": self.s["ema"],
                "distance": self.s["distance"],
                "rollout_steps": max(self.s["nfe"]) if self.s["rollout_steps"] is None else self.s["rollout_steps"],
                "rollout_weight": self.s["rollout_weight"], "anchor_weight": self.s["anchor_weight"]}

    def distill(self, structure: str, name: Optional[str] = None, **changes: Any):
        """Distil a C-DEQ student (``structure`` "anderson" or "plain"); returns (student, summary)."""
        from cdeq.consistency import ConsistencyDEQ, distill

        settings = {**self.distill_settings(), **{k: v for k, v in changes.items() if k in self.distill_settings()}}
        options = {**self.student_options(), **{k: v for k, v in changes.items() if k in self.timemap()}}
        stage = Stage(self.run_dir, name or ("cdeq" if structure == "anderson" else "cdeq-plain"),
                      {"trajectories": self.traj_stage.key, "structure": structure, "seed": self.config.seed,
                       **options, **_key_fields(settings)})
        student = ConsistencyDEQ(self.teacher(), structure=structure, **options).to(self.device)

        def fn(d: Path) -> dict[str, Any]:
            result = distill(student, self.trajectories(), checkpoint_dir=str(d), device=self.device,
                             seed=self.config.seed, **settings)
            save_checkpoint(d / "model.pt", {"model": student.state_dict()})
            err = result["eval"]["student"]
            return {f"err@{k}": float(v) for k, v in err.items()}
        summary = stage.run(fn)
        student.load_state_dict(load_checkpoint(stage.dir / "model.pt", map_location=self.device)["model"])
        return student.eval(), summary

    def train_hyperdeq(self):
        from cdeq.baselines import HyperDEQ, train_hyperdeq

        stage = Stage(self.run_dir, "hyperdeq", {"trajectories": self.traj_stage.key, "seed": self.config.seed,
                                                 "steps": self.s["hyper_steps"], "m": self.s["anderson_m"],
                                                 "batch_size": self.s["distill_batch_size"]})
        hyper = HyperDEQ(self.teacher(), m=self.s["anderson_m"]).to(self.device)

        def fn(d: Path) -> dict[str, Any]:
            history = train_hyperdeq(hyper, self.trajectories(), steps=self.s["hyper_steps"], checkpoint_dir=str(d),
                                     batch_size=self.s["distill_batch_size"], device=self.device, seed=self.config.seed)
            save_checkpoint(d / "model.pt", {"model": hyper.state_dict()})
            return {"loss": float(history[-1]["loss"])} if history else {}
        summary = stage.run(fn)
        hyper.load_state_dict(load_checkpoint(stage.dir / "model.pt", map_location=self.device)["model"])
        return hyper.eval(), summary

    def train_direct(self, nfe: int):
        from cdeq.baselines import train_direct
        from cdeq.consistency import ConsistencyDEQ

        stage = Stage(self.run_dir, f"direct-J{nfe}", {"trajectories": self.traj_stage.key, "seed": self.config.seed,
                                                       "steps": self.s["direct_steps"], "lr": self.s["distill_lr"],
                                                       "batch_size": self.s["distill_batch_size"], **self.student_options()})
        model = ConsistencyDEQ(self.teacher(), structure="anderson", **self.student_options()).to(self.device)

        def fn(d: Path) -> dict[str, Any]:
            history = train_direct(model, self.trajectories(), nfe=nfe, steps=self.s["direct_steps"], lr=self.s["distill_lr"],
                                   batch_size=self.s["distill_batch_size"], checkpoint_dir=str(d), device=self.device,
                                   seed=self.config.seed)
            save_checkpoint(d / "model.pt", {"model": model.state_dict()})
            return {"loss": float(history[-1]["loss"])} if history else {}
        summary = stage.run(fn)
        model.load_state_dict(load_checkpoint(stage.dir / "model.pt", map_location=self.device)["model"])
        return model.eval(), summary

    # -- evaluation ------------------------------------------------------------------------------------
    def rel_residual(self, x: Any, z: Any) -> Tensor:
        """Per-sample ||f(z)-z||/||f(z)|| of a state under the teacher's layer."""
        teacher = self.teacher()
        fz = teacher.layer(z, teacher.inject(x))
        diff = tuple(a - b for a, b in zip(fz, z)) if isinstance(z, tuple) else fz - z
        return batch_norm2(diff) / batch_norm2(fz).clamp_min(1e-30)

    def evaluate_method(self, method: str, nfe: Optional[int], state_fn: Optional[Callable[[Any], Any]],
                        logits_fn: Callable[[Any], Tensor], params: int) -> dict[str, Any]:
        """One row: the metric on the test split, the mean relative residual of the states, and the
        median time and peak memory of one call on the first test batch."""
        residuals: list[Tensor] = []

        def predict(x: Any) -> Tensor:
            x = to_device(x, self.device)
            if state_fn is None:
                return logits_fn(x)
            z = state_fn(x)
            residuals.append(self.rel_residual(x, z).float().cpu())
            return self.teacher().readout(z)

        with torch.no_grad():
            value = self.task.evaluate(predict, "test", batch_size=self.s["eval_batch_size"], limit=self.s["eval_limit"])
            x0, _ = next(iter(self.task.batches("test", batch_size=self.s["eval_batch_size"], limit=1)))
            x0 = to_device(x0, self.device)
            call = (lambda: self.teacher().readout(state_fn(x0))) if state_fn is not None else (lambda: logits_fn(x0))
            ms = time_ms(call, self.device, repeats=self.s["time_repeats"])
            mem = peak_memory_mb(call, self.device)
        rel = float(torch.cat(residuals).mean()) if residuals else None
        row = {"method": method, "nfe": nfe, "value": value, "rel_residual": rel, "time_ms": ms,
               "params": params, "peak_mem_mb": mem}
        shown = f"{value * 100:.2f}%" if self.task.metric == "accuracy" else f"ppl {value:.2f}"
        print(f"  {method:<20} nfe {str(nfe):>4}  {shown:>10}  rel.res {rel if rel is None else f'{rel:.2e}'}  "
              f"{ms:8.2f} ms", flush=True)
        return row

    def teacher_rows(self, solver: str, budgets: list[int]) -> list[dict[str, Any]]:
        teacher = self.teacher()
        options = {"m": self.s["anderson_m"]} if solver == "anderson" else {}
        name = "teacher-anderson" if solver == "anderson" else "teacher-fixed-point"

        def state_fn(k: int) -> Callable[[Any], Any]:
            return lambda x: teacher.truncated_solve(x, k, solver, check_residual=False, **options)[0]
        return [self.evaluate_method(name, k, state_fn(k), None, _params(teacher)) for k in budgets]

    def latency(self, student: ConsistencyDEQ, budgets: list[int]) -> dict[str, dict[str, float]]:
        """:func:`student_latency` on the first test batch."""
        x0, _ = next(iter(self.task.batches("test", batch_size=self.s["eval_batch_size"], limit=1)))
        return student_latency(student, self.teacher(), to_device(x0, self.device), budgets, self.device,
                               repeats=3 * self.s["time_repeats"])

    def converged_teacher(self) -> dict[str, Any]:
        """The teacher at its working tolerance: its metric and mean NFE."""
        teacher, nfes = self.teacher(), []

        def predict(x: Any) -> Tensor:
            logits, info = teacher(to_device(x, self.device))
            nfes.append(info.steps.float().cpu())
            return logits

        with torch.no_grad():
            value = self.task.evaluate(predict, "test", batch_size=self.s["eval_batch_size"], limit=self.s["eval_limit"])
        return {"nfe": float(torch.cat(nfes).mean()), "value": value}


def run_pipeline(config: PipelineConfig, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage of ``config`` and write the table and figures; returns the table."""
    from cdeq.report import markdown_table, write_report

    run = Run(config)
    s = run.s
    print(f"cdeq run {config.task}: preset {config.preset}, device {config.device}, seed {config.seed}, "
          f"run dir {run.run_dir}", flush=True)
    run.train_teacher()
    run.train_explicit()
    run.sample()
    cdeq_student, _ = run.distill("anderson")
    cdeq_student.fused = s["fused_inference"]
    plain_student, _ = run.distill("plain")
    hyper, _ = run.train_hyperdeq()
    directs = {j: run.train_direct(j)[0] for j in s["nfe"]}
    explicit = run.explicit()

    print("[evaluate] test split", flush=True)
    rows = run.teacher_rows("anderson", sorted(set(s["nfe"]) | set(s["teacher_nfe"])))
    rows += run.teacher_rows("fixed_point", sorted(set(s["nfe"]) | set(s["teacher_nfe"])))
    for k in s["nfe"]:
        rows.append(run.evaluate_method("hyperdeq", k, lambda x, k=k: hyper.solve(x, nfe=k), None, _params(hyper)))
        for name, student in (("cdeq", cdeq_student), ("cdeq-plain", plain_student)):
            rows.append(run.evaluate_method(name, k, lambda x, k=k, st=student: st.infer(x, steps=k), None,
                                            sum(p.numel() for p in student.trainable_parameters())))
        direct = directs[k]
        rows.append(run.evaluate_method("direct", k, lambda x, k=k, m=direct: m.infer(x, steps=k), None,
                                        sum(p.numel() for p in direct.trainable_parameters())))
    rows.append(run.evaluate_method("explicit", None, None, lambda x: explicit(x), _params(explicit)))
    table = {
        "task": config.task, "command": config.command, "device": device_name(run.device), "commit": run.commit,
        "seed": config.seed, "preset": config.preset, "teacher_converged": run.converged_teacher(),
        "metric": run.task.metric, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "latency": run.latency(cdeq_student, list(s["nfe"])),
        "latency_ratio": LATENCY_RATIO,
        "rows": rows,
    }
    write_report(run.run_dir, table, figures=figures)
    print(markdown_table(table), flush=True)
    return table


ABLATIONS: dict[str, dict[str, tuple]] = {
    # C-DEQ Table 4: lambda_global (lambda_1 of Eq. 11) x lambda_task (lambda_2).
    "lambdas": {"lambda_task": (0.0, 0.05), "lambda_global": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)},
    # The time map of Eq. 6 (rho) and the boundary exponent of Eq. 5 (gamma).
    "timemap": {"gamma": (1.0, 2.0, 4.0), "rho": (0.1, 0.25, 0.5, 1.0)},
}


def run_ablation(config: PipelineConfig, grid: str) -> dict[str, Any]:
    """Distil one C-DEQ student per point of the ``grid`` on the run's teacher and trajectories and
    write ``ablation-<grid>.json`` / ``.md`` with the metric at each NFE of the run's grid."""
    from cdeq.io import atomic_write_text

    if grid not in ABLATIONS:
        raise ValueError(f"grid: expected one of {sorted(ABLATIONS)}, got {grid!r}")
    run = Run(config)
    run.train_teacher()
    run.sample()
    (outer, outer_values), (inner, inner_values) = ABLATIONS[grid].items()
    results = []
    for a in outer_values:
        for b in inner_values:
            student, _ = run.distill("anderson", name=f"ablate-{outer}{a}-{inner}{b}", **{outer: a, inner: b})
            values = {}
            for k in run.s["nfe"]:
                row = run.evaluate_method("cdeq", k, lambda x, k=k: student.infer(x, steps=k), None, 0)
                values[k] = row["value"]
            results.append({outer: a, inner: b, "values": values})
    pct = run.task.metric == "accuracy"
    lines = [f"## {config.task}: C-DEQ ablation over {outer} x {inner}", "",
             f"Test {run.task.metric} of the distilled student at NFE {', '.join(map(str, run.s['nfe']))} "
             f"(device {device_name(run.device)}, seed {config.seed}, commit {run.commit[:10]}).", "",
             f"| {outer} | {inner} | " + " | ".join(f"NFE {k}" for k in run.s["nfe"]) + " |",
             "|---|---|" + "---:|" * len(run.s["nfe"])]
    for r in results:
        cells = " | ".join(f"{r['values'][k] * 100:.2f}" if pct else f"{r['values'][k]:.2f}" for k in run.s["nfe"])
        lines.append(f"| {r[outer]} | {r[inner]} | {cells} |")
    lines += ["", f"Command: `{config.command}`", ""]
    out = {"task": config.task, "grid": grid, "command": config.command, "device": device_name(run.device),
           "commit": run.commit, "seed": config.seed, "metric": run.task.metric,
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in run.s.items()}, "results": results}
    atomic_write_json(run.run_dir / f"ablation-{grid}.json", out)
    atomic_write_text(run.run_dir / f"ablation-{grid}.md", "\n".join(lines))
    print("\n".join(lines), flush=True)
    return out
