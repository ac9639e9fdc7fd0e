"""The training objectives of SCALE: the closed-form ELBO, IWAE and DReG.

Every function here works per cell; a minibatch loss is their mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from ._prior import _LOG_2PI, GaussianMixturePrior


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Numerically stable ``log(mean(exp(x)))`` along ``dim``."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_p log Bernoulli(x_p; sigmoid(logits_p))``, computed from logits.

    ``x`` is the dense binary minibatch of shape ``(B, P)``; ``logits`` is ``(..., B, P)``.
    """
    return (x * logits - F.softplus(logits)).sum(-1)


def gaussian_entropy(qz_v: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian with variances ``qz_v``, summed over dimensions."""
    return 0.5 * (1.0 + _LOG_2PI + qz_v.log()).sum(-1)


def gmm_kl(
    prior: GaussianMixturePrior,
    qz_m: torch.Tensor,
    qz_v: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """The KL part of SCALE's ELBO, in closed form over ``q(z|x)``.

    ``KL(q(z,c|x) || p(z,c)) = E_q(z|x)[log q(z|x)] + sum_c gamma_c log gamma_c
    - sum_c gamma_c (log pi_c + E_q(z|x)[log N(z; mu_c, sigma2_c)])`` with
    ``q(c|x) = gamma``.

    Parameters
    ----------
    prior
        The Gaussian-mixture prior.
    qz_m, qz_v
        Mean and variance of ``q(z|x)``, shape ``(B, D)``.
    gamma
        ``q(c|x)``, shape ``(B, K)``; SCALE uses the responsibilities ``p(c|z)``.

    Returns
    -------
    Per-cell KL, shape ``(B,)``.
    """
    expected_joint = prior.expected_component_log_prob(qz_m, qz_v) + prior.log_weights
    log_gamma = gamma.clamp_min(torch.finfo(gamma.dtype).tiny).log()
    cross = (gamma * (expected_joint - log_gamma)).sum(-1)
    return -cross - gaussian_entropy(qz_v)


def importance_log_weights(
    log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    prior: GaussianMixturePrior,
    qz_m: torch.Tensor,
    qz_v: torch.Tensor,
    n_particles: int,
    kl_weight: float = 1.0,
    dreg: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log importance weights ``log p(x|z_k) + log p(z_k) - log q(z_k|x)``, ``z_k ~ q(z|x)``.

    Parameters
    ----------
    log_likelihood
        Maps particles ``(k, B, D)`` to ``log p(x|z)`` of shape ``(k, B)``.
    prior
        The Gaussian-mixture prior; its exact log-density is used.
    qz_m, qz_v
        Parameters of ``q(z|x)``, shape ``(B, D)``.
    n_particles
        Number of particles ``K``.
    kl_weight
        Weight on ``log p(z) - log q(z|x)`` (KL warm-up); 1 gives the true weights.
    dreg
        Doubly-reparameterized gradients: ``q``'s parameters are detached inside
        ``log q`` and the gradient reaching the particles is multiplied by the normalized
        weights, so the encoder sees squared normalized weights while the decoder and the
        prior keep the IWAE gradient. Use with :func:`iwae_bound`.
    chunk_size
        Particles decoded at a time; with gradients each chunk is checkpointed, so memory
        grows with the chunk, not with ``K``.

    Returns
    -------
    ``(log_w, log_lik)``, both of shape ``(K, B)``.
    """
    qz_s = qz_v.sqrt()
    eps = torch.randn((n_particles, *qz_m.shape), dtype=qz_m.dtype, device=qz_m.device)
    z = qz_m + qz_s * eps
    q_m, q_s = (qz_m.detach(), qz_s.detach()) if dreg else (qz_m, qz_s)
    log_q = torch.distributions.Normal(q_m, q_s).log_prob(z).sum(-1)
    log_p = prior.log_prob(z)

    chunk_size = chunk_size or n_particles
    grad = torch.is_grad_enabled() and z.requires_grad
    pieces = []
    for start in range(0, n_particles, chunk_size):
        z_chunk = z[start : start + chunk_size]
        if grad and chunk_size < n_particles:
            from torch.utils.checkpoint import checkpoint

            pieces.append(checkpoint(log_likelihood, z_chunk, use_reentrant=False))
        else:
            pieces.append(log_likelihood(z_chunk))
    log_lik = torch.cat(pieces, dim=0)
    log_w = log_lik + kl_weight * (log_p - log_q)

    if dreg and grad:
        weights = torch.softmax(log_w.detach(), dim=0)
        z.register_hook(lambda g: g * weights.unsqueeze(-1))
    return log_w, log_lik


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound ``log (1/K) sum_k w_k`` per cell (``K`` along dim 0)."""
    return log_mean_exp(log_w, dim=0)
