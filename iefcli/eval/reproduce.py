"""`ief reproduce`: the paper's claims, measured offline, in one report directory.

OUT/
  REPORT.md            claims beside their numbers and a verdict; tables; figures; versions; machine
  results.json         the same numbers, machine-readable
  reproduce.json       marker + the plan (mode, tasks, seeds, steps); OUT is resumable
  runs/<task>/<opt>-seed<k>/   one ordinary run directory per training run (reused when finished)
  gamma/<run>/gamma.json       eval-gamma documents per stage (reused while the run is unchanged)
  *.png                figures (house style of iefcli.eval.figures)

Sections: optimisation (the paper's Table 2 layout: SGD, AdamW, Adafactor, EF, SF, iEF per task,
final train loss and test metric at the best-validation checkpoint, mean +- std over seeds),
approximation quality (eval-gamma over stages and dampings for SGD, EF, SF, iEF and NG), and
the Figure 1 toy (demo and the toy-lsq recipe on the same data).

Every call into training, eval-gamma, figures and the toy goes through
:mod:`iefcli.eval.reproduce_adapters`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from iefcli.errors import IEFError, UsageError
from iefcli.eval import reproduce_adapters as A
from iefcli.eval.seeds import format_mean_std, mean_std

OPTIMIZERS = ("sgd", "adamw", "adafactor", "ef", "sf", "ief")
"""The paper's Table 2 optimisers, in its order of columns."""

OPT_LABEL = {"sgd": "SGD", "adamw": "AdamW", "adafactor": "Adafactor", "ef": "EF", "sf": "SF", "ief": "iEF", "ngd": "NG"}

ALL_TASKS = ("toy", "digits", "fmnist", "minilm-lora", "minilm-prompt", "vit", "gamma")
QUICK_TASKS = ("toy", "digits", "fmnist", "gamma")
MARKER = "reproduce.json"
HOLDS, FAILS = "holds", "does not hold here"


@dataclass(frozen=True)
class OptTask:
    """One optimisation task: which recipe trains optimiser ``opt`` on it.

    ``recipe`` ('digits-{opt}') when the project has a tuned recipe for that optimiser;
    otherwise ``base`` with the optimiser section of ``donor.format(opt)`` (the nearest
    task with a tuned recipe for it). ``quick``: extra overrides in --quick mode.
    """

    key: str
    title: str
    recipe: str | None
    base: str
    base_quick: str | None = None
    donor: str | None = None
    quick: tuple[str, ...] = ()
    pretrain: str | None = None  # a run every seed starts from (model.base_checkpoint)


OPT_TASKS: dict[str, OptTask] = {
    "digits": OptTask("digits", "MLP, digits", "digits-{opt}", base="digits-ief"),
    "fmnist": OptTask("fmnist", "MLP, Fashion-MNIST", None, base="fmnist-mlp-gpu", base_quick="fmnist-mlp-cpu",
                      donor="digits-{opt}",
                      quick=("data.n_train=4000", "data.n_val=1000", "data.n_test=2000", "train.steps=150",
                             "train.eval_every=50", "train.checkpoint_every=150")),
    "minilm-lora": OptTask("minilm-lora", "MiniLM+LoRA, Rotten Tomatoes", "minilm-lora-{opt}", base="minilm-lora-ief"),
    "minilm-prompt": OptTask("minilm-prompt", "MiniLM+prompt, Rotten Tomatoes", "minilm-prompt-{opt}",
                             base="minilm-prompt-ief"),
    "vit": OptTask("vit", "ViT+LoRA transfer, MNIST-5k", "image-vit-mnist5k-lora-{opt}", base="image-vit-mnist5k-lora-ief",
                   donor="minilm-lora-{opt}", pretrain="image-vit-fmnist-pretrain"),
}


@dataclass(frozen=True)
class GammaSettings:
    methods: tuple[str, ...] = ("sgd", "ef", "sf", "ief", "ngd")
    dampings: tuple[float, ...] = (1e-12, 1e-8, 1e-4, 1.0)
    n_batches: int = 2
    batch_size: int = 160
    ngd_maxiter: int = 200
    steps: int = 80  # training steps of the run whose checkpoints are the stages
    stages: int = 4


QUICK_GAMMA = GammaSettings(dampings=(1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0), n_batches=4, steps=120)
FULL_GAMMA = GammaSettings(dampings=(1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0), n_batches=10, ngd_maxiter=500, steps=0)

SMALL_DAMPING = 1e-7
"""The paper's 'near-zero damping' range is 1e-12 .. 1e-7 (its scale; see :func:`_small_damping_max`)."""


@dataclass
class Plan:
    out: Path
    quick: bool
    tasks: tuple[str, ...]
    seeds: int
    steps: int | None
    device: str | None
    gamma: GammaSettings
    toy_starts: int = 2

    def as_json(self) -> dict:
        return {"quick": self.quick, "tasks": list(self.tasks), "seeds": self.seeds, "steps": self.steps,
                "device": self.device, "gamma": self.gamma.__dict__, "toy_starts": self.toy_starts}


@dataclass
class RunRecord:
    task: str
    opt: str
    seed: int
    run_dir: Path
    action: str  # trained | resumed | reused | failed
    summary: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Claim:
    section: str
    claim: str
    measured: str
    verdict: str  # HOLDS | FAILS


@dataclass
class ReproduceResult:
    out: Path
    report: Path
    claims: list[Claim]
    runs: list[RunRecord]
    wall_time_s: float


Log = Callable[[str], None]


# ----------------------------------------------------------------------------- entry point


def parse_tasks(text: str | None, quick: bool) -> tuple[str, ...]:
    if text is None or not text.strip():
        return QUICK_TASKS if quick else ALL_TASKS
    tasks = []
    for t in text.split(","):
        t = t.strip().lower()
        if t not in ALL_TASKS:
            raise UsageError(f"--tasks: unknown task {t!r}; choose from {', '.join(ALL_TASKS)}")
        if t not in tasks:
            tasks.append(t)
    return tuple(tasks)


def reproduce(
    *,
    out: Path | str,
    quick: bool = False,
    tasks: Sequence[str] | str | None = None,
    seeds: int = 3,
    steps: int | None = None,
    device: str | None = None,
    gamma: GammaSettings | None = None,
    log: Log | None = None,
) -> ReproduceResult:
    """Run (or resume) every selected experiment into ``out`` and write REPORT.md.

    A finished sub-run (run directory with summary.json and the same resolved recipe) is
    reused; one with checkpoints is resumed; anything else is trained afresh. Raises
    UsageError for bad options or an ``out`` that is not a reproduce directory.
    """
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    task_list = parse_tasks(tasks, quick) if tasks is None or isinstance(tasks, str) else parse_tasks(",".join(tasks), quick)
    g = gamma or (QUICK_GAMMA if quick else FULL_GAMMA)
    plan = Plan(out=Path(out), quick=quick, tasks=task_list, seeds=seeds, steps=steps, device=device, gamma=g)
    _prepare_out(plan)

    runs: list[RunRecord] = []
    sections: dict[str, Any] = {}
    for key in [t for t in task_list if t in OPT_TASKS]:
        sections.setdefault("optimisation", {})[key] = _optimisation_task(plan, OPT_TASKS[key], runs, say)
    if "gamma" in task_list:
        sections["gamma"] = _gamma_section(plan, runs, say)
    if "toy" in task_list:
        sections["toy"] = _toy_section(plan, runs, say)

    claims: list[Claim] = []
    if "optimisation" in sections:
        claims += optimisation_claims(sections["optimisation"])
    if "gamma" in sections:
        claims += gamma_claims(sections["gamma"])
    if "toy" in sections:
        claims += sections["toy"]["claims"]
    figures = _figures(plan, sections)
    wall = time.perf_counter() - t0
    report = _write_report(plan, sections, claims, runs, figures, wall)
    say(f"wrote {report} ({len(claims)} claims, {sum(c.verdict == HOLDS for c in claims)} hold) in {wall:.0f} s")
    return ReproduceResult(out=plan.out, report=report, claims=claims, runs=runs, wall_time_s=wall)


def _prepare_out(plan: Plan) -> None:
    from iefcli.train.rundir import atomic_write_json

    out = plan.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UsageError(f"--out {out}: not empty and not a reproduce directory (no {MARKER}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"plan": plan.as_json()})


# ----------------------------------------------------------------------------- runs


def _ensure_run(recipe, run_dir: Path, rec: RunRecord, device: str | None, say: Log) -> RunRecord:
    """Reuse a finished run of the same recipe, resume a started one, else train."""
    stored = A.stored_recipe(run_dir)
    same = stored is not None and _plain(stored) == _plain(dict(recipe))
    summary = A.read_summary(run_dir) if same else None
    t = time.perf_counter()
    try:
        if summary is not None:
            rec.action, rec.summary = "reused", summary
        elif same and A.has_checkpoint(run_dir):
            rec.action, rec.summary = "resumed", A.train_run(recipe, run_dir, resume=True, device=device)
        else:
            rec.action, rec.summary = "trained", A.train_run(recipe, run_dir, resume=False, device=device)
    except IEFError as e:  # a diverged run is a result, not a crash of the whole report
        rec.action, rec.error = "failed", str(e)
        rec.summary = A.read_summary(run_dir) or {}
    say(f"{rec.task} {rec.opt} seed {rec.seed}: {rec.action}"
        + (f" ({time.perf_counter() - t:.1f} s)" if rec.action != "reused" else "")
        + (f": {rec.error}" if rec.error else ""))
    return rec


def _plain(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _recipe_for(plan: Plan, task: OptTask, opt: str, seed: int, extra: Sequence[str] = ()):
    name = task.recipe.format(opt=opt) if task.recipe else None
    donor = None
    if name is None or not A.recipe_exists(name):
        name = task.base_quick if (plan.quick and task.base_quick) else task.base
        donor = task.donor.format(opt=opt) if task.donor else None
        if A.load_recipe(name)["optimizer"]["name"] == opt:  # the task's own recipe is tuned for it
            donor = None
        elif donor is None or not A.recipe_exists(donor):
            raise UsageError(f"{task.key}: no recipe for optimiser {opt} (and no sibling task to borrow one from)")
    sets = [f"seed={seed}", *(task.quick if plan.quick else ()), *extra]
    if plan.device:
        sets.append(f"device={plan.device}")
    r0 = A.load_recipe(name, sets, optimizer_from=donor)
    if plan.steps is not None:
        n = plan.steps
        sets += [f"train.steps={n}", f"train.eval_every={max(1, n // 3)}", f"train.checkpoint_every={n}",
                 f"train.log_every={max(1, min(r0['train']['log_every'], n // 5 or 1))}",
                 f"schedule.warmup_steps={min(r0['schedule']['warmup_steps'], n // 10)}"]
        r0 = A.load_recipe(name, sets, optimizer_from=donor)
    return r0, name, donor


def _optimisation_task(plan: Plan, task: OptTask, runs: list[RunRecord], say: Log) -> dict:
    base_dir = plan.out / "runs" / task.key
    extra: list[str] = []
    if task.pretrain is not None:
        pre = _pretrain(plan, task, runs, say)
        extra.append(f"model.base_checkpoint={pre.resolve()}")
    per_opt: dict[str, dict] = {}
    metric, mode = None, "max"
    for opt in OPTIMIZERS:
        recs, source = [], None
        for seed in range(plan.seeds):
            recipe, name, donor = _recipe_for(plan, task, opt, seed, extra)
            source = name + (f" + optimizer of {donor}" if donor else "")
            rec = RunRecord(task.key, opt, seed, base_dir / f"{opt}-seed{seed}", "")
            runs.append(_ensure_run(recipe, rec.run_dir, rec, plan.device, say))
            recs.append(rec)
            metric = metric or rec.summary.get("metric")
            mode = rec.summary.get("metric_mode") or mode
        tl = mean_std(r.summary.get("final_train_loss") for r in recs)
        tm = mean_std(r.summary.get("test_metric") for r in recs)
        per_opt[opt] = {
            "recipe": source, "lr": recs[0].summary.get("lr"), "damping": recs[0].summary.get("damping"),
            "train_loss": tl[:2], "test_metric": tm[:2], "n": tl[2], "n_test": tm[2],
            "failed": sum(r.action == "failed" or r.summary.get("status") not in (None, "completed") for r in recs),
            "run_dirs": [str(r.run_dir) for r in recs],
        }
    return {"title": task.title, "metric": metric or "?", "mode": mode, "optimizers": per_opt}


def _pretrain(plan: Plan, task: OptTask, runs: list[RunRecord], say: Log) -> Path:
    sets = ["seed=0"]
    if plan.device:
        sets.append(f"device={plan.device}")
    if plan.steps is not None:
        n = plan.steps
        sets += [f"train.steps={n}", f"train.eval_every={n}", f"train.checkpoint_every={n}", "schedule.warmup_steps=0"]
    recipe = A.load_recipe(task.pretrain, sets)
    rec = RunRecord(task.key, "pretrain", 0, plan.out / "runs" / task.key / "pretrain", "")
    runs.append(_ensure_run(recipe, rec.run_dir, rec, plan.device, say))
    if rec.action == "failed":
        raise UsageError(f"{task.key}: the pretraining run failed ({rec.error})")
    return rec.run_dir


# ----------------------------------------------------------------------------- gamma


def _gamma_section(plan: Plan, runs: list[RunRecord], say: Log) -> dict:
    g = plan.gamma
    sources = [("digits", "digits-ief", ())]
    if not plan.quick:
        sources.append(("fmnist", "fmnist-mlp-cpu", ()))
    out: dict[str, Any] = {"settings": g.__dict__, "runs": {}, "small_damping_max": _small_damping_max(g.batch_size)}
    for key, recipe_name, sets in sources:
        sets = ["seed=0", *sets] + ([f"device={plan.device}"] if plan.device else [])
        r0 = A.load_recipe(recipe_name, sets)
        total = plan.steps or g.steps or A.total_steps(r0)  # g.steps 0: the recipe's own length
        every = max(1, total // g.stages)
        sets += [f"train.steps={total}", f"train.checkpoint_every={every}", f"train.eval_every={every}",
                 f"train.log_every={max(1, min(10, every))}"]
        recipe = A.load_recipe(recipe_name, sets)
        rec = RunRecord("gamma", "ief", 0, plan.out / "runs" / "gamma" / key, "")
        runs.append(_ensure_run(recipe, rec.run_dir, rec, plan.device, say))
        params = {"methods": list(g.methods), "dampings": list(g.dampings), "n_batches": g.n_batches,
                  "batch_size": g.batch_size, "ngd_maxiter": g.ngd_maxiter, "summary": _plain(rec.summary)}
        cache = plan.out / "gamma" / key / "gamma.json"
        docs = None
        if cache.is_file():
            try:
                saved = json.loads(cache.read_text(encoding="utf-8"))
                if saved.get("params") == _plain(params):
                    docs = saved["docs"]
                    say(f"gamma {key}: reused")
            except (OSError, ValueError, KeyError):
                docs = None
        if docs is None:
            t = time.perf_counter()
            docs = A.gamma_stages(rec.run_dir, methods=g.methods, dampings=g.dampings, n_batches=g.n_batches,
                                  batch_size=g.batch_size, ngd_maxiter=g.ngd_maxiter, device=plan.device)
            from iefcli.train.rundir import atomic_write_json

            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, {"params": params, "docs": docs})
            say(f"gamma {key}: {len(docs)} stages in {time.perf_counter() - t:.1f} s")
        out["runs"][key] = {"docs": docs, "run_dir": str(rec.run_dir)}
    return out


def _small_damping_max(batch_size: int) -> float:
    """The largest 'small' damping: the paper's 1e-7, times N^2 on the internal scale (N = eval batch)."""
    return SMALL_DAMPING if A.damping_scale() == "paper" else SMALL_DAMPING * batch_size**2


def _cells(docs: list[dict]) -> list[tuple[int, float, dict[str, float]]]:
    """(step, damping, {method: median gamma ratio}) for every stage x damping."""
    cells = []
    for d in docs:
        by = {(r["method"], r["damping"]): r for r in d["results"]}
        for lam in d["dampings"]:
            vals = {m: by[(m, lam)].get("gamma_ratio_median") for m in d["methods"] if (m, lam) in by}
            cells.append((d["step"], lam, {m: v for m, v in vals.items() if isinstance(v, (int, float)) and math.isfinite(v)}))
    return cells


def gamma_claims(section: dict) -> list[Claim]:
    claims = []
    for key, res in section["runs"].items():
        docs = res["docs"]
        cells = _cells(docs)
        sec = f"approximation ({key})"
        three = [c for c in cells if all(m in c[2] for m in ("ef", "sf", "ief"))]
        if three:
            best = sum(c[2]["ief"] <= min(c[2]["ef"], c[2]["sf"]) for c in three)
            claims.append(Claim(sec, "iEF has the lowest gamma ratio of EF, SF, iEF at almost every stage and damping (>= 80% of cells)",
                                f"lowest in {best} of {len(three)} (stage, damping) cells", _v(best >= 0.8 * len(three))))
            between = sum(c[2]["ief"] <= c[2]["sf"] <= c[2]["ef"] for c in three)
            claims.append(Claim(sec, "SF sits between iEF and EF (in >= half of the cells)",
                                f"iEF <= SF <= EF in {between} of {len(three)} cells", _v(2 * between >= len(three))))
        ef = [c for c in cells if "ef" in c[2]]
        if ef:
            worse = sum(c[2]["ef"] > 1 for c in ef)
            claims.append(Claim(sec, "EF is often worse than SGD (ratio > 1 in >= half of the cells)",
                                f"EF ratio > 1 in {worse} of {len(ef)} cells (median over cells "
                                f"{_median([c[2]['ef'] for c in ef]):.3g})", _v(2 * worse >= len(ef))))
        small_max = section.get("small_damping_max", SMALL_DAMPING)
        small = [lam for lam in docs[0]["dampings"] if lam <= small_max]
        if len(small) > 1 and all(m in docs[0]["methods"] for m in ("ef", "sf", "ief")):
            rng = {"ief": [], "ef": [], "sf": []}
            for d in docs:
                by = {(r["method"], r["damping"]): r.get("gamma_ratio_median") for r in d["results"]}
                for m in rng:  # iEF over the small dampings only; EF and SF over the whole sweep
                    v = [by.get((m, lam)) for lam in (small if m == "ief" else d["dampings"])]
                    v = [x for x in v if isinstance(x, (int, float)) and math.isfinite(x) and x > 0]
                    rng[m].append(max(v) / min(v) if v else float("nan"))
            flat = all(x <= 1.1 for x in rng["ief"]) and any(max(b, c) > 1.1 for b, c in zip(rng["ef"], rng["sf"]))
            claims.append(Claim(sec, f"iEF is flat across small dampings (max/min of its ratio over lambda <= {small_max:g} at most "
                                "1.1 at every stage) while EF and SF need tuning (their max/min over the sweep above 1.1 somewhere)",
                                f"max/min per stage: iEF (lambda <= {small_max:g}) " + ", ".join(f"{x:.3g}" for x in rng["ief"])
                                + "; over the sweep: " + "; ".join(
                                    f"{OPT_LABEL[m]} {', '.join(f'{x:.3g}' for x in rng[m])}" for m in ("ef", "sf")), _v(flat)))
        imb = [d["imbalance"].get("grad_norm_top10_bottom10") for d in docs]
        if len(docs) > 1 and all(isinstance(x, (int, float)) for x in imb):
            claims.append(Claim(sec, "per-sample gradient-norm imbalance grows as training converges (last stage > first)",
                                "top10%/bottom10% grad-norm ratio by stage: " + ", ".join(
                                    f"step {d['step']}: {x:.3g}" for d, x in zip(docs, imb)), _v(imb[-1] > imb[0])))
        ng = [c for c in cells if "ngd" in c[2]]
        if ng:
            # gamma is minimised by the UNDAMPED natural gradient: NG at the sweep's smallest damping
            # (the exact dual solve) against every method at every damping of the same stage.
            lam0 = min(c[1] for c in ng)
            stages = sorted({c[0] for c in ng})
            ok = 0
            for st in stages:
                exact = next(c[2]["ngd"] for c in ng if c[0] == st and c[1] == lam0)
                ok += exact <= min(v for c in cells if c[0] == st for v in c[2].values()) * (1 + 1e-6)
            cg = [d.get("ngd_cg", {}) for d in docs]
            conv = all(x.get("all_converged", True) for x in cg)
            claims.append(Claim(sec, f"exact NG (damping {lam0:g}) has the smallest gamma of every method and damping "
                                "(gamma is minimised by the natural gradient)",
                                f"NG lowest at {ok} of {len(stages)} stages; NG solve converged at every stage: "
                                f"{'yes' if conv else 'no'}", _v(ok == len(stages))))
    return claims


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float("nan") if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def _v(ok: bool) -> str:
    return HOLDS if ok else FAILS


# ----------------------------------------------------------------------------- optimisation claims


def _rank_key(mode: str):
    return (lambda v: -v) if mode == "max" else (lambda v: v)


def optimisation_claims(tasks: dict[str, dict]) -> list[Claim]:
    claims: list[Claim] = []
    lowest, ranks = 0, {o: [] for o in OPTIMIZERS}
    counted = 0
    for key, t in tasks.items():
        ops = t["optimizers"]
        loss = {o: ops[o]["train_loss"][0] for o in OPTIMIZERS if ops[o]["train_loss"][0] is not None}
        if "ief" in loss and len(loss) > 1:
            counted += 1
            best = min(loss, key=loss.get)
            other = min((o for o in loss if o != "ief"), key=loss.get)
            ok = best == "ief"
            lowest += ok
            claims.append(Claim(f"optimisation ({key})", "iEF reaches the lowest final training loss",
                                f"iEF {format_mean_std(*ops['ief']['train_loss'])}; best other {OPT_LABEL[other]} "
                                f"{format_mean_std(*ops[other]['train_loss'])}", _v(ok)))
        test = {o: ops[o]["test_metric"][0] for o in OPTIMIZERS if ops[o]["test_metric"][0] is not None}
        if len(test) == len(OPTIMIZERS):
            order = sorted(test, key=lambda o: _rank_key(t["mode"])(test[o]))
            for i, o in enumerate(order):
                ranks[o].append(i + 1)
        if "ef" in loss and "ief" in loss:
            claims.append(Claim(f"optimisation ({key})", "EF trains worse than iEF (higher final training loss)",
                                f"EF {format_mean_std(*ops['ef']['train_loss'])} vs iEF {format_mean_std(*ops['ief']['train_loss'])}",
                                _v(loss["ef"] > loss["ief"])))
    if counted > 1:
        claims.append(Claim("optimisation (all)", "iEF reaches the lowest training loss on most tasks",
                            f"lowest on {lowest} of {counted} tasks", _v(2 * lowest > counted)))
    if ranks["ief"]:
        avg = {o: sum(r) / len(r) for o, r in ranks.items() if r}
        best = min(avg, key=avg.get)
        claims.append(Claim("optimisation (all)", "iEF has the best average test metric (average rank over tasks, 1 = best)",
                            "average rank: " + ", ".join(f"{OPT_LABEL[o]} {avg[o]:.2f}" for o in OPTIMIZERS if o in avg),
                            _v(avg["ief"] <= avg[best])))
    return claims


# ----------------------------------------------------------------------------- the toy


def _toy_section(plan: Plan, runs: list[RunRecord], say: Log) -> dict:
    import torch

    steps = plan.steps
    res = A.toy_result(steps)
    s = res.settings
    k = s.steps
    problem = res.problem
    x = [float(v) for v in problem.inputs.reshape(-1)]
    y = [float(v) for v in problem.targets.reshape(-1)]
    final = {m: float(res.final_loss[m].mean()) for m in res.final_loss}
    gaps: dict[str, float] = {}
    sens: dict[str, float] = {}
    p32 = A.toy_problem_as_float32(problem)  # exactly the data the recipe trains on
    for m in ("sgd", "ief", "ef"):
        worst = 0.0
        sens[m] = max(_rel(A.toy_endpoint(p32, st, m, s.lr[m], s.damping[m], k), res.trajectories[m][i][-1])
                      for i, st in enumerate(s.starts))
        for i, start in enumerate(s.starts[: plan.toy_starts]):
            sets = [f"data.x={x}", f"data.y={y}", f"model.init={[float(v) for v in start]}", f"optimizer.name={m}",
                    f"optimizer.lr={s.lr[m]}", f"optimizer.damping={s.damping[m] if m != 'sgd' else 'null'}",
                    "optimizer.dup_threshold=null", "optimizer.momentum=0.0", f"train.steps={k}",
                    f"train.checkpoint_every={k}", f"train.eval_every={k}", "train.log_every=1"]
            recipe = A.load_recipe("toy-lsq", sets)
            rec = RunRecord("toy", m, i, plan.out / "runs" / "toy" / f"{m}-start{i}", "")
            runs.append(_ensure_run(recipe, rec.run_dir, rec, "cpu", say))
            if rec.action == "failed":
                worst = float("inf")
                continue
            theta = next(iter(A.last_checkpoint_params(rec.run_dir).values())).reshape(-1).to(torch.float64)
            worst = max(worst, _rel(theta, A.toy_endpoint(p32, start, m, s.lr[m], s.damping[m], k)))
        gaps[m] = worst
    same_lr = s.lr["ef"] == s.lr["ief"] == s.lr["ngd"]
    lr_note = ((f"EF, iEF and NGD at one shared lr ({s.lr['ief']:g}; the demo's, not tuned per method)" if same_lr else
                "each method at the demo's own lr for it (" + ", ".join(f"{OPT_LABEL[m]} {s.lr[m]:g}" for m in ("ef", "ief", "ngd"))
                + "), not one shared lr")
               + f", SGD at its own lr ({s.lr['sgd']:g}); dampings: "
               + ", ".join(f"{OPT_LABEL[m]} {s.damping[m]:g}" for m in ("ef", "ief", "ngd")))
    claims = [
        Claim("toy (Figure 1)", "iEF and NGD give the same update on the 2-parameter least-squares toy",
              f"largest relative difference along iEF's paths {res.ief_ngd_gap:.1e} (iEF at damping "
              f"{s.damping['ief']:g}, NGD at {s.damping['ngd']:g}; threshold 1e-4)", _v(res.ief_ngd_gap <= 1e-4)),
        Claim("toy (Figure 1)", "EF's distorted field makes it converge worse than iEF"
              + (" at the same lr" if same_lr else f" (lr: EF {s.lr['ef']:g}, iEF {s.lr['ief']:g})"),
              f"mean loss after {k} steps over {len(s.starts)} starts: EF {final['ef']:.3e}, iEF {final['ief']:.3e}, "
              f"NGD {final['ngd']:.3e}, SGD {final['sgd']:.3e}", _v(final["ef"] > final["ief"])),
        Claim("toy (Figure 1)", "the toy-lsq recipe, trained by `ief train` on the demo's data, follows the demo's trajectories",
              "largest relative distance of the final theta to the demo's on the same (float32-rounded) data, first "
              f"{min(plan.toy_starts, len(s.starts))} starts: " + ", ".join(f"{OPT_LABEL[m]} {v:.1e}" for m, v in gaps.items())
              + "; for scale, rounding the demo's data to float32 moves its endpoints by "
              + ", ".join(f"{OPT_LABEL[m]} {v:.1e}" for m, v in sens.items()) + " (EF's map is unstable near the optimal lines)",
              _v(all(v <= 1e-6 for v in gaps.values()))),
    ]
    return {"result": res, "final": final, "gaps": gaps, "sensitivity": sens, "lr_note": lr_note, "steps": k, "claims": claims,
            "data": {"x": x, "y": y}}


# ----------------------------------------------------------------------------- figures


def _figures(plan: Plan, sections: dict) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}
    for key, t in sections.get("optimisation", {}).items():
        name = f"optimisation_{key}.png"
        A.save_png(_loss_figure(t), plan.out / name)
        made.setdefault("optimisation", []).append(name)
    for key, res in sections.get("gamma", {}).get("runs", {}).items():
        for fname, fig in A.gamma_figures(res["docs"]).items():
            name = f"{key}_{fname}"
            A.save_png(fig, plan.out / name)
            made.setdefault("gamma", []).append(name)
    if "toy" in sections:
        A.save_png(A.toy_figure(sections["toy"]["result"]), plan.out / "toy.png")
        made["toy"] = ["toy.png"]
    return made


def _loss_figure(t: dict):
    """Mean training loss over seeds vs step, one line per optimiser (spread shaded)."""
    import numpy as np

    with A.style_context():
        fig = A.new_figure(7.0, 4.2)
        ax = fig.add_subplot()
        for opt in OPTIMIZERS:
            curves = [A.train_curve(Path(d)) for d in t["optimizers"][opt]["run_dirs"] if Path(d).is_dir()]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            steps = sorted(set.intersection(*[set(c[0]) for c in curves]))
            if not steps:
                continue
            ys = np.array([[dict(zip(*c))[s] for s in steps] for c in curves])
            colour, ls = A.method_style(opt)
            m = ys.mean(0)
            ax.plot(steps, m, color=colour, ls=ls, label=OPT_LABEL[opt])
            if len(curves) > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=colour, alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds; range shaded)")
        ax.set_title(t["title"])
        ax.grid(True, alpha=0.3)
        ax.legend(ncol=3)
    return fig


# ----------------------------------------------------------------------------- the report


def environment() -> dict[str, Any]:
    """Versions and the machine, recorded in the report."""
    from importlib import metadata

    import torch

    vers = {}
    for pkg in ("iefcli", "torch", "numpy", "transformers", "peft", "scikit-learn", "matplotlib", "typer"):
        try:
            vers[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            vers[pkg] = None
    import iefcli

    vers["iefcli (imported)"] = getattr(iefcli, "__version__", None)
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": vers,
        "iefcli_path": str(Path(iefcli.__file__).parent),
        "git_commit": _git_commit(Path(iefcli.__file__).parent),
        "damping_scale": A.damping_scale(),
    }
    return env


def _git_commit(where: Path) -> str | None:
    import subprocess

    try:
        r = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _nums(xs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:g}" for x in xs) + "]"


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _write_report(plan: Plan, sections: dict, claims: list[Claim], runs: list[RunRecord], figures: dict, wall: float) -> Path:
    from iefcli.train.rundir import atomic_write_json, atomic_write_text

    env = environment()
    L: list[str] = []
    mode = "quick (CPU-sized)" if plan.quick else "full (sized for a GPU)"
    L += ["# iefcli: the paper's claims, reproduced offline", "",
          f"Mode: **{mode}**; tasks: {', '.join(plan.tasks)}; seeds: {plan.seeds} (0..{plan.seeds - 1})"
          + (f"; steps per run: {plan.steps}" if plan.steps else "; steps: the recipes'" + (" (--quick: shortened)" if plan.quick else ""))
          + f"; wall time {wall:.0f} s; runs trained {sum(r.action == 'trained' for r in runs)}, resumed "
          f"{sum(r.action == 'resumed' for r in runs)}, reused {sum(r.action == 'reused' for r in runs)}, "
          f"failed {sum(r.action == 'failed' for r in runs)}.", "",
          "Source: Wu et al., *An Improved Empirical Fisher Approximation for Natural Gradient Descent*, NeurIPS 2024. "
          "These are offline stand-ins for the paper's tasks (no GLUE, CIFAR or pretrained T5/ViT here), smaller and "
          "shorter: a verdict says whether the claim holds **on this run**, not whether the paper is right.", "",
          f"Damping and learning rates are on the **{env['damping_scale']}** scale of this iefcli version "
          + ("(the paper's: type the authors' values unchanged)." if env["damping_scale"] == "paper"
             else "(damping added to J J^T of unscaled per-sample gradients: N^2 times the authors'). "
                  "No claim below depends on the scale (gamma is scale-free; the runs use each recipe's settings)."), ""]
    L += ["## Claims", "", "| section | claim | measured | verdict |", "|---|---|---|---|"]
    for c in claims:
        L.append(f"| {c.section} | {c.claim} | {c.measured} | **{c.verdict}** |")
    not_run = [t for t in ALL_TASKS if t not in plan.tasks]
    if not_run:
        L += ["", f"Not run here (select with `--tasks`): {', '.join(not_run)}."]
    L.append("")

    if "optimisation" in sections:
        opt = sections["optimisation"]
        L += ["## 1. Optimisation (the paper's Table 2 layout)", "",
              f"Mean ± sample std over {plan.seeds} seed(s). Test metric at the best-validation checkpoint. "
              "Each optimiser uses its tuned recipe for the task; where the project has none, the task's base recipe "
              "with the optimiser section of the nearest task that has one (listed below).", ""]
        for what, key, spec in (("Final training loss (lower is better)", "train_loss", ".4g"),
                                ("Test metric at the best-validation checkpoint", "test_metric", ".4f")):
            L += [f"**{what}**", "", "| optimiser | " + " | ".join(f"{t['title']} ({t['metric'] if key == 'test_metric' else 'loss'})" for t in opt.values()) + " |",
                  "|---|" + "---|" * len(opt)]
            for o in OPTIMIZERS:
                cells = []
                for t in opt.values():
                    m, s = t["optimizers"][o][key]
                    cell = format_mean_std(m, s, spec)
                    if t["optimizers"][o]["failed"]:
                        cell += f" ({t['optimizers'][o]['failed']} failed)"
                    cells.append(cell)
                L.append(f"| {OPT_LABEL[o]} | " + " | ".join(cells) + " |")
            L.append("")
        L += ["Recipes, learning rates and dampings:", ""]
        for key, t in opt.items():
            L.append(f"- {key}: " + "; ".join(f"{OPT_LABEL[o]}: {v['recipe']} (lr {_fmt(v['lr'], 'g')}"
                                               + (f", damping {_fmt(v['damping'], 'g')}" if v["damping"] is not None else "") + ")"
                                               for o, v in t["optimizers"].items()))
        L.append("")
        L += [f"![training loss, {k}]({n})" for k, n in zip(opt, figures.get("optimisation", []))] + [""]

    if "gamma" in sections:
        gs = sections["gamma"]
        st = gs["settings"]
        L += ["## 2. Approximation quality (eval-gamma)", "",
              f"gamma(d) = sqrt(d^T G d) / (d^T g), relative to SGD (below 1: closer to the natural gradient than SGD). "
              f"{st['n_batches']} batch(es) of {st['batch_size']} per stage, median over batches; SF with 1 label draw; "
              f"NG = exact natural gradient (solve budget {st['ngd_maxiter']}).", ""]
        for key, res in gs["runs"].items():
            docs = res["docs"]
            last = docs[-1]
            by = {(r["method"], r["damping"]): r for r in last["results"]}
            L += [f"**{key}**: run `{res['run_dir']}`, stages at steps {', '.join(str(d['step']) for d in docs)}. "
                  f"Median gamma ratio at the last stage (step {last['step']}):", "",
                  "| damping | " + " | ".join(OPT_LABEL.get(m, m) for m in last["methods"]) + " |",
                  "|---|" + "---|" * len(last["methods"])]
            for lam in last["dampings"]:
                L.append(f"| {lam:g} | " + " | ".join(_fmt((by.get((m, lam)) or {}).get("gamma_ratio_median"), ".3g")
                                                      for m in last["methods"]) + " |")
            L.append("")
        L += [f"![{n}]({n})" for n in figures.get("gamma", [])] + [""]

    if "toy" in sections:
        ts = sections["toy"]
        L += ["## 3. Figure 1 toy", "",
              f"The demo's problem (inputs {_nums(ts['data']['x'])}, targets {_nums(ts['data']['y'])}), {ts['steps']} steps. "
              f"Learning rates: {ts['lr_note']}. The same data, starts, lr and damping are given to the `toy-lsq` "
              "recipe and trained by the ordinary training loop.", "", "![toy](toy.png)", ""]

    L += ["## Runs", "", "| task | optimiser | seed | action | final train loss | test metric | wall s | run dir |",
          "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r.summary
        L.append(f"| {r.task} | {r.opt} | {r.seed} | {r.action}{' (' + r.error + ')' if r.error else ''} | "
                 f"{_fmt(s.get('final_train_loss'))} | {_fmt(s.get('test_metric'))} | {_fmt(s.get('wall_time_s'), '.1f')} | "
                 f"{os.path.relpath(r.run_dir, plan.out)} |")
    L += ["", "## Environment", "", "```", json.dumps(env, indent=2), "```", ""]
    L += [f"Re-run: `ief reproduce --out {plan.out}" + (" --quick" if plan.quick else "")
          + f" --tasks {','.join(plan.tasks)} --seeds {plan.seeds}" + (f" --steps {plan.steps}" if plan.steps else "")
          + "` (finished runs are reused).", ""]
    report = plan.out / "REPORT.md"
    atomic_write_text(report, "\n".join(L))
    results = {
        "plan": plan.as_json(), "wall_time_s": wall, "environment": env,
        "claims": [c.__dict__ for c in claims],
        "optimisation": sections.get("optimisation"),
        "gamma": {k: v for k, v in sections.get("gamma", {}).items()},
        "toy": {k: v for k, v in sections.get("toy", {}).items() if k not in ("result", "claims")},
        "runs": [{"task": r.task, "opt": r.opt, "seed": r.seed, "action": r.action, "run_dir": str(r.run_dir),
                  "error": r.error} for r in runs],
        "figures": figures,
    }
    atomic_write_json(plan.out / "results.json", results)
    return report
