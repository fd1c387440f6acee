"""Several devices: data-parallel covariances and layer-parallel solves equal one device.

The checks run in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
(two CPU devices), so this test process keeps its own device count for the other tests.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

from sigmadecomp.distributed import assign_devices, resolve_devices

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    jax.config.update("jax_enable_x64", True)
    from flax import nnx
    import sigmadecomp as sd
    from sigmadecomp import linen as sdl
    from sigmadecomp.compress import compress_model
    from sigmadecomp.distributed import solve_layers
    from sigmadecomp.models import SmallCNN

    out = {"devices": len(jax.devices())}
    model = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).random((21, 8, 8, 1), np.float32)
    batches = [x[:10], x[10:]]  # the second batch (11 rows) leaves a one-row remainder
    # float64 on every layer with a remainder row; compensated float32 on two layers, even batches
    for dtype, data, layers in (("float64", batches, None), ("float32", [x[:10], x[10:20]], ["conv2", "linear"])):
        one = sd.collect_covariances(model, data, progress=False, dtype=dtype, layers=layers)
        two = sd.collect_covariances(model, data, progress=False, dtype=dtype, layers=layers, devices="all")
        out[dtype] = {p: [float(jnp.max(jnp.abs(one[p].cov - two[p].cov)) / jnp.max(jnp.abs(one[p].cov))),
                          float(jnp.max(jnp.abs(one[p].mean - two[p].mean))),
                          float(one[p].count), float(two[p].count)] for p in one}

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2)))

    module = Linen()
    variables = module.init(jax.random.key(0), jnp.asarray(x[:1]))
    one = sdl.collect_covariances(module, variables, batches, progress=False)
    two = sdl.collect_covariances(module, variables, batches, progress=False, devices=2)
    out["linen"] = max(float(jnp.max(jnp.abs(one[p].cov - two[p].cov)) / jnp.max(jnp.abs(one[p].cov)))
                       for p in one)

    covs = sd.collect_covariances(model, batches, progress=False, dtype="float64")
    paths = ["conv2", "conv3"]
    kernels = [getattr(model, p).kernel[...] for p in paths]
    args = ([sd.SVD(4), sd.Tucker2ALS((4, 4), max_steps=3)], [covs[p].cov for p in paths],
            list(jax.random.split(jax.random.key(0), 2)))
    single = solve_layers(kernels, *args)
    spread = solve_layers(kernels, *args, devices="all")
    out["solve_devices"] = sorted({str(next(iter(s.value.out_factor.devices()))) for s in spread})
    out["solve_identical"] = all(
        bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))  # unused history is NaN
        for s1, s2 in zip(single, spread)
        for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)))

    common = dict(format="svd", norm="sigma", ratio=0.5, skip=("conv1", "linear"),
                  key=jax.random.key(0), progress=False, covariances=covs)
    a = compress_model(model, **common)
    b = compress_model(model, devices="all", **common)
    out["compress_reports_equal"] = a.layers == b.layers
    out["compress_outputs_equal"] = bool(np.array_equal(np.asarray(a.model(x)), np.asarray(b.model(x))))
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def two_devices() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_this_process_keeps_its_devices():
    assert "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    assert resolve_devices(None) is None and resolve_devices(1) is None
    assert resolve_devices("all") == jax.devices()
    with pytest.raises(ValueError, match="JAX sees"):
        resolve_devices(len(jax.devices()) + 1)


def test_data_parallel_covariance_equals_one_device(two_devices):
    assert two_devices["devices"] == 2
    for path, (cov_diff, mean_diff, count_one, count_two) in two_devices["float64"].items():
        assert count_one == count_two, path  # every row counted once, the remainder included
        assert cov_diff < 1e-13 and mean_diff < 1e-13, path  # float64: rounding of the sums only
    for path, (cov_diff, mean_diff, count_one, count_two) in two_devices["float32"].items():
        assert count_one == count_two and cov_diff < 2e-6, path  # compensated float32
    assert two_devices["linen"] < 1e-13


def test_layer_parallel_solves_are_bit_identical(two_devices):
    assert len(two_devices["solve_devices"]) == 2  # the two layers ran on different devices
    assert two_devices["solve_identical"]
    assert two_devices["compress_reports_equal"] and two_devices["compress_outputs_equal"]


def test_assign_devices_balances_cost():
    import numpy as np

    kernels = [np.zeros((3, 3, 64, 64))] * 2 + [np.zeros((3, 3, 16, 16))] * 4
    where = assign_devices(kernels, 2)
    assert where[0] != where[1] and sorted(where[2:]) == [0, 0, 1, 1]


TWO_PROCESSES = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    process, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
    import numpy as np
    from flax import nnx
    import sigmadecomp as sd
    from sigmadecomp.models import SmallCNN

    model = SmallCNN(widths=(4, 8, 8), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).random((16, 8, 8, 1), np.float32)
    mine = [b[process * 4 : (process + 1) * 4] for b in (x[:8], x[8:])]  # this process's rows
    both = sd.collect_covariances(model, mine, progress=False, devices="all")
    alone = sd.collect_covariances(model, [x[:8], x[8:]], progress=False, devices=[jax.local_devices()[0]])
    print(json.dumps({"devices": len(jax.devices()), "count": float(both["conv2"].count),
                      "diff": max(float(np.max(np.abs(np.asarray(alone[p].cov) - np.asarray(both[p].cov))))
                                  for p in alone)}))
''')


@pytest.mark.slow
def test_two_processes_with_jax_distributed():
    """Two CPU processes joined by jax.distributed (gloo): each feeds its own half of every batch
    and both get the statistics of all the images (30 s of CPU, hence slow)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    runs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(i), port], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for result in results:
        assert result["devices"] == 2 and result["count"] == 16 * 64  # 16 images × 8×8 positions
        assert result["diff"] < 1e-13
