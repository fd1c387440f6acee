"""Shared test helpers: planted problems, covariances, and independent float64 oracles.

Everything here is plain NumPy float64 written from the maths (DESIGN.md §1–2); it never calls
sigmadecomp, so a bug in the library cannot hide in its own reference. Matrices use the package
layout ``W (cout × d)``, ``d = cin·P`` with column index ``c·P + p``.
"""

from __future__ import annotations

import numpy as np

COV_KINDS = ("identity", "diagonal", "ill", "singular")


def random_cov(kind: str, d: int, seed: int = 0) -> np.ndarray:
    """A PSD ``(d, d)`` float64 matrix: identity, diagonal, ill-conditioned (cond 1e6) or singular
    (rank d/2, like dead ReLU channels / too few samples)."""
    rng = np.random.default_rng(seed)
    if kind == "identity":
        return np.eye(d)
    if kind == "diagonal":
        return np.diag(rng.uniform(0.1, 3.0, d))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if kind == "ill":
        return (q * np.logspace(0, -6, d)[None, :]) @ q.T
    if kind == "singular":
        x = rng.standard_normal((d // 2, d))
        return x.T @ x / (d // 2)
    raise ValueError(kind)


def kron_lift(in_factor: np.ndarray, p: int) -> np.ndarray:
    """``U_in ⊗ I_P``, formed explicitly (fine for the oracles' small sizes)."""
    return np.kron(in_factor, np.eye(p))


def tucker2_matrix(out_factor, core_matrix, in_factor, p: int) -> np.ndarray:
    """``W̃ = U_out G (U_in ⊗ I_P)ᵀ`` with ``G`` ``(r_out, r_in·P)``."""
    return out_factor @ core_matrix @ kron_lift(in_factor, p).T


def planted_tucker2(cout, cin, p, ranks, *, noise=0.0, seed=0):
    """``(W, (U_out, G, U_in))`` with ``W = W_true + noise·‖W_true‖/√(cout·d)·N(0, 1)``."""
    rng = np.random.default_rng(seed)
    r_out, r_in = ranks
    u = np.linalg.qr(rng.standard_normal((cout, r_out)))[0]
    x = np.linalg.qr(rng.standard_normal((cin, r_in)))[0]
    g = rng.standard_normal((r_out, r_in * p))
    w = tucker2_matrix(u, g, x, p)
    w = w + noise * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape)
    return w, (u, g, x)


def planted_lowrank(cout, d, rank, *, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, rank)) @ rng.standard_normal((rank, d))
    return w + noise * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape)


def matrix_to_conv(w, kh, kw):
    """``W (cout, cin·kh·kw)`` → Flax kernel ``(kh, kw, cin, cout)`` (written independently)."""
    cout = w.shape[0]
    return np.transpose(w.reshape(cout, -1, kh, kw), (2, 3, 1, 0))


def ridged(cov, ridge=1e-6):
    d = cov.shape[0]
    scale = np.trace(cov) / d
    return cov + ridge * (scale if scale > 0 else 1.0) * np.eye(d)


def objective(approx, metric, target, energy) -> float:
    """Relative ``f = (tr(W̃ M W̃ᵀ) − 2 tr(T W̃ᵀ) + energy) / energy`` in float64."""
    approx = np.asarray(approx, np.float64)
    f = np.sum((approx @ metric) * approx) - 2 * np.sum(target * approx) + energy
    return f / energy


def sigma_error(w, approx, cov) -> float:
    """``tr(Δ cov Δᵀ) / tr(W cov Wᵀ)`` in float64 (direct form)."""
    w, delta = np.asarray(w, np.float64), np.asarray(w, np.float64) - np.asarray(approx, np.float64)
    return np.sum((delta @ cov) * delta) / np.sum((w @ cov) * w)


def best_rank_sigma(target, metric, rank):
    """Rank-``rank`` minimiser of ``tr(W̃ M W̃ᵀ) − 2 tr(T W̃ᵀ)`` by symmetric whitening
    ``M^{1/2}`` (eigh), a different route from the library's Cholesky."""
    w_eig, v = np.linalg.eigh(metric)
    root = (v * np.sqrt(w_eig)) @ v.T
    inv_root = (v / np.sqrt(w_eig)) @ v.T
    u, s, vt = np.linalg.svd(target @ inv_root, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank] @ inv_root, root


# --- dense normal-equation block ALS for Tucker-2 Σ (three blocks: U_out, G, U_in) -----------


def _solve_spd(h, b):
    return np.linalg.lstsq(h, b, rcond=None)[0]


def oracle_out(target, metric, g, x, p):
    """``U_out`` minimiser: ``U (Z M Zᵀ) = T Zᵀ`` with ``Z = G V ᵀ``."""
    z = g @ kron_lift(x, p).T
    return _solve_spd(z @ metric @ z.T, z @ target.T).T


def oracle_core(target, metric, u, x, p):
    """``G`` minimiser from the explicit Kronecker normal equations ``(UᵀU ⊗ VᵀMV) vec G = vec(UᵀTV)``."""
    v = kron_lift(x, p)
    h = np.kron(u.T @ u, v.T @ metric @ v)
    rhs = (u.T @ target @ v).reshape(-1)
    return _solve_spd(h, rhs).reshape(u.shape[1], -1)


def oracle_in(target, metric, u, g, x_shape, p):
    """``U_in`` minimiser: ``W̃`` is linear in ``U_in``; build its Jacobian ``J`` column by column
    and solve ``Jᵀ (I ⊗ M) J x = Jᵀ vec(T)``."""
    cin, r_in = x_shape
    cols = []
    for idx in range(cin * r_in):
        e = np.zeros(cin * r_in)
        e[idx] = 1.0
        cols.append(tucker2_matrix(u, g, e.reshape(cin, r_in), p).reshape(-1))
    jac = np.stack(cols, axis=1)
    big = np.kron(np.eye(u.shape[0]), metric)
    return _solve_spd(jac.T @ big @ jac, jac.T @ target.reshape(-1)).reshape(cin, r_in)


def oracle_tucker2_als(target, metric, energy, u, g, x, p, sweeps):
    """Block ALS (U_out, G, U_in) from ``(u, g, x)``; returns the relative error after each
    block update (monotone by construction) and the final factors."""
    history = [objective(tucker2_matrix(u, g, x, p), metric, target, energy)]
    for _ in range(sweeps):
        u = oracle_out(target, metric, g, x, p)
        history.append(objective(tucker2_matrix(u, g, x, p), metric, target, energy))
        g = oracle_core(target, metric, u, x, p)
        history.append(objective(tucker2_matrix(u, g, x, p), metric, target, energy))
        x = oracle_in(target, metric, u, g, x.shape, p)
        history.append(objective(tucker2_matrix(u, g, x, p), metric, target, energy))
    return np.array(history), (u, g, x)
