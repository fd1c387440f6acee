"""``sigmadecomp demo``: the whole story in about a minute on a laptop CPU, nothing to download.

Train :class:`~sigmadecomp.models.SmallCNN` on scikit-learn's digits, calibrate on a few hundred
training images, compress ``conv2`` and ``conv3`` with classic ALS (Frobenius) and Σ-ALS (Tucker-2
and CP) at several parameter ratios, and compare test accuracy and the relative Σ-error.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from sigmadecomp import compress as _compress
from sigmadecomp.data import batches, load_digits, sample
from sigmadecomp.models import SmallCNN

__all__ = ["DemoConfig", "DemoResult", "format_table", "run_demo", "train_classifier"]

PLOT_NAME = "sigmadecomp_demo.png"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``quick`` is a seconds-long smoke run, not a meaningful comparison."""

    # conv2 and conv3 share one kernel shape, so each format × norm × ratio compiles one solver
    widths: tuple[int, int, int] = (64, 64, 64)
    train_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    calib: int = 256
    ratios: tuple[float, ...] = (0.25, 0.1, 0.05)
    formats: tuple[str, ...] = ("tucker2", "cp")
    max_steps: int = 10  # Tucker-2 Σ settles in 2-3 sweeps; CP keeps creeping down slowly

    @classmethod
    def quick(cls) -> DemoConfig:
        # one format and ratio: the time goes into compiling one solver per layer shape and rank
        return cls(widths=(16, 16, 16), train_steps=60, calib=64, ratios=(0.25,),
                   formats=("tucker2",), max_steps=5)


@nnx.jit
def _train_step(model, optimizer, images, labels):
    def loss_fn(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _endless_batches(images, labels, *, batch_size, key):
    """Shuffled epochs (a fresh permutation from ``key`` each epoch), forever."""
    while True:
        key, epoch_key = jax.random.split(key)
        yield from batches(images, labels, batch_size=batch_size, key=epoch_key, drop_remainder=True)


def train_classifier(
    model: nnx.Module,
    images,
    labels,
    *,
    key: jax.Array,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> float:
    """Train ``model`` in place with Adam on softmax cross-entropy; returns the last batch loss.

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> model = SmallCNN(widths=(4, 4, 4), rngs=nnx.Rngs(0))
    >>> x, y = np.zeros((8, 8, 8, 1), np.float32), np.zeros(8, np.int32)
    >>> train_classifier(model, x, y, key=jax.random.key(0), steps=2, batch_size=4,
    ...                  progress=False) >= 0.0
    True
    """
    if batch_size > len(labels):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(labels)} training examples")
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    stream = _endless_batches(images, labels, batch_size=batch_size, key=key)
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    loss = jnp.nan
    # optax's Adam mixes its int32 step count with Python floats, which strict dtype promotion
    # (used by the test suite) rejects; the update itself is plain float32 either way.
    with jax.numpy_dtype_promotion("standard"):
        for step in bar:
            x, y = next(stream)
            loss = _train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return float(loss)


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One compressed model of the demo's table."""

    format: str
    norm: str
    ratio: float
    accuracy: float  # test accuracy
    agreement: float  # top-1 agreement with the uncompressed model on the test set
    params: int  # parameters of the whole compressed model
    mean_relative_error: float  # mean relative Σ-error of the compressed layers
    seconds: float


@dataclasses.dataclass(frozen=True)
class DemoResult:
    rows: tuple[DemoRow, ...]
    train_accuracy: float
    test_accuracy: float
    params: int  # parameters of the uncompressed model
    compressed_layers: tuple[str, ...]
    plot_path: pathlib.Path
    seconds: float


def format_table(result: DemoResult) -> str:
    """The demo's results as a fixed-width text table (one row per format × norm × ratio)."""
    header = ("format", "norm", "ratio", "accuracy", "agreement", "params", "mean Σ-error")
    lines = [f"{header[0]:<8} {header[1]:<9} {header[2]:>5} {header[3]:>8} {header[4]:>9} "
             f"{header[5]:>7} {header[6]:>12}"]
    lines.append(f"{'dense':<8} {'-':<9} {1.0:>5.2f} {result.test_accuracy:>8.2%} {1.0:>9.2%} "
                 f"{result.params:>7d} {0.0:>12.4f}")
    for r in result.rows:
        lines.append(f"{r.format:<8} {r.norm:<9} {r.ratio:>5.2f} {r.accuracy:>8.2%} "
                     f"{r.agreement:>9.2%} {r.params:>7d} {r.mean_relative_error:>12.4f}")
    return "\n".join(lines)


def _plot(result_rows, test_accuracy: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for color, fmt in enumerate(dict.fromkeys(r.format for r in result_rows)):
        for norm, style in (("frobenius", "--o"), ("sigma", "-s")):
            rows = sorted((r for r in result_rows if (r.format, r.norm) == (fmt, norm)),
                          key=lambda r: r.ratio)
            label = f"{fmt}, {'Σ' if norm == 'sigma' else 'Frobenius'}"
            ax.plot([r.ratio for r in rows], [100 * r.accuracy for r in rows], style,
                    color=f"C{color}", label=label)  # one colour per format, dashed = Frobenius
    ax.axhline(100 * test_accuracy, color="grey", lw=1, ls=":", label="uncompressed")
    ax.set(xlabel="parameter ratio of the compressed convs", ylabel="test accuracy (%)",
           title="digits CNN: Frobenius vs Σ decomposition, no fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compress_row(model, covariances, digits, *, fmt, norm, ratio, key, config, progress) -> DemoRow:
    result = _compress.compress_model(
        model, format=fmt, norm=norm, ratio=ratio, skip=lambda path: path not in covariances,
        key=key, max_steps=config.max_steps, covariances=covariances, progress=progress,
    )
    scores = _compress.evaluate_agreement(model, result.model, digits.test_images, digits.test_labels)
    return DemoRow(fmt, norm, ratio, scores["accuracy"], scores["agreement"],
                   _compress.count_params(result.model), result.mean_relative_error, result.seconds)


def run_demo(
    *,
    out_dir=".",
    key: int = 0,
    quick: bool = False,
    progress: bool = True,
    config: DemoConfig | None = None,
    log=print,
) -> DemoResult:
    """Train, calibrate, compress with every format × norm × ratio, tabulate and plot.

    ``log`` receives the human-readable lines (``None``: silent). Returns a :class:`DemoResult`;
    the plot is written to ``out_dir/sigmadecomp_demo.png``.
    """
    start = time.perf_counter()
    log = log or (lambda line: None)
    config = config or (DemoConfig.quick() if quick else DemoConfig())
    data_key, init_key, train_key, calib_key, compress_key = jax.random.split(jax.random.key(key), 5)
    digits = load_digits(key=data_key)
    model = SmallCNN(widths=config.widths, rngs=nnx.Rngs(params=init_key))
    train_classifier(model, digits.train_images, digits.train_labels, key=train_key,
                     steps=config.train_steps, batch_size=config.batch_size,
                     learning_rate=config.learning_rate, progress=progress)
    train_acc = _accuracy(model, digits.train_images, digits.train_labels)
    test_acc = _accuracy(model, digits.test_images, digits.test_labels)
    params = _compress.count_params(model)
    log(f"SmallCNN{config.widths}: {params} parameters, {config.train_steps} Adam steps in "
        f"{time.perf_counter() - start:.1f} s; accuracy train {train_acc:.2%}, test {test_acc:.2%}")
    calib = sample(digits.train_images, None, config.calib, key=calib_key)
    covariances = _compress.calibrate(model, calib, layers=COMPRESSED, progress=progress)
    log(f"calibrated {', '.join(COMPRESSED)} on {config.calib} training images")
    rows = []
    for fmt in config.formats:
        for ratio in config.ratios:
            for norm in _compress.NORMS:
                rows.append(_compress_row(model, covariances, digits, fmt=fmt, norm=norm,
                                          ratio=ratio, key=compress_key, config=config,
                                          progress=progress))
    plot_path = pathlib.Path(out_dir) / PLOT_NAME
    _plot(rows, test_acc, plot_path)
    result = DemoResult(tuple(rows), train_acc, test_acc, params, COMPRESSED, plot_path,
                        time.perf_counter() - start)
    log(format_table(result))
    log(f"plot: {plot_path}  (total {result.seconds:.1f} s)")
    return result


COMPRESSED = ("conv2", "conv3")  # conv1 has one input channel; the classifier stays dense


def _accuracy(model, images, labels) -> float:
    return float(np.mean(_compress.predict_labels(model, images) == labels))
