"""A bare NumPy loop of the full-batch GR-DPO update: the reference the toolkit is timed against."""
import numpy as np
from scipy.special import expit, log_expit


def bare_full_batch_dpo(S, groups, steps, eta_theta, eta_alpha, beta=1.0, radius=None):
    """Algorithm 1 with full batches, written as plainly as NumPy allows (no logging)."""
    k = int(groups.max()) + 1
    sizes = np.bincount(groups, minlength=k).astype(float)
    inv = (1.0 / sizes)[groups]
    theta = np.zeros(S.shape[1])
    theta_sum = np.zeros_like(theta)
    log_alpha = np.full(k, -np.log(k))
    for _ in range(steps):
        h = S @ theta
        losses = np.bincount(groups, weights=-log_expit(beta * h), minlength=k) / sizes
        log_alpha = log_alpha + eta_alpha * losses
        top = log_alpha.max()
        e = np.exp(log_alpha - top)
        log_alpha = log_alpha - (top + np.log(e.sum()))
        alpha = e / e.sum()
        grad = S.T @ (alpha[groups] * inv * (-beta * expit(-beta * h)))
        theta = theta - eta_theta * grad
        if radius is not None:
            norm = np.sqrt(theta @ theta)
            if norm > radius:
                theta = theta * (radius / norm)
        theta_sum += theta
    return theta_sum / steps, np.exp(log_alpha)
