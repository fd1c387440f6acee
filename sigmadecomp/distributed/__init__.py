"""Several devices and hosts: data-parallel calibration and layer-parallel solving, with JAX's own
runtime (``jax.sharding`` meshes, ``shard_map``, ``jax.distributed``).

* :class:`DataParallel` — each calibration batch split over a ``("data",)`` mesh; per-device
  moments merged in device order (used by ``collect_covariances(..., devices=...)``);
* :func:`solve_layers` — independent layers' solves spread over devices (used by
  ``compress_model(..., devices=...)``);
* :func:`resolve_devices` — ``None`` / ``"all"`` / a count / a list → devices.

**Several hosts.** Start one process per host and call, before anything else,
``jax.distributed.initialize(coordinator_address="host0:1234", num_processes=N, process_id=i)``
(on a managed cluster — SLURM, TPU pods — the arguments are found automatically). Then
``jax.devices()`` spans all hosts: ``collect_covariances(model, my_batches, devices="all")`` on
every process, each with its own images (same number and shape of batches per process), returns
the statistics of all images on every process. Layer solves then run on the local devices of
each process (``solve_layers(..., devices=jax.local_devices())``), every process solving all layers
(cheap next to calibration) or a share of them chosen by ``jax.process_index()``.
On CPU, multi-process collectives need ``jax.config.update("jax_cpu_collectives_implementation",
"gloo")``.
"""

from sigmadecomp.distributed._covariance import DataParallel, resolve_devices
from sigmadecomp.distributed._layers import assign_devices, solve_layers

__all__ = ["DataParallel", "assign_devices", "resolve_devices", "solve_layers"]
