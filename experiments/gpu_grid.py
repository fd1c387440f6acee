"""The rank-selection (issue 12) and fine-tuning (issue 13) grids on one GPU, in one unattended call.

    python experiments/gpu_grid.py --data gpu_data --out OUT --budget-s 390 --grace-s 50
    python experiments/gpu_grid.py --smoke --data ../shared/data --out /tmp/grid   # CPU, seconds

What it does:
1. One **CPU-throughput** process, pinned to 2 cores (``--cpu-cores``) with ``JAX_PLATFORMS=cpu``,
   measures ResNet-32 distillation throughput (images/s, compilation excluded) of a student in
   each format at 10% of the conv parameters. Issue 13's budget "10 minutes of distillation on the
   2-core CPU" becomes ``--cpu-budget-s`` × that throughput images: every distillation on the GPU
   trains exactly that many images (the same steps as the 2-core CPU would take in 10 minutes),
   and the GPU seconds are recorded beside it.
2. ``--workers`` GPU worker processes share the GPU (``XLA_PYTHON_CLIENT_MEM_FRACTION``, no
   preallocation), each pinned to its own cores, one shared JAX compilation cache. They claim
   *units* of a priority-ordered list (claiming is an atomic file creation, so a free worker
   always takes the most important unit left), write their own result file after every cell and
   start no new cell after ``--budget-s``.
3. This process merges the workers' files into ``OUT/finetune.json``, ``OUT/rank_selection.json``,
   ``OUT/cpu_throughput.json`` every few seconds and at the end, plus ``OUT/grid_log.txt`` (at
   most 4 files), and kills whatever still runs at ``--budget-s`` + ``--grace-s``.

Each record is the experiment's own (``experiments/finetune/main.py``,
``experiments/rank_selection/main.py``), so ``experiments/grid_report.py`` folds them into the
results already in the repository and writes the READMEs.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
# A device without some pure runtime dependency (e.g. safetensors) can get it unpacked here.
if (ROOT / "gpu_vendor").is_dir():
    sys.path.append(str(ROOT / "gpu_vendor"))

from _results import add_run, load_results, machine, now, save_results  # noqa: E402

# The distillation recipe (why: experiments/finetune/README.md, "Recipe of the GPU grid").
BATCH_SIZE = 128
LEARNING_RATE = 0.002
CPU_FORMATS = ("cp", "tucker2", "svd")  # throughput measured per format, in this order
BUDGETS_A = ("params=0.5", "params=0.33", "flops=0.5")  # issue 12's target budgets first
BUDGETS_B = ("flops=0.33", "params=0.25", "params=0.15")
# Guesses of one cell's seconds on the GPU before any worker has timed one (they only decide whether
# a cell may still finish before the hard stop; the measured times replace them). From the first
# grid (H200, 5 workers): a distillation cell took ~60 s plus ~230 s when it compressed its model
# itself; no ResNet-20 rank-selection cell (rule global) finished within 380 s.
PRIOR_SECONDS = {"finetune": 90.0, "rank_selection": 400.0}


# ------------------------------------------------------------------------------ the cell list


def ft(fmt, ratio, init, lr=LEARNING_RATE, ce=0.0):
    return dict(exp="finetune", cells=[dict(format=fmt, ratio=ratio, init=init, lr=lr, label_weight=ce)])


def rs(fmt, rule, budgets, arch=20, norm="sigma", calibration="sequential"):
    return dict(exp="rank_selection", cells=[[arch, fmt, norm, calibration, rule, b] for b in budgets])


def full_units() -> list[dict]:
    """Every unit, most important first. The issue-13 cells that decide its targets (best format
    per rate, Σ-sequential vs Frobenius vs random) and the issue-12 target cells (ResNet-20,
    global, params 0.5 / 0.33, flops 0.5) are interleaved at the top; ResNet-32/56 rank selection,
    40%, Σ-parallel and the Frobenius rows of issue 12 come last."""
    units = [
        ft("cp", 0.1, "sigma_seq"), rs("tucker2", "global", BUDGETS_A),
        # the recipe check (the first grid's curves flattened with budget left: the recipe binds)
        ft("cp", 0.1, "sigma_seq", lr=0.01), ft("cp", 0.1, "frobenius"), rs("tucker2", "uniform", BUDGETS_A[:1]),
        ft("cp", 0.1, "sigma_seq", ce=0.5), ft("cp", 0.1, "random"), ft("cp", 0.1, "sigma_seq", lr=0.005),
        ft("tucker2", 0.1, "sigma_seq"), rs("cp", "global", BUDGETS_A),
        ft("cp", 0.05, "sigma_seq"), ft("cp", 0.2, "sigma_seq"), rs("tucker2", "uniform", BUDGETS_A[1:]),
        rs("cp", "uniform", BUDGETS_A),
        ft("tucker2", 0.05, "sigma_seq"), ft("tucker2", 0.2, "sigma_seq"), rs("svd", "global", BUDGETS_A),
        ft("tucker2", 0.1, "frobenius"), ft("tucker2", 0.1, "random"), rs("svd", "uniform", BUDGETS_A),
        ft("cp", 0.05, "frobenius"), ft("cp", 0.2, "frobenius"), ft("cp", 0.05, "random"), ft("cp", 0.2, "random"),
        ft("svd", 0.1, "sigma_seq"), ft("svd", 0.05, "sigma_seq"), ft("svd", 0.2, "sigma_seq"),
        rs("tucker2", "global", BUDGETS_B), rs("cp", "global", BUDGETS_B), rs("tucker2", "uniform", BUDGETS_B),
        rs("cp", "uniform", BUDGETS_B),
        ft("tucker2", 0.05, "frobenius"), ft("tucker2", 0.2, "frobenius"),
        ft("tucker2", 0.05, "random"), ft("tucker2", 0.2, "random"),
        ft("svd", 0.1, "frobenius"), ft("svd", 0.05, "frobenius"), ft("svd", 0.2, "frobenius"),
        ft("svd", 0.1, "random"), ft("svd", 0.05, "random"), ft("svd", 0.2, "random"),
        rs("svd", "global", BUDGETS_B), rs("svd", "uniform", BUDGETS_B),
    ]
    units += [rs(f, "energy", BUDGETS_A) for f in ("tucker2", "cp", "svd")]
    units += [rs(f, "vbmf", ("none",)) for f in ("tucker2", "cp", "svd")]
    units += [ft(f, 0.4, i) for i in ("sigma_seq", "frobenius", "random") for f in ("cp", "tucker2", "svd")]
    units += [rs(f, rule, ("params=0.5", "params=0.33"), norm="frobenius", calibration="parallel")
              for f in ("tucker2", "svd", "cp") for rule in ("uniform", "global")]
    units += [ft(f, r, "sigma_par") for r in (0.1, 0.05, 0.2, 0.4) for f in ("cp", "tucker2", "svd")]
    units += [rs(f, "energy", BUDGETS_B) for f in ("tucker2", "cp", "svd")]
    units += [rs(f, rule, ("params=0.5", "params=0.33"), arch=a) for a in (32, 56) for f in ("tucker2", "cp", "svd")
              for rule in ("global", "uniform")]
    return units


def without_done(units: list[dict], finetune_runs: list[dict], rank_runs: list[dict]) -> list[dict]:
    """``units`` less the cells that earlier grids already measured (a fine-tuning cell is done when
    a run with a CPU-minute budget has its format, rate, init, learning rate and CE weight; a
    rank-selection cell when a run has its key). Units left empty are dropped."""
    ft_done = {(r["format"], r["ratio"], r["init"], r["learning_rate"], r.get("label_weight", 0.0))
               for r in finetune_runs if r.get("cpu_budget")}
    rs_done = {tuple(r[f] for f in ("arch", "format", "norm", "calibration", "rule", "budget")) for r in rank_runs
               if r.get("calib_images", 256) == 256}  # the grid's cells use Config's 256; a --calib-images run is another cell
    out = []
    for unit in units:
        if unit["exp"] == "finetune":
            cells = [c for c in unit["cells"]
                     if (c["format"], c["ratio"], c["init"], c["lr"], c["label_weight"]) not in ft_done]
        else:
            cells = [c for c in unit["cells"] if tuple(c) not in rs_done]
        if cells:
            out.append(dict(unit, cells=cells))
    return out


def smoke_units() -> list[dict]:
    """The cheapest cell of each experiment (closed-form SVD, no sequential pass, no damage curves):
    the machinery end to end in about a minute on 2 CPU cores."""
    return [ft("svd", 0.5, "frobenius"),
            dict(exp="rank_selection", cells=[[20, "svd", "sigma", "parallel", "uniform", "params=0.5"]])]


# ------------------------------------------------------------------------------ the experiments


def load_experiment(name: str):
    """``experiments/<name>/main.py`` as a module (each experiment has its own ``config`` module:
    load it fresh so the two experiments do not share one)."""
    folder = HERE / name
    sys.modules.pop("config", None)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_main", folder / "main.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("config", None)
    return module


def cpu_ratios(smoke: bool) -> tuple:
    """The conv-parameter rates whose 2-core CPU throughput is measured, in this order (10% first:
    a 5% cell that finds only the 10% number uses it, which is conservative)."""
    return (0.5,) if smoke else (0.1, 0.2, 0.05, 0.4)


def cpu_path(work: pathlib.Path, fmt: str, ratio: float) -> pathlib.Path:
    return work / f"cpu_throughput-{fmt}@{ratio}.json"


def measure_cpu(args) -> None:
    """Distillation throughput of ResNet-32 students in format ``args.cpu_format``, one per rate of
    :func:`cpu_ratios`, on the cores this process is pinned to; one file per rate in ``--work``."""
    import jax

    jax.config.update("jax_enable_x64", True)
    ftm = load_experiment("finetune")
    from sigmadecomp import compress
    from sigmadecomp import finetune as ftlib
    from sigmadecomp.data import cifar10_normalize, load_cifar10, sample
    from sigmadecomp.models import pretrained_resnet
    from sigmadecomp.surgery import plan

    config = ftm.SMOKE if args.smoke else ftm.FULL
    fmt = args.cpu_format
    model = pretrained_resnet(config.arch, args.data / "weights" / f"resnet{config.arch}_cifar10.safetensors")
    train_x, train_y = load_cifar10(args.data / "cifar10", "train")
    train = (cifar10_normalize(train_x), train_y)
    calib = cifar10_normalize(sample(train_x, None, 64, key=jax.random.key(0)))
    images, _ = ftm.training_stream(train, (20 if args.smoke else 200) * BATCH_SIZE, 1)
    for ratio in cpu_ratios(args.smoke):
        path = cpu_path(args.work, fmt, ratio)
        record = dict(format=fmt, ratio=ratio, machine=machine(), affinity=sorted(os.sched_getaffinity(0)), date=now(),
                      loadavg_start=list(os.getloadavg()), arch=config.arch, batch_size=BATCH_SIZE,
                      time_limit=args.cpu_seconds + args.cpu_compile_s, jax=jax.__version__,
                      backend=jax.default_backend(), xla_flags=os.environ.get("XLA_FLAGS"))
        save_results(record, path)
        try:
            tic = time.perf_counter()
            # The student's architecture is all that matters for throughput: a cheap Frobenius fit.
            student = compress.compress_model(model, calib, format=fmt, ratio=ratio, norm="frobenius",
                                              key=jax.random.key(0), skip=config.skip, max_steps=1, progress=False).model
            fit_seconds = time.perf_counter() - tic
            run = ftlib.finetune(student, model, images, key=jax.random.key(0), progress=False, config=ftlib.FinetuneConfig(
                epochs=1, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, log_every=1,
                time_limit=args.cpu_seconds + args.cpu_compile_s))  # the first step holds the compilation
        except Exception:
            import traceback

            record.update(failed=traceback.format_exc())
            save_results(record, path)
            raise
        rate = ftm.steady_throughput(run.history, BATCH_SIZE)
        # Too few steps for a steady rate (a tiny --cpu-seconds): the whole run, compilation included.
        steady = rate is not None
        rate = rate if steady else run.steps * BATCH_SIZE / run.seconds
        train_log = run.history["train"]
        record.update(images_per_second=rate, steady=steady, steps=run.steps, seconds=round(run.seconds, 2),
                      first_step_seconds=train_log[0]["seconds"] if train_log else None,
                      conv_param_rate=ftm.conv_rate(model, plan(model, format=fmt, ratio=ratio, skip=config.skip)),
                      fit_seconds=round(fit_seconds, 2), loadavg_end=list(os.getloadavg()), date_end=now(), done=True)
        save_results(record, path)
        print(f"cpu throughput {fmt} {ratio}: {rate:.1f} images/s ({run.steps} steps in {run.seconds:.1f} s)", flush=True)


def _read(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def images_budget(args, fmt: str, ratio: float) -> tuple[int, dict]:
    """``--cpu-budget-s`` × the 2-core throughput of this (format, rate). Waits for it; a rate below
    the first one measured takes the first one's number when its own is not there yet (a smaller
    student trains faster, so that budget is smaller: conservative); a failed or missing
    measurement falls back to the nearest rate measured, else ``--fallback-images-per-s``."""
    first = cpu_ratios(args.smoke)[0]
    tic = time.time()
    while True:
        got = _read(cpu_path(args.work, fmt, ratio))
        if got.get("images_per_second"):
            rate, source = got["images_per_second"], f"measured at this rate, {got['machine']}, cores {got['affinity']}"
            break
        early = _read(cpu_path(args.work, fmt, first))
        if ratio < first and early.get("images_per_second"):
            rate, source = early["images_per_second"], f"measured at {first} (conservative for {ratio}), {early['machine']}"
            break
        if got.get("failed") or time.time() > args.deadline:
            others = {r: _read(cpu_path(args.work, fmt, r)).get("images_per_second") for r in cpu_ratios(args.smoke)}
            others = {r: v for r, v in others.items() if v}
            if others:
                near = min(others, key=lambda r: abs(r - ratio))
                rate, source = others[near], f"measured at {near} (nearest; {ratio} missing)"
            else:
                rate, source = args.fallback_images_per_s, "fallback (--fallback-images-per-s): CPU measurement missing"
            break
        time.sleep(2)
    images = int(args.cpu_budget_s * rate)
    return images, dict(cpu_seconds=args.cpu_budget_s, cpu_images_per_second=rate, source=source, images=images,
                        waited_seconds=round(time.time() - tic, 1))


# ------------------------------------------------------------------------------ GPU workers


def claim(work: pathlib.Path, index: int) -> bool:
    try:
        os.close(os.open(work / "claims" / f"{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class Worker:
    def __init__(self, args):
        import jax

        jax.config.update("jax_enable_x64", True)
        if args.compile_cache:
            jax.config.update("jax_compilation_cache_dir", str(args.work / "jax_cache"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        self.args, self.jax = args, jax
        self.ftm, self.rsm = load_experiment("finetune"), load_experiment("rank_selection")
        self.paths = {e: args.work / "shards" / f"{e}-{args.worker}.json" for e in ("finetune", "rank_selection")}
        self.results = {e: load_results(p) for e, p in self.paths.items()}
        self.data = {}
        self.device = str(jax.devices()[0].device_kind)

    def log(self, text: str) -> None:
        print(f"[{time.time() - self.args.start:6.1f} s] worker {self.args.worker}: {text}", flush=True)

    def save(self, exp: str, record: dict) -> None:
        record.update(worker=self.args.worker, device=self.device, grid_date=now())
        add_run(self.results[exp], record, getattr(self.ftm if exp == "finetune" else self.rsm, "run_key"))
        save_results(self.results[exp], self.paths[exp])

    # ------------------------------------------------------------------ fine-tuning (issue 13)

    def finetune_data(self, config):
        if "ft" not in self.data:
            import jax

            from sigmadecomp.data import cifar10_normalize, load_cifar10, sample
            from sigmadecomp.models import pretrained_resnet

            d = self.args.data
            model = pretrained_resnet(config.arch, d / "weights" / f"resnet{config.arch}_cifar10.safetensors")
            train_x, train_y = load_cifar10(d / "cifar10", "train")
            calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
            test_x, test_y = load_cifar10(d / "cifar10", "test", limit=config.test_images)
            self.data["ft"] = (model, (cifar10_normalize(train_x), train_y), calib, (cifar10_normalize(test_x), test_y))
        return self.data["ft"]

    def finetune_cell(self, cell: dict) -> None:
        base = self.ftm.SMOKE if self.args.smoke else self.ftm.FULL
        model, train, calib, test = self.finetune_data(base)
        cache = self.args.work / "models"
        cache.mkdir(exist_ok=True)
        key = (cell["format"], cell["ratio"], cell["init"])
        source = "frobenius" if cell["init"] == "random" else cell["init"]
        folder = cache / f"resnet{base.arch}-{cell['format']}-{cell['ratio']}-{source}-sweeps{base.max_steps}"
        given = (self.args.models / folder.name).is_dir() if self.args.models else False
        tic = time.perf_counter()
        with open(cache / f"{cell['format']}-{cell['ratio']}-{source}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one worker compresses, the others wait and load it
            _, _, compress_seconds = self.ftm.compressed_model(model, calib, *key, base, cache)
        compress_wall = time.perf_counter() - tic
        self.log(f"compressed {key} in {compress_wall:.1f} s")
        images, budget = images_budget(self.args, cell["format"], cell["ratio"])
        self.waited = budget["waited_seconds"]
        steps = max(1, images // BATCH_SIZE)
        config = dataclasses.replace(base, steps=steps, batch_size=BATCH_SIZE, learning_rate=cell["lr"],
                                     label_weight=cell["label_weight"], eval_every=max(1, steps // 8))
        record = self.ftm.measure(model, train, calib, test, key, config, cache)
        record.update(compress_seconds=None if compress_seconds is None else round(compress_seconds, 2),
                      compress_wall_seconds=round(compress_wall, 2), cpu_budget=budget,
                      compressed_by="--models (made beforehand)" if given else "this worker or another of this grid")
        self.save("finetune", record)
        self.log(f"finetune {self.ftm.run_key(record)}: {record['accuracy_compressed']:.3f} -> "
                 f"{record['accuracy_finetuned']:.3f} ({record['finetune_seconds']:.1f} s GPU)")

    # ------------------------------------------------------------------ rank selection (issue 12)

    def rank_cell(self, key: tuple) -> None:
        import jax

        from sigmadecomp.data import cifar10_normalize, load_cifar10, sample

        config = self.rsm.SMOKE if self.args.smoke else self.rsm.FULL
        if "rs" not in self.data:
            d = self.args.data
            train_x, _ = load_cifar10(d / "cifar10", "train")
            calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
            test_x, test_y = load_cifar10(d / "cifar10", "test", limit=config.test_images)
            self.data["rs"] = (calib, (cifar10_normalize(test_x), test_y), {})
        calib, test, archs = self.data["rs"]
        if key[0] not in archs:
            self.log(f"calibrating ResNet-{key[0]}")
            archs[key[0]] = self.rsm.Arch(key[0], self.args.data, calib, config)
        self.log(f"rank {key}: selecting ranks and compressing")
        record = self.rsm.measure(archs[key[0]], key, test, config)
        self.save("rank_selection", record)
        self.log(f"rank {key}: {record['accuracy']:.3f} params {record['achieved_params']:.3f} in {record['seconds']:.1f} s")

    def fits(self, exp: str) -> bool:
        """Whether a new ``exp`` cell may start: before the budget, and done before the hard stop by
        the longest such cell any worker has finished or is still running (a prior guess before
        any was timed). The first GPU grid showed why others' running cells count: a rank-selection
        cell ran past the whole budget, and workers went on starting them on a 40 s guess."""
        now_ = time.time()
        seen = []
        for path in (self.args.work / "shards").glob("cells-*.json"):
            for entry in _read(path).get(exp, []):
                seen.append(entry["seconds"] if entry.get("seconds") is not None else now_ - entry["started"])
        guess = max(seen, default=10.0 if getattr(self.args, "smoke", False) else PRIOR_SECONDS[exp])
        return now_ < self.args.deadline and now_ + guess < self.args.hard

    def track(self, exp: str, started: float, seconds: float | None) -> None:
        """Publish this worker's cell times (``seconds`` None: still running) for :meth:`fits`."""
        path = self.args.work / "shards" / f"cells-{self.args.worker}.json"
        cells = _read(path)
        entries = [e for e in cells.get(exp, []) if e["started"] != started]
        cells[exp] = entries + [dict(started=started, seconds=seconds)]
        save_results(cells, path)

    def run(self, units: list[dict]) -> None:
        for index, unit in enumerate(units):
            if time.time() > self.args.deadline:
                self.log("budget reached: no new unit")
                return
            if not self.fits(unit["exp"]):
                continue  # a shorter kind of cell further down may still fit
            if not claim(self.args.work, index):
                continue
            for cell in unit["cells"]:
                if not self.fits(unit["exp"]):
                    self.log(f"budget reached inside unit {index}: {cell} not started")
                    break
                tic = time.time()
                self.track(unit["exp"], tic, None)
                try:
                    if unit["exp"] == "finetune":
                        self.finetune_cell(cell)
                    else:
                        self.rank_cell(tuple(cell))
                except Exception as error:  # one failed cell must not stop the grid: record it
                    import traceback

                    traceback.print_exc()
                    self.results[unit["exp"]].setdefault("failures", []).append(
                        dict(cell=cell, worker=self.args.worker, error=repr(error), date=now()))
                    save_results(self.results[unit["exp"]], self.paths[unit["exp"]])
                waited = self.__dict__.pop("waited", 0.0)  # time spent waiting for the CPU number
                self.track(unit["exp"], tic, time.time() - tic - waited)
                self.log(f"unit {index} cell {cell} took {time.time() - tic:.1f} s")
        self.log("no unit left that can finish before the hard stop")


def precompress(args) -> None:
    """Compress the fine-tuning cells ``args.precompress`` (``FORMAT:RATIO:INIT``) into
    ``args.models`` (e.g. on a CPU before the device call; ``--models`` then hands them over)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    ftm = load_experiment("finetune")
    from sigmadecomp.data import cifar10_normalize, load_cifar10, sample
    from sigmadecomp.models import pretrained_resnet

    config = ftm.SMOKE if args.smoke else ftm.FULL
    model = pretrained_resnet(config.arch, args.data / "weights" / f"resnet{config.arch}_cifar10.safetensors")
    train_x, _ = load_cifar10(args.data / "cifar10", "train")
    calib = cifar10_normalize(sample(train_x, None, config.calib_images, key=jax.random.key(config.calib_seed)))
    for cell in args.precompress:
        fmt, ratio, init = cell.split(":")
        tic = time.perf_counter()
        ftm.compressed_model(model, calib, fmt, float(ratio), init, config, args.models)
        print(f"{now()}: {cell} compressed in {time.perf_counter() - tic:.1f} s ({machine()}, load "
              f"{os.getloadavg()[0]:.1f})", flush=True)


# ------------------------------------------------------------------------------ the parent


def cores_for(total: int, workers: int, cpu_cores: list[int]) -> list[list[int] | None]:
    """Disjoint core sets for the workers, leaving ``cpu_cores`` to the CPU measurement (no
    pinning when the machine has too few cores to split)."""
    rest = [c for c in sorted(os.sched_getaffinity(0)) if c not in cpu_cores]
    if len(rest) < workers or total < 4:
        return [None] * workers
    size = len(rest) // workers
    return [rest[i * size:(i + 1) * size] if i < workers - 1 else rest[i * size:] for i in range(workers)]


def spawn(args, mode: list[str], env_extra: dict, cores, log: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), *mode, "--data", str(args.data), "--work",
            str(args.work), "--start", repr(args.start), "--deadline", repr(args.deadline), "--hard", repr(args.hard),
            "--cpu-budget-s", repr(args.cpu_budget_s), "--cpu-seconds", repr(args.cpu_seconds),
            "--cpu-compile-s", repr(args.cpu_compile_s),
            "--fallback-images-per-s", repr(args.fallback_images_per_s)]
    argv += ["--smoke"] if args.smoke else []
    argv += [] if args.compile_cache else ["--no-compile-cache"]
    argv += ["--models", str(args.models)] if args.models else []
    if cores:
        argv += ["--pin", ",".join(map(str, cores))]
    return subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def merge_out(args) -> None:
    """Fold the workers' files into at most 4 files under ``--out`` (each cell is claimed by one
    worker only, so the shards' runs are disjoint)."""
    for exp in ("finetune", "rank_selection"):
        merged = {"runs": [], "sessions": [], "failures": []}
        for shard in sorted((args.work / "shards").glob(f"{exp}-*.json")):
            other = load_results(shard)
            merged["runs"] += other["runs"]
            merged["failures"] += other.get("failures", [])
        merged["grid"] = dict(argv=sys.argv[1:], date=now(), machine=machine(), gpu=_gpu_name(),
                              elapsed_seconds=round(time.time() - args.start, 1), units=len(args.units),
                              units_claimed=len(list((args.work / "claims").iterdir())))
        save_results(merged, args.out / f"{exp}.json")
    cpu = {f.stem.split("-", 1)[1]: _read(f) for f in sorted(args.work.glob("cpu_throughput-*.json"))}
    if cpu:
        save_results(dict(formats=cpu, cpu_budget_s=args.cpu_budget_s), args.out / "cpu_throughput.json")


_GPU: list = []


def _gpu_name() -> str | None:
    if not _GPU:
        try:
            _GPU.append(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            _GPU.append(None)
    return _GPU[0]


def parent(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    missing = [m for m in ("jax", "flax", "optax", "scipy", "safetensors", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        message = (f"missing Python modules {missing}: install them, or unpack their wheels into "
                   f"{ROOT / 'gpu_vendor'} (e.g. python -m zipfile -e safetensors-*.whl gpu_vendor)")
        (args.out / "grid_log.txt").write_text(message + "\n")
        raise SystemExit(message)
    args.work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="gpu_grid_"))
    for sub in ("claims", "shards", "logs"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    args.start = time.time()
    args.deadline = args.start + args.budget_s
    hard = args.hard = args.deadline + args.grace_s
    args.units = smoke_units() if args.smoke else full_units()
    if not args.smoke and not args.redo:  # the repository's results are not measured again
        done = [load_results(HERE / e / "results.json")["runs"] for e in ("finetune", "rank_selection")]
        args.units = without_done(args.units, *done)
    if args.models is not None:  # compressed models made elsewhere: the GPU time goes to distillation
        shutil.copytree(args.models, args.work / "models", dirs_exist_ok=True)
    (args.work / "units.json").write_text(json.dumps(args.units))
    formats = ("svd",) if args.smoke else CPU_FORMATS
    available = sorted(os.sched_getaffinity(0))
    # The last 2·len(formats) cores, one pair per format, when the machine has enough to spare.
    pairs = ([available[len(available) - 2 * (i + 1):len(available) - 2 * i] for i in range(len(formats))]
             if len(available) >= 2 * len(formats) + args.workers else [None] * len(formats))
    cpu_cores = [c for pair in pairs if pair for c in pair]
    total = len(available)
    logs = args.work / "logs"
    cpu_env = dict(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    procs = {f"cpu-{fmt}": spawn(args, ["--cpu-measure", "--cpu-format", fmt], cpu_env, pair, logs / f"cpu-{fmt}.log")
             for fmt, pair in zip(formats, pairs)}
    fraction = f"{min(0.9 / args.workers, 0.45):.3f}"
    gpu_env = dict(XLA_PYTHON_CLIENT_MEM_FRACTION=fraction, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.gpu_xla_flags:
        gpu_env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.gpu_xla_flags}".strip()
    if args.smoke:
        gpu_env["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "cpu")
    for i, cores in enumerate(cores_for(total, args.workers, cpu_cores)):
        procs[f"w{i}"] = spawn(args, ["--worker", str(i)], gpu_env, cores, logs / f"worker{i}.log")
    print(f"{now()}: {len(args.units)} units, {args.workers} workers (memory fraction {fraction}), "
          f"CPU measurement on cores {cpu_cores or 'unpinned'}, budget {args.budget_s} s + grace {args.grace_s} s, "
          f"work folder {args.work}", flush=True)
    while True:
        time.sleep(1 if args.smoke else 5)
        workers_alive = [k for k, p in procs.items() if k.startswith("w") and p.poll() is None]
        if not workers_alive:  # the grid is done: the CPU numbers are only needed by the workers
            for k, p in procs.items():
                if k.startswith("cpu") and p.poll() is None:
                    print(f"{now()}: the workers are done; stopping {k}", flush=True)
                    _stop(p)
            break
        if time.time() > hard:
            print(f"{now()}: hard limit reached, stopping {workers_alive}", flush=True)
            for p in procs.values():
                _stop(p)
            break
        merge_out(args)
    for p in procs.values():
        p.wait()
    merge_out(args)
    with open(args.out / "grid_log.txt", "w") as out:
        out.write(f"gpu_grid.py {' '.join(sys.argv[1:])}\nstarted {args.start}, ended {now()}, "
                  f"exit codes { {k: p.returncode for k, p in procs.items()} }\n")
        for log in sorted(logs.iterdir()):
            text = log.read_text(errors="replace")
            out.write(f"\n===== {log.name} (last 40 000 characters) =====\n{text[-40_000:]}")
    print(f"{now()}: done in {time.time() - args.start:.0f} s; results in {args.out}", flush=True)
    return 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and nothing else: its own session
        except ProcessLookupError:
            pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path("gpu_data"))
    p.add_argument("--out", type=pathlib.Path, help="folder of the (at most 4) result files")
    p.add_argument("--budget-s", type=float, default=330.0, help="no new cell starts after this many seconds")
    p.add_argument("--grace-s", type=float, default=60.0, help="cells still running this long after the budget are "
                   "killed; a worker starts no cell it does not expect to finish by then")
    p.add_argument("--workers", type=int, default=5, help="GPU worker processes sharing the GPU (pinned to the cores "
                   "left after one pair per CPU-throughput format)")
    p.add_argument("--cpu-budget-s", type=float, default=600.0, help="issue 13's CPU distillation budget, seconds")
    p.add_argument("--cpu-seconds", type=float, default=15.0, help="seconds of distillation timed per format on the CPU")
    p.add_argument("--cpu-compile-s", type=float, default=40.0, help="allowance for the train step's compilation on "
                   "the CPU (the timed seconds are those after the first step)")
    p.add_argument("--fallback-images-per-s", type=float, default=40.0,
                   help="CPU throughput used only if the measurement fails (recorded as such)")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false")
    p.add_argument("--gpu-xla-flags", default="", help="extra XLA_FLAGS for the GPU workers only, e.g. "
                   "--xla_gpu_autotune_level=0 (compiling dominated the first grid; not yet tried on the device)")
    p.add_argument("--redo", action="store_true", help="also run cells already in experiments/*/results.json")
    p.add_argument("--models", type=pathlib.Path, default=None, help="compressed models made beforehand (folders "
                   "named as experiments/finetune/main.py caches them), used instead of compressing on the device")
    p.add_argument("--precompress", nargs="+", default=None, metavar="FORMAT:RATIO:INIT",
                   help="only compress these fine-tuning cells into --models (no grid)")
    p.add_argument("--work", type=pathlib.Path, default=None, help="scratch folder (claims, shards, models, logs)")
    p.add_argument("--smoke", action="store_true", help="tiny grid on the CPU (seconds)")
    # internal: the modes of the child processes
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-measure", action="store_true", help="measure the 2-core CPU distillation throughput "
                   "of --cpu-format only (results in --work)")
    p.add_argument("--cpu-format", default="cp", choices=CPU_FORMATS)
    p.add_argument("--pin", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--hard", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.workers = min(args.workers, 2)
        args.cpu_budget_s = min(args.cpu_budget_s, 2.0)
        args.cpu_seconds = min(args.cpu_seconds, 3.0)
        args.cpu_compile_s = min(args.cpu_compile_s, 5.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, [int(c) for c in args.pin.split(",")])  # before JAX sizes its thread pools
    if args.cpu_measure:
        measure_cpu(args)  # a failure is written into that rate's file before it propagates
        return 0
    if args.precompress:
        if args.models is None:
            raise SystemExit("--precompress needs --models DIR")
        precompress(args)
        return 0
    if args.worker is not None:
        Worker(args).run(json.loads((args.work / "units.json").read_text()))
        return 0
    if args.out is None:
        raise SystemExit("--out is required")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
