"""Issue-10 GPU benchmark: Σ vs Frobenius sweeps at 512, ResNet-56 end to end, reduced-precision CG.

    python benchmarks/gpu.py --data ./gpu_data --out OUT --budget-s 170
    python benchmarks/gpu.py --data ../shared/data --out /tmp/gpu_smoke --smoke   # seconds, any backend

Run from the repository root (``sigmadecomp`` need not be installed: the root goes on the path).
One JSON per workload under ``--out``, each rewritten after every cell, so a run stopped by the
budget keeps what it measured:

* ``sweeps.json`` (workloads ``tucker2_sweeps``, ``cp_sweeps``): seconds per sweep of ``Tucker2ALS`` and ``CPALS`` at ``512×512×3×3`` (ranks
  ``(128, 128)`` and 256, as benchmarks/solvers.py), Frobenius and Σ (the same synthetic conv
  covariance), ``(t(k2 sweeps) − t(k1 sweeps)) / (k2 − k1)`` of compiled calls, best of
  2 repeats; plus error and CG iterations per sweep of the ``k2`` run, and the Σ/F ratio.
* ``end_to_end.json``: ``sigmadecomp compress --arch resnet56 --format tucker2 --norm sigma
  --calibration sequential --ratio 0.5 --calib 512 --max-steps 30`` twice in one fresh child
  process: the first call is the cold one (every XLA compilation paid), the second the warm one.
  Wall seconds, backend-compile count and seconds (``jax.monitoring``), accuracy, per call.
* ``precision.json``: Tucker-2-Σ at 512 with CG's ``M·z`` products at ``cg_precision`` =
  ``highest`` / ``tf32`` / ``bf16`` (the sweep error is always computed at HIGHEST; a sweep
  whose step B raised it keeps step A only): seconds for ``k`` sweeps and the error history.

``--budget-s`` is a hard wall-clock budget for the whole script: no cell starts when its estimated
cost does not fit, the child process is killed at the budget, and what was measured is written.
A failing cell is recorded with its traceback and the others go on. Where the ``safetensors``
package is missing (the device image has jax/flax/optax only), a minimal pure-NumPy reader/writer
of the format is put on the path, for this process and the child.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
_T0 = time.monotonic()

_SAFETENSORS_INIT = '''"""Minimal stand-in for the safetensors package (written by benchmarks/gpu.py)."""
import json, struct
import numpy as np

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


class SafetensorError(Exception):
    pass


def _read(path):
    with open(path, "rb") as f:
        blob = f.read()
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
    except Exception as err:
        raise SafetensorError(str(err)) from None
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        arr = np.frombuffer(blob[base + start:base + end], dtype=_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


class safe_open:
    def __init__(self, path, framework="numpy", device="cpu"):
        self._tensors = _read(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return list(self._tensors)

    def get_tensor(self, name):
        return self._tensors[name]
'''

_SAFETENSORS_NUMPY = '''import json, struct
import numpy as np
from safetensors import _read, _NAMES


def load_file(path):
    return _read(path)


def save_file(tensors, path, metadata=None):
    header, chunks, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype.newbyteorder("<").str if arr.dtype.itemsize > 1
                                        else arr.dtype.str], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))
'''


def _ensure_safetensors(tmp: pathlib.Path) -> str | None:
    """A path to prepend to ``sys.path``/``PYTHONPATH`` when ``safetensors`` is not installed."""
    try:
        import safetensors.numpy  # noqa: F401
        return None
    except ImportError:
        pkg = tmp / "shim" / "safetensors"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(_SAFETENSORS_INIT)
        (pkg / "numpy.py").write_text(_SAFETENSORS_NUMPY)
        sys.path.insert(0, str(pkg.parent))
        return str(pkg.parent)


def _left(args) -> float:
    return args.budget_s - (time.monotonic() - _T0)


def _write(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def _meta(args) -> dict:
    import jax

    dev = jax.devices()[0]
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), jax=jax.__version__,
                backend=jax.default_backend(), device=str(getattr(dev, "device_kind", dev)),
                num_devices=jax.device_count(), load=os.getloadavg(), cpu_count=os.cpu_count(),
                smoke=args.smoke, budget_s=args.budget_s)


def _run_cells(name: str, cells, args, fn) -> None:
    """Run ``fn(cell)`` for each cell whose estimate fits the budget; one JSON (appended to when it
    exists from an earlier workload of this run), rewritten after every cell."""
    out = args.out / f"{name}.json"
    payload = json.loads(out.read_text()) if out.exists() else dict(meta=_meta(args), rows=[], skipped=[], errors=[])
    for cell, estimate_s in cells:
        if _left(args) < estimate_s:
            payload["skipped"].append(dict(cell=cell, reason=f"budget: {_left(args):.0f} s left, "
                                                              f"cell estimated {estimate_s:.0f} s"))
        else:
            start = time.monotonic()
            try:
                payload["rows"].append(dict(cell=cell, **fn(cell), cell_s=time.monotonic() - start))
            except Exception:  # noqa: BLE001 - recorded; the other cells go on
                payload["errors"].append(dict(cell=cell, traceback=traceback.format_exc()))
            print(json.dumps(payload["rows"][-1] if payload["rows"] and payload["rows"][-1]["cell"] == cell
                             else payload["errors"][-1], default=str)[:400], flush=True)
        payload["meta"]["elapsed_s"] = time.monotonic() - _T0
        _write(out, payload)


# ----------------------------------------------------------------------------- sweeps


def _problem(c: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import runpy

    make_cov = runpy.run_path(str(ROOT / "benchmarks" / "solvers.py"))["make_cov"]
    key = jax.random.key(c)
    kernel = jax.random.normal(key, (3, 3, c, c), jnp.float32) / np.sqrt(9.0 * c)
    return kernel, make_cov(c, jax.random.fold_in(key, 1))


def _timed(fn, repeats: int) -> tuple[float, object]:
    import jax

    out = jax.block_until_ready(fn())  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def _solver(method: str, c: int, steps: int, **options):
    import sigmadecomp as sd

    if method == "Tucker2ALS":
        r = min(c // 2, 128)
        return sd.Tucker2ALS((r, r), max_steps=steps, rtol=1e-30, **options)
    return sd.CPALS({512: 256}.get(c, c // 2), max_steps=steps, rtol=1e-30, **options)


def _sweep_cell(cell, args, problems) -> dict:
    import jax
    import numpy as np

    import sigmadecomp as sd

    kernel, cov = problems[cell["size"]]
    cov = cov if cell["norm"] == "sigma" else None
    key = jax.random.key(0)
    times, sol = {}, None
    for k in (args.k1, args.k2):
        solver = _solver(cell["method"], cell["size"], k)
        times[k], sol = _timed(lambda s=solver: sd.decompose(kernel, s, cov=cov, key=key), args.repeats)
    steps = int(sol.num_steps)
    inner = np.asarray(sol.stats.get("inner_iterations", np.zeros(0)))[:steps]
    return dict(s_per_sweep=(times[args.k2] - times[args.k1]) / (args.k2 - args.k1),
                s_k1=times[args.k1], s_k2=times[args.k2], k1=args.k1, k2=args.k2,
                error=float(sol.final_error), status=sd.Status(int(sol.status)).name,
                cg_per_sweep=float(inner.mean()) if inner.size else None, cg_history=inner.tolist())


def sweeps(args, problems, method: str) -> None:
    estimate = {"Tucker2ALS": 15, "CPALS": 25}[method]
    cells = [(dict(method=method, norm=n, size=c), estimate) for c in args.sizes for n in ("frobenius", "sigma")]
    _run_cells("sweeps", cells, args, lambda cell: _sweep_cell(cell, args, problems))
    path = args.out / "sweeps.json"
    payload = json.loads(path.read_text())
    by = {(r["cell"]["method"], r["cell"]["size"], r["cell"]["norm"]): r["s_per_sweep"] for r in payload["rows"]}
    payload["ratios"] = [dict(method=m, size=c, sigma_over_frobenius=by[(m, c, "sigma")] / by[(m, c, "frobenius")])
                         for (m, c, n) in by if n == "frobenius" and (m, c, "sigma") in by and by[(m, c, n)] > 0]
    _write(path, payload)


# ----------------------------------------------------------------------------- precision


def _precision_cell(cell, args, problems) -> dict:
    import jax
    import numpy as np

    import sigmadecomp as sd

    kernel, cov = problems[cell["size"]]
    solver = _solver("Tucker2ALS", cell["size"], args.precision_steps, cg_precision=cell["cg_precision"])
    seconds, sol = _timed(lambda: sd.decompose(kernel, solver, cov=cov), args.repeats)
    steps = int(sol.num_steps)
    errors = np.asarray(sol.errors)[: steps + 1]
    return dict(seconds=seconds, sweeps=steps, error=float(sol.final_error), errors=errors.tolist(),
                max_increase=float(max(0.0, np.max(np.diff(errors)))) if steps else 0.0,
                status=sd.Status(int(sol.status)).name,
                cg_history=np.asarray(sol.stats["inner_iterations"])[:steps].tolist(),
                backend=jax.default_backend())


def precision(args, problems) -> None:
    cells = [(dict(size=c, cg_precision=p), 15) for c in args.sizes for p in ("highest", "tf32", "bf16")]
    _run_cells("precision", cells, args, lambda cell: _precision_cell(cell, args, problems))


# ----------------------------------------------------------------------------- end to end

_CHILD = r'''
import json, sys, time
import jax
from sigmadecomp.cli import main

argv, out = json.loads(sys.argv[1]), sys.argv[2]
calls, current = [], {}

def listener(event, duration, fun_name=None, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        current["compiles"] += 1
        current["backend_compile_s"] += duration
        entry = current["per_function"].setdefault(str(fun_name), [0, 0.0])
        entry[0] += 1
        entry[1] += duration
    elif event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
        current["trace_lower_s"] += duration

jax.monitoring.register_event_duration_secs_listener(listener)
for label in ("cold", "warm"):
    current.clear()
    current.update(label=label, compiles=0, backend_compile_s=0.0, trace_lower_s=0.0, per_function={})
    report = out + "." + label + ".report.json"
    start = time.perf_counter()
    code = main(argv + ["--json", report])
    current.update(wall_s=time.perf_counter() - start, exit_code=code,
                   report=json.load(open(report)))
    calls.append(dict(current))
    json.dump(dict(calls=calls, devices=[str(d) for d in jax.devices()]), open(out, "w"))
'''


def _e2e_argv(args) -> list[str]:
    """The issue's command; ``--smoke``: ResNet-20, 32 images, 2 sweeps, no latency timing."""
    arch = "resnet20" if args.smoke else "resnet56"
    calib = 32 if args.smoke else 512
    data = args.data.resolve()
    argv = ["compress", "--arch", arch, "--weights", str(data / "weights" / f"{arch}_cifar10.safetensors"),
            "--data", str(data / "cifar10"), "--format", "tucker2", "--norm", "sigma", "--calibration",
            "sequential", "--ratio", "0.5", "--calib", str(calib), "--key", "0", "--no-progress",
            "--max-steps", str(2 if args.smoke else 30)]
    return argv + (["--implementation", "factorized", "--latency-repeats", "0"] if args.smoke else [])


def _summary(call: dict) -> dict:
    rep = call.pop("report")
    statuses: dict = {}
    for layer in rep.get("layers", []):
        statuses[layer["status"]] = statuses.get(layer["status"], 0) + 1
    share = call["backend_compile_s"] / call["wall_s"] if call["wall_s"] else None
    return dict(call, compile_share=share, accuracy=rep.get("accuracy"),
                baseline_accuracy=rep.get("baseline_accuracy"), decompose_s=rep.get("decompose_seconds"),
                mean_relative_error=rep.get("mean_relative_error"), statuses=statuses,
                num_eval_images=rep.get("num_eval_images"))


def end_to_end(args, shim: str | None) -> None:
    out = args.out / "end_to_end.json"
    payload = dict(meta=_meta(args), argv=_e2e_argv(args), calls=[], errors=[])
    timeout = _left(args) - args.reserve_s
    if timeout < 20:
        payload["errors"].append(f"budget: {_left(args):.0f} s left, not started")
        _write(out, payload)
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, str(ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        stats = os.path.join(tmp, "stats.json")
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(payload["argv"]), stats], env=env,
                                  cwd=tmp, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            payload["exit_code"] = done.returncode
            if done.returncode:
                payload["errors"].append(done.stderr[-4000:])
        except subprocess.TimeoutExpired:
            payload["errors"].append(f"child killed at the budget after {timeout:.0f} s")
        payload["process_s"] = time.perf_counter() - start  # interpreter start + imports + both calls
        if os.path.exists(stats):
            child = json.load(open(stats))
            payload["calls"] = [_summary(c) for c in child["calls"]]
            payload["child_devices"] = child["devices"]
    payload["meta"]["elapsed_s"] = time.monotonic() - _T0
    _write(out, payload)
    print(json.dumps(payload["calls"], default=str)[:600], payload["errors"][-1:], flush=True)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path("gpu_data"),
                        help="the data kit (weights/, cifar10/)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for the JSON files")
    parser.add_argument("--budget-s", type=float, default=170.0, help="hard wall-clock budget (seconds)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, ResNet-20 with 32 images: seconds")
    parser.add_argument("--workloads", default="end_to_end,tucker2_sweeps,precision,cp_sweeps",
                        help="comma-separated, run in this order (sweeps of both methods go to sweeps.json)")
    parser.add_argument("--reserve-s", type=float, default=None,
                        help="seconds of the budget kept for the workloads after end_to_end "
                             "(default 60, 20 with --smoke)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reserve_s is None:
        args.reserve_s = 20.0 if args.smoke else 60.0
    # The child process of end_to_end shares the accelerator: no process may grab 75% of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args.sizes = [32] if args.smoke else [512]
    args.k1, args.k2 = (1, 2) if args.smoke else (1, 4)
    args.repeats = 2
    args.precision_steps = 3 if args.smoke else 8
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    tmp = tempfile.TemporaryDirectory()
    shim = _ensure_safetensors(pathlib.Path(tmp.name))
    problems: dict = {}
    for name in args.workloads.split(","):
        start = time.monotonic()
        try:
            if name != "end_to_end" and not problems:
                problems.update({c: _problem(c) for c in args.sizes})
            {"tucker2_sweeps": lambda: sweeps(args, problems, "Tucker2ALS"),
             "cp_sweeps": lambda: sweeps(args, problems, "CPALS"),
             "precision": lambda: precision(args, problems),
             "end_to_end": lambda: end_to_end(args, shim)}[name]()
        except Exception:  # noqa: BLE001 - one workload's failure must not stop the others
            _write(args.out / f"{name}.error.json", dict(traceback=traceback.format_exc()))
            traceback.print_exc()
        print(f"{name}: {time.monotonic() - start:.1f} s, {_left(args):.0f} s of budget left", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
