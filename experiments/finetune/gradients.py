"""Where the first distillation step pushes hardest: per-parameter gradient norms of the distillation
loss at the start, relative to the parameter's norm, for a compressed model saved by ``main.py``.

    .venv/bin/python experiments/finetune/gradients.py resnet32-r-tt-0.05-sigma_seq-sweeps6 [--balance]

One batch of ``--batch`` training images, the loss ``T²·KL`` of ``main.py`` (T = 4), BatchNorm in
inference mode (``main.py`` trains with it frozen), factorized layers run as their rebuilt kernels
(the same function). Prints the parameters with the largest ``‖∂L/∂θ‖ / ‖θ‖`` and the global
gradient norm (``FinetuneConfig.clip_norm`` clips it to 5), and writes them to
``gradients-<model>[-balanced].json`` in ``--out`` (default: beside this script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sigmadecomp import finetune as ft  # noqa: E402
from sigmadecomp.data import cifar10_normalize, load_cifar10  # noqa: E402
from sigmadecomp.models import pretrained_resnet  # noqa: E402
from sigmadecomp.surgery import load  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="folder name under --models (e.g. resnet32-r-tt-0.05-sigma_seq-sweeps6)")
    p.add_argument("--models", type=pathlib.Path, default=HERE / "models")
    p.add_argument("--data", type=pathlib.Path, default=HERE.parents[1] / ".." / "shared" / "data")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="folder of the JSON file (default: here)")
    p.add_argument("--balance", action="store_true", help="balance the factors first (FinetuneConfig.balance)")
    args = p.parse_args(argv)
    depth = int(args.model.split("-")[0].removeprefix("resnet"))
    teacher = pretrained_resnet(depth, args.data / "weights" / f"resnet{depth}_cifar10.safetensors")
    student = load(args.models / args.model, teacher)
    if args.balance:
        ft.balance_factors(student)
    ft.apply_implementations(student, {path: "dense" for path in ft.factorized_layers(student)})
    x, _ = load_cifar10(args.data / "cifar10", "train", limit=args.batch)
    x = jnp.asarray(cifar10_normalize(x))
    teacher.eval()
    student.eval()
    target = teacher(x)

    def loss(model):
        return ft.distillation_loss(model(x), target, temperature=4.0)[0]

    value, grads = nnx.value_and_grad(loss)(student)
    g = {jax.tree_util.keystr(k): float(jnp.linalg.norm(v)) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    params = {jax.tree_util.keystr(k): float(jnp.linalg.norm(v))
              for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(student, nnx.Param))}
    rows = sorted(({"param": k, "grad_norm": g[k], "param_norm": params[k], "relative": g[k] / max(params[k], 1e-30)}
                   for k in g if k in params), key=lambda r: -r["relative"])
    total = float(sum(v * v for v in g.values()) ** 0.5)
    print(f"{args.model}{' (balanced)' if args.balance else ''}: loss {float(value):.3f}, global gradient norm {total:.1f}")
    for r in rows[: args.top]:
        print(f"  ‖∂L/∂θ‖/‖θ‖ {r['relative']:8.3g}   ‖∂L/∂θ‖ {r['grad_norm']:8.3g}   ‖θ‖ {r['param_norm']:7.3g}   {r['param']}")
    out = args.out / f"gradients-{args.model}{'-balanced' if args.balance else ''}.json"
    out.write_text(json.dumps(dict(model=args.model, balance=args.balance, batch=args.batch, loss=float(value),
                                   global_grad_norm=total, top=rows[: args.top],
                                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
