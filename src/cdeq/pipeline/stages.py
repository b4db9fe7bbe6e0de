"""The stages of one run. A :class:`Stage` is ``RUN_DIR/<name>-<key>/``, the key hashing its settings
and the keys of the stages it reads; :class:`Run` trains, samples, distils and evaluates through them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from cdeq import distributed
from cdeq.io import (atomic_write_json, hash_artefacts, list_artefacts, load_checkpoint, save_checkpoint,
                     verify_artefacts)
from cdeq.measure import git_commit
from cdeq.pipeline.settings import STAGE_VERSION, PipelineConfig, distill_config
from cdeq.state import batch_items, to_device
from cdeq.training import BEST, CHECKPOINT, METRICS

if TYPE_CHECKING:
    from cdeq.baselines import HyperDEQ
    from cdeq.consistency import ConsistencyDEQ, OnlineTeacher, Storage, Trajectories
    from cdeq.consistency.losses import StateLoss


# The settings that decide what the trajectory stage samples (its key, and what ``traj_from`` must match).
TRAJ_KEYS = ("traj_steps", "traj_batches", "traj_batch_size", "traj_dtype", "p_aug", "anderson_m", "traj_store",
             "traj_keep")


TIMEMAP = ("gamma", "eps", "T", "rho", "beta")  # the TimeSchedule settings (Eq. 5-6, B.3), flat in stage keys


def student_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """:class:`~cdeq.consistency.ConsistencyDEQ` keyword arguments from flat student options (the
    time settings gathered into its ``schedule``)."""
    from cdeq.consistency import TimeSchedule

    rest = {k: v for k, v in options.items() if k not in TIMEMAP}
    return {**rest, "schedule": TimeSchedule(**{k: options[k] for k in TIMEMAP})}


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]



class Stage:
    """One cached, resumable stage of a run: ``RUN_DIR/<name>-<key>/`` with ``done.json``, which
    holds the stage's summary, the commit that computed it and the SHA-256 of every file it wrote.
    ``kind`` picks the :data:`STAGE_VERSION` that enters the key (default: the name)."""

    def __init__(self, run_dir: Path, name: str, payload: dict[str, Any], kind: Optional[str] = None,
                 commit: str = "") -> None:
        self.name, self.commit = name, commit
        payload = {"version": STAGE_VERSION[kind or name], **payload}
        self.key = _key(payload)
        self.dir = run_dir / f"{name}-{self.key}"
        self.payload = payload

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()

    def record(self) -> dict[str, Any]:
        """The stage's ``done.json``."""
        return json.loads((self.dir / "done.json").read_text())

    def intact(self) -> bool:
        """Whether every file the finished stage recorded still has its SHA-256; a damaged stage is
        named and reopened so that it is computed again: its checkpoints are all set aside (a
        finished checkpoint would resume at the end and never rewrite a damaged ``best.pt``), while a
        trajectory cache resamples only its damaged shards."""
        bad = verify_artefacts(self.dir, self.record().get("artefacts", {}))
        if not bad:
            return True
        distributed.print0(f"[{self.name}] damaged files in {self.dir.name}: {', '.join(bad)}; computing the stage "
                           "again", flush=True)
        distributed.barrier()
        if distributed.is_main():
            (self.dir / "done.json").unlink()
            for path in self.dir.glob("*.pt"):
                path.replace(path.with_name(f"{path.name}.corrupt"))
        distributed.barrier()
        return False

    def run(self, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(dir) -> summary`` unless done; print and return the one-line summary. Every
        rank runs ``fn`` (training is collective); the main rank writes the stage's files."""
        if self.done and self.intact():
            summary = self.record()["summary"]
            distributed.print0(f"[{self.name}] cached ({self.dir.name}): {_line(summary)}", flush=True)
            return summary
        if distributed.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / "settings.json", self.payload)
        distributed.barrier()
        t0 = time.perf_counter()
        summary = fn(self.dir)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        if distributed.is_main():
            # trajectory shards are verified through their cache's manifest, which is hashed here
            names = [name for name in list_artefacts(self.dir) if not name.endswith(".safetensors")]
            artefacts = hash_artefacts(self.dir, names)
            atomic_write_json(self.dir / "done.json", {"summary": summary, "commit": self.commit,
                                                       "artefacts": artefacts})
        distributed.barrier()  # the stage's files are on disk before any rank reads them
        distributed.print0(f"[{self.name}] done ({self.dir.name}): {_line(summary)}", flush=True)
        return summary


class RowCache:
    """The finished rows of a run's evaluation, ``RUN_DIR/eval-<key>/<row>.json``, so that an
    evaluation killed part-way resumes at the first row it had not finished. The key hashes
    ``payload`` (:meth:`Run.eval_rows`: the files of every stage and the settings the evaluation
    reads); a row keeps the times measured when it was computed. A row file that does not parse is
    computed again."""

    def __init__(self, run_dir: Path, payload: dict[str, Any]) -> None:
        payload = {"version": STAGE_VERSION["evaluation"], **payload}
        self.dir = run_dir / f"eval-{_key(payload)}"
        self.payload = payload

    def row(self, name: str, compute: Callable[[], Any]) -> Any:
        """Row ``name`` from its file, or ``compute()`` it and write it (the main rank) first."""
        return self.group([name], lambda: [compute()])[0]

    def group(self, names: list[str], compute: Callable[[], list[Any]]) -> list[Any]:
        """Rows ``names`` from their files, or all of them from one ``compute()`` (written by the main
        rank) when any is missing or does not parse."""
        found = [self._read(self.dir / f"{name}.json") for name in names]
        if all(value is not None for value in found):
            return found
        values = compute()
        if distributed.is_main():
            if not self.dir.is_dir():
                self.dir.mkdir(parents=True)
                atomic_write_json(self.dir / "settings.json", self.payload)
            for name, value in zip(names, values):
                atomic_write_json(self.dir / f"{name}.json", value)
        distributed.barrier()
        return values

    @staticmethod
    def _read(path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            distributed.print0(f"[evaluate] {path.name} does not parse; computing the row again", flush=True)
            return None


def _line(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())


def save_model(d: Path, model: torch.nn.Module) -> None:
    """A trained stage's weights, ``d/model.pt``, written by the main rank."""
    if distributed.is_main():
        save_checkpoint(d / "model.pt", {"model": model.state_dict()})


def param_count(module: torch.nn.Module) -> int:
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
        self.task = tasks.get(config.task, preset=self.s["teacher_preset"])  # its batches follow the teacher's recipe
        torch.manual_seed(config.seed)
        base = {"task": config.task, "seed": config.seed}
        self.stages: dict[str, Stage] = {}
        self.teacher_stage = self.stage("teacher", {**base, "preset": self.s["teacher_preset"], "deq": config.deq,
                                                             "from": self._source_hash("teacher_from"),
                                                             **self._amp_key()})
        self.explicit_stage = self.stage("explicit", {**base, "preset": self.s["teacher_preset"],
                                                               "from": self._source_hash("explicit_from"),
                                                               "steps": self.s["explicit_steps"]})
        traj_payload = {"teacher": self.teacher_stage.key, "traj_amp": self.s["amp"], **{k: self.s[k] for k in TRAJ_KEYS}}
        if self.s["traj_store"] == "online":  # its cache is a target store, whose files differ from a subset one
            traj_payload["cache"] = "target"
        if self.s["traj_from"] is not None:
            traj_payload["from"] = self._store_hash(traj_payload)
        self.traj_stage = self.stage("trajectories", traj_payload)
        self._teacher = None
        self._trajectories = None

    def stage(self, name: str, payload: dict[str, Any], kind: Optional[str] = None) -> Stage:
        """A stage of this run (recorded for the table's provenance)."""
        stage = Stage(self.run_dir, name, payload, kind, commit=self.commit)
        self.stages[name] = stage
        return stage

    def _amp_key(self) -> dict[str, Any]:
        """``amp`` for a stage key, only when set: runs in full precision keep the keys they had."""
        return {} if self.s["amp"] is None else {"amp": self.s["amp"]}

    def config_key(self, config: Any) -> dict[str, Any]:
        """A training config's fields for a stage key (``amp`` only when set, as in :meth:`_amp_key`)."""
        return {k: v for k, v in dataclasses.asdict(config).items() if k != "amp"} | self._amp_key()

    def stage_commits(self) -> dict[str, str]:
        """The commit that computed each finished stage of this run (a reused stage may be older)."""
        return {s.dir.name: s.record().get("commit", "unknown") for s in self.stages.values() if s.done}

    def _source_hash(self, setting: str) -> Optional[str]:
        """The checkpoint hash of a finished run named by ``setting`` (None when unset)."""
        from cdeq.io import sha256_file

        source = self.s[setting]
        if source is None:
            return None
        if not (Path(source) / CHECKPOINT).exists():
            raise FileNotFoundError(f"{setting}: no {CHECKPOINT} in {source} (a finished training run directory)")
        return sha256_file(Path(source) / CHECKPOINT)

    def _store_hash(self, payload: dict[str, Any]) -> str:
        """The identity of the finished trajectory stage named by ``traj_from`` (the hash of the
        SHA-256s its ``done.json`` holds: every manifest, hence every shard); raises unless it was
        sampled with this run's settings (``payload``; its teacher is checked when it is opened)."""
        source = Path(self.s["traj_from"])
        if not (source / "done.json").is_file() or not (source / "cache").is_dir():
            raise FileNotFoundError(f"traj_from: {source} is not a finished trajectory stage "
                                    "(a RUN_DIR/trajectories-KEY directory with done.json and cache/)")
        theirs = json.loads((source / "settings.json").read_text())
        differ = [f"{k}={theirs.get(k)!r} (this run {payload[k]!r})" for k in (*TRAJ_KEYS, "traj_amp")
                  if theirs.get(k) != payload[k]]
        if differ:
            raise ValueError(f"traj_from: {source} was sampled with other settings: {', '.join(differ)}")
        return _key(json.loads((source / "done.json").read_text())["artefacts"])

    def _copy_store(self, source: Path, d: Path) -> None:
        """Copy a finished trajectory stage's cache into stage directory ``d`` (whole, then renamed)."""
        import shutil

        if distributed.is_main():
            tmp = d / ".cache.tmp"
            for stale in (tmp, d / "cache"):  # left by an interrupted or refused copy
                shutil.rmtree(stale, ignore_errors=True)
            shutil.copytree(source / "cache", tmp)
            tmp.replace(d / "cache")
        distributed.barrier()

    def _copy_run(self, source: Path, d: Path) -> dict[str, Any]:
        """Take a finished training run's checkpoints and metrics into a stage directory."""
        import shutil

        if distributed.is_main():
            for name in (CHECKPOINT, BEST, METRICS):
                if (source / name).exists():
                    shutil.copyfile(source / name, d / f".{name}.tmp")
                    (d / f".{name}.tmp").replace(d / name)
        distributed.barrier()
        metrics = json.loads((d / METRICS).read_text())
        return {self.task.metric: metrics["test"][self.task.metric], "from": str(source)}

    def eval_rows(self) -> RowCache:
        """The row cache of this run's evaluation: its key holds the files every finished stage wrote
        (their SHA-256s), so a stage computed again, even under the same key, starts a new cache."""
        reads = ("eval_batch_size", "eval_limit", "time_repeats", "fused_inference", "anderson_m")
        made = {n: _key(s.record().get("artefacts", {})) for n, s in self.stages.items() if s.done}
        return RowCache(self.run_dir, {"stages": made, **{k: self.s[k] for k in reads}})

    # -- shared artefacts -------------------------------------------------------------------------
    def teacher(self) -> torch.nn.Module:
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

    def trajectories(self) -> "Trajectories":
        from cdeq.consistency.sharded import open_trajectories

        if self._trajectories is None:
            self._trajectories = open_trajectories(self.traj_stage.dir / "cache", teacher=self.teacher())
        return self._trajectories

    def storage(self) -> "Storage":
        """How the trajectory stage stores the teacher's states (``online``: inputs and z_K alone, the
        ``target`` store)."""
        from cdeq.consistency.trajectories import Storage

        online = self.s["traj_store"] == "online"
        return Storage("target" if online else self.s["traj_store"], None if online else self.s["traj_keep"],
                       getattr(torch, self.s["traj_dtype"]), self.s["amp"])

    def online_teacher(self) -> Optional["OnlineTeacher"]:
        """The teacher solving each distillation batch when ``traj_store`` is ``online``."""
        from cdeq.consistency import OnlineTeacher

        if self.s["traj_store"] != "online":
            return None
        return OnlineTeacher(self.teacher(), steps=self.s["traj_steps"], solver_options={"m": self.s["anderson_m"]},
                             amp=self.s["amp"])

    def state_loss(self) -> "StateLoss":
        """The task loss at a student's state: the task's loss of the teacher's readout (WikiText-2's
        adaptive softmax computes only the targets' clusters)."""
        teacher = self.teacher()
        return lambda z, y: self.task.readout_loss(teacher, z, y)

    def student_options(self) -> dict[str, Any]:
        """ConsistencyDEQ options of the students and the direct baseline (also their stage keys);
        ``proj_rank`` only when set, so runs with the full W keep the keys they had."""
        rank = self.s["student_proj_rank"]
        return {**{k: self.s[k] for k in TIMEMAP}, "init": self.s["student_init"], **({} if rank is None else {"proj_rank": rank})}

    # -- stages ---------------------------------------------------------------------------------------
    def train_teacher(self) -> dict[str, Any]:
        def fn(d: Path) -> dict[str, Any]:
            if self.s["teacher_from"] is not None:
                summary = self._copy_run(Path(self.s["teacher_from"]), d)
                self.task.load_teacher(d)  # a run of another task or kind is an error here
                return summary
            overrides = {"deq": self.config.deq} if self.config.deq else {}
            if self.s["amp"] is not None:
                overrides["train"] = {"amp": self.s["amp"]}
            metrics = self.task.train_teacher(d, preset=self.s["teacher_preset"], seed=self.config.seed,
                                              device=str(self.device), **overrides)
            return {self.task.metric: metrics["test"][self.task.metric], "params": metrics.get("params", param_count(self.teacher()))}
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

        def _sample(d: Path) -> None:
            from cdeq.consistency.sharded import part_dir, write_parts

            world, rank = distributed.world_size(), distributed.rank()

            def batches() -> Iterator[tuple[int, Any]]:
                every = self.task.batches("train", batch_size=self.s["traj_batch_size"], shuffle=True,
                                          limit=self.s["traj_batches"], seed=self.config.seed)
                return ((x, y) for i, (x, y) in enumerate(every) if i % world == rank)
            items = sum(batch_items(x) for x, _ in batches())  # for the store's size, before any solve
            sample_trajectories(self.teacher(), ((to_device(x, self.device), y) for x, y in batches()),
                                steps=self.s["traj_steps"], solver="anderson", solver_options={"m": self.s["anderson_m"]},
                                p_aug=self.s["p_aug"], cache_dir=part_dir(d / "cache", world, rank),
                                seed=self.config.seed, storage=self.storage(), items=items)
            distributed.barrier()
            if world > 1 and distributed.is_main():
                write_parts(d / "cache", world)
            distributed.barrier()

        def fn(d: Path) -> dict[str, Any]:
            if self.s["traj_from"] is not None:
                self._copy_store(Path(self.s["traj_from"]), d)
            else:
                _sample(d)
            traj = self.trajectories()  # raises if the store's teacher is not this run's
            final = float(torch.cat([traj.residuals(i)[:, -1].float() for i in range(traj.num_shards)]).mean())
            return {"items": len(traj), "K": traj.steps, "final_rel_residual": final}
        return self.traj_stage.run(fn)

    def distill(self, structure: str, name: Optional[str] = None,
                **changes: Any) -> tuple["ConsistencyDEQ", dict[str, Any]]:
        """Distil a C-DEQ student (``structure`` "anderson" or "plain"); returns (student, summary).
        ``changes`` override settings of this student alone (an ablation's grid point)."""
        from cdeq.consistency import ConsistencyDEQ, distill, equilibrium_error

        config = distill_config({**self.s, **{k: v for k, v in changes.items() if k in self.s}}, self.config.seed)
        options = {**self.student_options(), **{k: v for k, v in changes.items() if k in TIMEMAP}}
        stage = self.stage(name or ("cdeq" if structure == "anderson" else "cdeq-plain"),
                      {"trajectories": self.traj_stage.key, "structure": structure, **options,
                       **self.config_key(config)}, kind="student")
        teacher = self.teacher()
        torch.manual_seed(self.config.seed)  # the stage's model does not depend on what ran before it
        student = ConsistencyDEQ(teacher, structure=structure, **student_kwargs(options)).to(self.device)

        def fn(d: Path) -> dict[str, Any]:
            distill(student, self.trajectories(), config, run_dir=d, device=self.device, online=self.online_teacher(),
                    state_loss=self.state_loss())
            save_model(d, student)
            err = equilibrium_error(student.state, self.trajectories(), (1, 2, 4), max_items=512, device=self.device)
            return {f"err@{k}": float(v) for k, v in err.items()}
        summary = stage.run(fn)
        student.load_state_dict(load_checkpoint(stage.dir / "model.pt", map_location=self.device)["model"])
        return student.eval(), summary

    def train_hyperdeq(self) -> tuple["HyperDEQ", dict[str, Any]]:
        from cdeq.baselines import HyperDEQ, train_hyperdeq
        from cdeq.consistency import HyperDEQConfig

        config = HyperDEQConfig(steps=self.s["hyper_steps"], batch_size=self.s["distill_batch_size"],
                                seed=self.config.seed, amp=self.s["amp"])
        stage = self.stage("hyperdeq", {"trajectories": self.traj_stage.key, "m": self.s["anderson_m"],
                                                 **self.config_key(config)})
        teacher = self.teacher()
        torch.manual_seed(self.config.seed)
        hyper = HyperDEQ(teacher, m=self.s["anderson_m"]).to(self.device)

        def fn(d: Path) -> dict[str, Any]:
            history = train_hyperdeq(hyper, self.trajectories(), config, run_dir=d, device=self.device)
            save_model(d, hyper)
            return {"loss": float(history[-1]["loss"])} if history else {}
        summary = stage.run(fn)
        hyper.load_state_dict(load_checkpoint(stage.dir / "model.pt", map_location=self.device)["model"])
        return hyper.eval(), summary

    def train_direct(self, nfe: int) -> tuple["ConsistencyDEQ", dict[str, Any]]:
        from cdeq.baselines import train_direct
        from cdeq.consistency import ConsistencyDEQ, DirectConfig

        config = DirectConfig(steps=self.s["direct_steps"], lr=self.s["distill_lr"], nfe=nfe,
                              batch_size=self.s["distill_batch_size"], seed=self.config.seed, amp=self.s["amp"])
        stage = self.stage(f"direct-J{nfe}", {"trajectories": self.traj_stage.key, **self.student_options(),
                                                       **self.config_key(config)}, kind="direct")
        teacher = self.teacher()
        torch.manual_seed(self.config.seed)
        model = ConsistencyDEQ(teacher, structure="anderson", **student_kwargs(self.student_options())).to(self.device)

        def fn(d: Path) -> dict[str, Any]:
            history = train_direct(model, self.trajectories(), config, run_dir=d, device=self.device,
                                   state_loss=self.state_loss())
            save_model(d, model)
            return {"loss": float(history[-1]["loss"])} if history else {}
        summary = stage.run(fn)
        model.load_state_dict(load_checkpoint(stage.dir / "model.pt", map_location=self.device)["model"])
        return model.eval(), summary
