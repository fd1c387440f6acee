"""Sequential (error-correcting) calibration and bias correction.

Parallel calibration (:func:`sigmadecomp.compress.compress_model`) fits every layer to the original
network's inputs. Here the layers are compressed in forward execution order, each fitted to the
inputs it sees in the partially compressed network, ``min E‖W x − W̃ x̂‖²`` (DESIGN.md §1), and
optionally bias-corrected so its mean output on the calibration data equals the original's.

* :func:`compress_sequential` — the sequential pipeline (returns a ``Compressed``, like
  ``compress_model``), with ``bias_correction=True`` for mean-corrected layers;
* :func:`correct_bias` — bias correction of an already compressed model (e.g. after parallel
  calibration), layer by layer in execution order;
* :func:`execution_order` — the order in which a forward pass calls a model's layers;
* :func:`forward_stages` — the stages whose composition is the forward pass (the activation-cache
  protocol: a model may define ``forward_stages()``; CifarResNet is built in);
* :func:`output_shift` — the exact mean shift ``W·E[x] − W̃·E[x̂]`` of one layer.
"""

from sigmadecomp.calibration._activations import execution_order, forward_stages
from sigmadecomp.calibration._bias import output_shift
from sigmadecomp.calibration._sequential import compress_sequential, correct_bias

__all__ = [
    "compress_sequential",
    "correct_bias",
    "execution_order",
    "forward_stages",
    "output_shift",
]
