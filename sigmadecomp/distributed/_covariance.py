"""Data-parallel covariance accumulation over several devices (and hosts).

Each calibration batch is split along its first axis over a one-axis mesh ``("data",)`` of the
given devices. Inside ``shard_map`` every device runs the tapped forward pass on its shard and adds
its shard's patches to a fresh :class:`~sigmadecomp.covariance.MomentState`, with exactly the
per-layer update of the one-device path; the per-device states are then folded with
:func:`sigmadecomp.covariance.merge` in device order (a deterministic sum, Neumaier-compensated in
float32) and merged into the running statistics. In one process the states are copied to the first
device and folded there (no collective); across processes they are ``all_gather``-ed and every
device folds them, so every process ends with the same statistics.

What differs from one device is only the order of floating-point additions (a batch's rows are
summed per shard, then shards are added), so results agree to rounding: ~1e-16 relative in float64,
~1e-7 in float32 (measured in ``benchmarks/multidevice.py``).

**Multi-host.** After ``jax.distributed.initialize(...)`` on every process, ``jax.devices()`` lists
the devices of all hosts. Call the collector on every process with the same model and *that
process's own* batches (the same number of batches, each the same shape, divisible by the number of
local devices): each process's batch becomes its rows of a global array
(``jax.make_array_from_process_local_data``), and the result — the statistics of all processes'
images — is replicated on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sigmadecomp.covariance._stats import MomentState, init, merge

__all__ = ["DataParallel", "batch_pieces", "resolve_devices"]

_AXIS = "data"


def _shard_map():
    if hasattr(jax, "shard_map"):
        return jax.shard_map
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map


def _unchecked_shard_map(f, **kwargs):
    import inspect

    smap = _shard_map()
    flag = "check_vma" if "check_vma" in inspect.signature(smap).parameters else "check_rep"
    return smap(f, **kwargs, **{flag: False})


def resolve_devices(devices) -> list | None:
    """``None`` or ``1`` → ``None`` (one device, the default path); ``"all"`` → ``jax.devices()``;
    an int ``n`` → the first ``n`` of ``jax.devices()``; a sequence of devices as given."""
    if devices is None or (isinstance(devices, int) and not isinstance(devices, bool) and devices == 1):
        return None
    available = jax.devices()
    if devices == "all":
        return list(available)
    if isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices={devices} but JAX sees {len(available)} device(s): {available}")
        return list(available[:devices])
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty; give None, 'all', a count or a list of jax devices")
    return devices


def _fold(gathered, n: int) -> MomentState:
    """Merge the ``n`` per-device states stacked on axis 0, in device order."""
    total = jax.tree.map(lambda v: v[0], gathered)
    for k in range(1, n):
        total = merge(total, jax.tree.map(lambda v, k=k: v[k], gathered))
    return total


# Compiled programs shared by every collector with the same model / layer geometry and devices, so
# a second calibration (or a benchmark's second run) does not compile again.
_FORWARDS: dict = {}
_UPDATES: dict = {}


class DataParallel:
    """Runs ``inputs_fn(params, x)`` (the tapped forward pass: ``{path: [input, ...]}``) and the
    per-layer statistics update data-parallel over ``devices``; see the module docstring.
    ``cache_key`` (hashable, e.g. ``(graphdef, paths, forward)``) names ``inputs_fn`` so its
    compilation is reused across collectors; ``None`` compiles for this collector only."""

    def __init__(self, devices: Sequence, inputs_fn: Callable, params, layer_update: Callable, *,
                 cache_key=None):
        self.devices = tuple(devices)
        self.mesh = Mesh(np.asarray(self.devices), (_AXIS,))
        self.n = len(self.devices)
        self.layer_update = layer_update
        self.collective = jax.process_count() > 1
        self.home = jax.local_devices()[0]
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        key = None if cache_key is None else (cache_key, self.devices)
        if key is None or key not in _FORWARDS:
            forward = jax.jit(_shard_map()(inputs_fn, mesh=self.mesh, in_specs=(P(), P(_AXIS)),
                                           out_specs=P(_AXIS)))
            if key is None:
                self.forward = forward
                return
            _FORWARDS[key] = forward
        self.forward = _FORWARDS[key]

    def _update_fn(self, geometry, state: MomentState):
        """One jitted, sharded update per layer geometry (as the one-device path compiles):
        ``value`` (sharded rows) → every device's statistics of its rows, stacked on axis 0."""
        key = (geometry, state.groups, state.dim, state.cross, jnp.dtype(state.dtype), self.devices,
               self.layer_update, self.collective)
        if key not in _UPDATES:
            groups, dim, cross, dtype, n = state.groups, state.dim, state.cross, state.dtype, self.n
            layer_update = self.layer_update

            def local(value):
                local_state = layer_update(geometry, init(dim, groups=groups, cross=cross, dtype=dtype), value)
                if self.collective:  # several processes: every device folds all the states
                    return _fold(jax.lax.all_gather(local_state, _AXIS), n)
                return jax.tree.map(lambda v: v[None], local_state)

            # collective: every device holds the same fold of the gathered states, replicated by
            # construction (the replication checker cannot see through the fold, hence unchecked)
            out_specs = P() if self.collective else P(_AXIS)
            _UPDATES[key] = jax.jit(_unchecked_shard_map(local, mesh=self.mesh, in_specs=P(_AXIS),
                                                         out_specs=out_specs))
        return _UPDATES[key]

    def _gather_home(self, stacked) -> MomentState:
        """One process: the per-device states (no collective: on a loaded CPU host XLA's
        cross-device rendezvous can time out) copied to the first device, folded in device order."""
        def part(k):
            def take(leaf):
                shard = next(s for s in leaf.addressable_shards if (s.index[0].start or 0) == k)
                return jax.device_put(shard.data[0], self.home)
            return jax.tree.map(take, stacked)

        total = part(0)
        for k in range(1, self.n):
            total = merge(total, part(k))
        return total

    def global_batch(self, x):
        """A host batch (this process's rows) as one array sharded over the mesh's data axis."""
        local = len([d for d in self.mesh.devices.flat if d.process_index == jax.process_index()])
        if np.shape(x)[0] % local:
            raise ValueError(f"a batch of {np.shape(x)[0]} rows cannot be split over {local} local devices; "
                             "use a batch size divisible by the device count")
        sharding = NamedSharding(self.mesh, P(_AXIS))
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    def inputs(self, x) -> dict:
        return self.forward(self.params, self.global_batch(x))

    def update(self, geometry, state: MomentState, value) -> MomentState:
        batch = self._update_fn(geometry, state)(value)
        if not self.collective:
            batch = self._gather_home(batch)
            state = jax.device_put(state, self.home)
        return merge(state, batch)


def batch_pieces(x, parallel: DataParallel | None, single_inputs: Callable, single_update: Callable) -> list:
    """``[(inputs, update), ...]`` for one batch: the rows that split evenly over the devices go
    data-parallel; a single-process remainder (``N mod devices`` rows) runs on one device."""
    if parallel is None:
        return [(single_inputs(x), single_update)]
    local = sum(d.process_index == jax.process_index() for d in parallel.mesh.devices.flat)
    m = x.shape[0] - x.shape[0] % local
    if m < x.shape[0] and jax.process_count() > 1:
        raise ValueError(f"multi-host calibration needs batches divisible by the {local} local devices; "
                         f"got {x.shape[0]} rows")
    pieces = [(parallel.inputs(x[:m]), parallel.update)] if m else []
    if m < x.shape[0]:
        pieces.append((single_inputs(x[m:]), single_update))
    return pieces
