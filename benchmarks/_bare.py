"""Bare NumPy loops of the GR-DPO updates: the references the toolkit is timed against."""
import math

import numpy as np
from scipy.special import expit, log_expit


def bare_full_batch_dpo(S, groups, steps, eta_theta, eta_alpha, beta=1.0, radius=None):
    """Algorithm 1 with full batches, written as plainly as NumPy allows (no logging): the losses and
    the K group-gradient sums from one pass (G = W S, W holding ℓ'_i in row g_i), then the α step,
    then the θ step — the toolkit's arithmetic, in the same order."""
    k = int(groups.max()) + 1
    n = S.shape[0]
    sizes = np.bincount(groups, minlength=k).astype(float)
    cols = np.arange(n)
    theta = np.zeros(S.shape[1])
    theta_sum = np.zeros_like(theta)
    log_alpha = np.full(k, -np.log(k))
    for _ in range(steps):
        z = beta * (S @ theta)
        value, deriv = -log_expit(z), -beta * expit(-z)
        losses = np.bincount(groups, weights=value, minlength=k) / sizes
        log_alpha = log_alpha + eta_alpha * losses
        log_alpha = log_alpha - log_alpha.max()
        e_alpha = np.exp(log_alpha)
        total = e_alpha.sum()
        log_alpha = log_alpha - np.log(total)
        alpha = e_alpha / total
        weights = np.zeros((k, n))
        weights[groups, cols] = deriv
        theta = theta - eta_theta * ((alpha / sizes) @ (weights @ S))
        if radius is not None:
            norm = np.sqrt(theta @ theta)
            if norm > radius:
                theta = (theta / norm) * radius
        theta_sum += theta
    return theta_sum / steps, np.exp(log_alpha)


def bare_stochastic_dpo(S, groups, ref, indices, eta_theta, eta_alpha, beta=1.0, radius=None):
    """Algorithm 1 with one pair per step, as plainly as NumPy allows (pairs given in ``indices``),
    in the toolkit's arithmetic and order (so the iterates are identical)."""
    k = int(groups.max()) + 1
    sizes = np.bincount(groups, minlength=k).astype(float)
    scale = S.shape[0] * (1.0 / sizes)[groups]
    theta = np.zeros(S.shape[1])
    theta_sum = np.zeros_like(theta)
    log_alpha = np.full(k, -np.log(k))
    alpha_sum = np.zeros(k)
    for i in indices:
        s, g = S[i], groups[i]
        z = beta * (float(s @ theta) - ref[i])
        e = math.exp(-z) if z > 0 else math.exp(z)
        value, deriv = (math.log1p(e), -beta * e / (1.0 + e)) if z > 0 else (-z + math.log1p(e), -beta / (1.0 + e))
        log_alpha[g] += eta_alpha * 1.0 * scale[i] * value
        log_alpha -= log_alpha.max()
        w = np.exp(log_alpha)
        total = w.sum()
        log_alpha -= np.log(total)
        alpha = w / total
        theta = theta - eta_theta * ((scale[i] * alpha[g] * deriv) * s)
        if radius is not None:
            norm = math.sqrt(theta @ theta)
            if norm > radius:
                theta = (theta / norm) * radius
        theta_sum += theta
        alpha_sum += alpha
    return theta_sum / len(indices), alpha_sum / len(indices)
