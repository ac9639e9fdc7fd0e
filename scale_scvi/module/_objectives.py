"""The training objectives of SCALE: the closed-form ELBO, IWAE and DReG.

Every function here works per cell; a minibatch loss is their mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.distributions import Normal
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ._components import csr_row_indices
from ._prior import _LOG_2PI, GaussianMixturePrior


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Numerically stable ``log(mean(exp(x)))`` along ``dim``."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


class _SparseBernoulliLogLikelihood(torch.autograd.Function):
    """``sum_p x_p l_p - softplus(l_p)`` for a sparse CSR ``x``, without densifying it.

    The ``x_p l_p`` part is a gather of the logits at the nonzeros of ``x``; the gradient
    with respect to the logits, ``x - sigmoid(l)``, is built in one tensor: ``sigmoid(l)``
    with ``x`` subtracted at the nonzeros, scaled in place.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values):
        flat = logits.reshape(-1, *logits.shape[-2:])  # (particles, B, P)
        at_nonzeros = flat[:, rows, cols] * values  # (particles, nnz)
        positive = flat.new_zeros(flat.shape[:2]).index_add_(1, rows, at_nonzeros)
        ctx.save_for_backward(logits, rows, cols, values)
        return (positive - F.softplus(flat).sum(-1)).reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, rows, cols, values = ctx.saved_tensors
        grad = torch.sigmoid(logits, out=logits.new_empty(logits.shape))  # contiguous
        flat = grad.view(-1, *logits.shape[-2:])
        flat.index_put_(
            (torch.arange(flat.shape[0], device=grad.device).unsqueeze(-1), rows, cols),
            -values.expand(flat.shape[0], -1),
            accumulate=True,
        )
        grad.mul_(grad_out.unsqueeze(-1).neg())
        return grad, None, None, None


#: Where the complementary log-log link's rate ``exp(eta)`` continues as its tangent line
#: (:func:`cloglog_rate`): a rate of ``exp(10)``, about 22,000 fragments in one peak of one
#: cell, which no cell has; the open probability there is 1 to float precision.
CLOGLOG_ETA_MAX = 10.0
_RATE_AT_MAX = math.exp(CLOGLOG_ETA_MAX)


def _beyond_max(eta: torch.Tensor) -> bool:
    """Whether any ``eta`` is above :data:`CLOGLOG_ETA_MAX` (one reduction, no copy).

    Off the CPU the answer is ``True`` without looking: reading it would wait for the device
    at every step, and the tangent-line form of :func:`cloglog_rate` is exact below the
    maximum too (it adds ``exp(T) * 0``), only a few elementwise passes dearer.
    """
    if eta.device.type != "cpu":
        return True
    return eta.numel() > 0 and bool(eta.detach().amax() > CLOGLOG_ETA_MAX)


def cloglog_rate(eta: torch.Tensor, beyond: bool | None = None) -> torch.Tensor:
    """The rate of the complementary log-log link: ``exp(eta)`` up to
    :data:`CLOGLOG_ETA_MAX`, then its tangent line ``exp(T) (1 + eta - T)``.

    Below ``T`` it is ``exp(eta)`` bit for bit. Above, a closed peak's term ``-rate`` grows
    linearly instead of exponentially, so that a runaway ``eta`` (an outlying latent value
    on a small dataset trained long) gives a bounded gradient, and never a float32 rate of
    ``inf`` (``eta > 88``) or one so large that the loss is lost to rounding. ``beyond``:
    :func:`_beyond_max` of ``eta`` when the caller has it.
    """
    if not (_beyond_max(eta) if beyond is None else beyond):
        return torch.exp(eta)
    excess = (eta - CLOGLOG_ETA_MAX).clamp_min(0.0)
    return torch.exp(eta.clamp_max(CLOGLOG_ETA_MAX)) + _RATE_AT_MAX * excess


class _SparseCloglogLogLikelihood(torch.autograd.Function):
    """``sum_p x_p log(1 - exp(-lambda_p)) - (1 - x_p) lambda_p``, ``lambda`` =
    :func:`cloglog_rate` of ``eta``, for a binary sparse CSR ``x``, without densifying it.

    The open peaks' terms are a gather at the nonzeros of ``x``; the closed peaks' rates are
    the sum over all peaks minus that over the open ones, accumulated in float64 (a peak
    whose rate is large contributes to both sums). The gradient with respect to ``eta``,
    ``x lambda / (1 - exp(-lambda)) - lambda``, is built in one tensor.
    """

    @staticmethod
    def forward(ctx, eta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        flat = eta.reshape(-1, *eta.shape[-2:])  # (particles, B, P)
        ctx.linear_tail = _beyond_max(flat)
        rate = cloglog_rate(flat, ctx.linear_tail)
        at = rate[:, rows, cols]  # (particles, nnz)
        open_ll = flat.new_zeros(flat.shape[:2]).index_add_(1, rows, _log_open(at))
        open_rate = flat.new_zeros(flat.shape[:2], dtype=torch.float64)
        open_rate.index_add_(1, rows, at.double())
        closed = rate.sum(-1, dtype=torch.float64) - open_rate
        ctx.save_for_backward(rate, at, rows, cols)
        ctx.shape = eta.shape
        return (open_ll - closed.to(flat.dtype)).reshape(eta.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rate, at, rows, cols = ctx.saved_tensors
        # d lambda / d eta: lambda itself, or exp(T) on the tangent line beyond T
        slope, slope_at = rate, at
        if ctx.linear_tail:
            slope, slope_at = rate.clamp_max(_RATE_AT_MAX), at.clamp_max(_RATE_AT_MAX)
        # d/d eta of log(1 - exp(-lambda)) + lambda at the open peaks, where -lambda is added
        # below for every peak
        open_grad = slope_at / (-torch.expm1(-at)).clamp_min(torch.finfo(at.dtype).tiny)
        grad = slope.neg()
        index = (torch.arange(grad.shape[0], device=grad.device).unsqueeze(-1), rows, cols)
        grad.index_put_(index, open_grad, accumulate=True)
        grad.mul_(grad_out.reshape(grad.shape[:2]).unsqueeze(-1))
        return grad.reshape(ctx.shape), None, None


def _log_open(rate: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-rate))``, the log-probability that a peak of that rate is open."""
    return torch.log((-torch.expm1(-rate)).clamp_min(torch.finfo(rate.dtype).tiny))


def cloglog_log_likelihood(eta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_p log Bernoulli(x_p; 1 - exp(-exp(eta_p)))``: the complementary log-log link.

    A peak is open when at least one fragment falls in it; with Poisson fragments of rate
    ``exp(eta_p)`` that probability is ``1 - exp(-exp(eta_p))``, and a cell's depth
    multiplies the rate (adds to ``eta``). ``x`` is the binarized minibatch of shape
    ``(B, P)``, dense or a sparse CSR tensor; ``eta`` is ``(..., B, P)``. Returns shape
    ``(..., B)``. Above ``eta`` = :data:`CLOGLOG_ETA_MAX` the rate continues linearly
    (:func:`cloglog_rate`).
    """
    if x.layout == torch.strided:
        rate = cloglog_rate(eta)
        return torch.where(x > 0, _log_open(rate), -rate).sum(-1)
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    return _SparseCloglogLogLikelihood.apply(eta, csr_row_indices(x), x.col_indices().long())


def atac_log_likelihood(eta: torch.Tensor, x: torch.Tensor, link: str) -> torch.Tensor:
    """``sum_p log Bernoulli(x_p; p_p)`` with ``p = open_probability(eta, link)``."""
    if link == "cloglog":
        return cloglog_log_likelihood(eta, x)
    return bernoulli_log_likelihood(eta, x)


def open_probability(eta: torch.Tensor, link: str) -> torch.Tensor:
    """The probability that a peak is open, from the decoder's output ``eta``."""
    if link == "cloglog":
        return -torch.expm1(-torch.exp(eta))
    return torch.sigmoid(eta)


def inverse_link(p: torch.Tensor, link: str, eps: float = 1e-7) -> torch.Tensor:
    """``eta`` with ``open_probability(eta, link) = p`` (``p`` clamped to ``[eps, 1 - eps]``)."""
    p = p.clamp(eps, 1 - eps)
    if link == "cloglog":
        return torch.log(-torch.log1p(-p))
    return torch.logit(p)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_p log Bernoulli(x_p; sigmoid(logits_p))``, computed from logits.

    ``x`` is the binary minibatch of shape ``(B, P)``, dense or a sparse CSR tensor (then
    never densified: the cost of the sparse part is that of its nonzeros); ``logits`` is
    ``(..., B, P)``. Returns shape ``(..., B)``.
    """
    if x.layout == torch.strided:
        return (x * logits - F.softplus(logits)).sum(-1)
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    return _SparseBernoulliLogLikelihood.apply(
        logits, csr_row_indices(x), x.col_indices().long(), x.values().to(logits.dtype)
    )


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


def mean_field_responsibilities(
    prior: GaussianMixturePrior, qz_m: torch.Tensor, qz_v: torch.Tensor
) -> torch.Tensor:
    """The ``q(c|x)`` that maximizes the mean-field ELBO for a given ``q(z|x)``.

    ``q*(c|x) = softmax_c(log pi_c + E_q(z|x)[log N(z; mu_c, sigma2_c)])``, in closed form.
    It differs from ``p(c | z = E[z])`` by the term ``-0.5 sum_d s2_d / sigma2_cd`` inside
    the softmax; with it, the KL of :func:`gmm_kl` reduces to
    ``-E_q[log q(z|x)] - logsumexp_c(log pi_c + E_q[log N(z; mu_c, sigma2_c)])``.

    Returns
    -------
    Tensor of shape ``(B, K)`` whose rows sum to one.
    """
    return torch.softmax(prior.expected_component_log_prob(qz_m, qz_v) + prior.log_weights, -1)


def chunked_log_likelihood(
    log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log p(x|z)`` of particles ``z`` of shape ``(K, B, D)``, decoded in chunks.

    Without gradients each chunk's decoder output is freed before the next is decoded. With
    gradients (and more than one chunk) every chunk is checkpointed: only its particles are
    kept for the backward pass, which decodes the chunk again. Peak memory therefore grows
    with ``chunk_size * B * P``, not with ``K * B * P``, in both cases.

    Returns
    -------
    Tensor of shape ``(K, B)``.
    """
    n_particles = z.shape[0]
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    chunk_size = min(chunk_size or n_particles, n_particles)
    if chunk_size == n_particles:
        return log_likelihood(z)
    checkpointed = torch.is_grad_enabled() and z.requires_grad
    pieces = []
    for start in range(0, n_particles, chunk_size):
        z_chunk = z[start : start + chunk_size]
        if checkpointed:
            pieces.append(checkpoint(log_likelihood, z_chunk, use_reentrant=False))
        else:
            pieces.append(log_likelihood(z_chunk))
    return torch.cat(pieces, dim=0)


def importance_log_weights(
    log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    prior: GaussianMixturePrior,
    qz_m: torch.Tensor,
    qz_v: torch.Tensor,
    n_particles: int,
    kl_weight: float = 1.0,
    dreg: bool = False,
    chunk_size: int | None = None,
    return_log_ratio: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Log importance weights ``log p(x|z_k) + log p(z_k) - log q(z_k|x)``, ``z_k ~ q(z|x)``.

    ``log p(z)`` is the exact mixture density
    ``logsumexp_c(log pi_c + log N(z; mu_c, sigma2_c))``.

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
        Weight ``beta`` on ``log p(z) - log q(z|x)`` (KL warm-up); 1 gives the true weights.
    dreg
        Doubly-reparameterized gradients (Tucker et al., 2019), for use with
        :func:`iwae_bound`. ``q``'s parameters are detached inside ``log q`` (its score
        term is dropped), and the gradient reaching particle ``k`` is multiplied by
        ``1 - beta + beta * w~_k`` (``w~`` the normalized weights), so the encoder receives
        ``sum_k w~_k^2 d log w_k / d z_k * d z_k / d phi`` at ``beta = 1``, an unbiased
        estimate of the IWAE gradient for any ``beta``. The decoder and the prior keep the
        plain IWAE gradient.
    chunk_size
        Particles decoded at a time (see :func:`chunked_log_likelihood`).
    return_log_ratio
        Also return ``log p(z_k) - log q(z_k|x)`` (unweighted), so that the true bound can
        be reported while training with ``kl_weight < 1``.

    Returns
    -------
    ``(log_w, log_lik)``, or ``(log_w, log_lik, log_ratio)``, each of shape ``(K, B)``.
    """
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}.")
    qz_s = qz_v.sqrt()
    eps = torch.randn((n_particles, *qz_m.shape), dtype=qz_m.dtype, device=qz_m.device)
    z = qz_m + qz_s * eps
    q_m, q_s = (qz_m.detach(), qz_s.detach()) if dreg else (qz_m, qz_s)
    log_q = Normal(q_m, q_s).log_prob(z).sum(-1)
    log_ratio = prior.log_prob(z) - log_q
    log_lik = chunked_log_likelihood(log_likelihood, z, chunk_size)
    log_w = log_lik + kl_weight * log_ratio

    if dreg and torch.is_grad_enabled() and z.requires_grad:
        # d iwae / d z_k = w~_k d log w_k / d z_k; the hook turns w~_k into
        # w~_k (1 - beta (1 - w~_k)): the dropped score term -beta E[w~_k d log q / d phi]
        # rewritten by reparameterization as -beta E[d w~_k / d z_k * d z_k / d phi].
        factor = 1.0 - kl_weight + kl_weight * torch.softmax(log_w.detach(), dim=0)
        z.register_hook(lambda g: g * factor.unsqueeze(-1))
    if return_log_ratio:
        return log_w, log_lik, log_ratio
    return log_w, log_lik


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound ``log (1/K) sum_k w_k`` per cell (``K`` along dim 0)."""
    return log_mean_exp(log_w, dim=0)


# ---------------------------------------------------------------------------------------
# Mixture-of-experts objectives (multimodal SCALE)
# ---------------------------------------------------------------------------------------


def mixture_log_weights(mask: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Log weights ``log alpha`` of each cell's mixture over the components it has.

    Parameters
    ----------
    mask
        ``(C, B)`` boolean (or 0/1) tensor: which components each cell has.
    logits
        Unnormalized log weights, shape ``(C,)`` or ``(C, B)``; ``None`` gives every
        component a cell has the same weight.

    Returns
    -------
    ``(C, B)`` log weights, normalized over each cell's components, ``-inf`` elsewhere.
    """
    mask = mask.bool()
    if logits is None:
        logits = torch.zeros(mask.shape, device=mask.device)
    elif logits.dim() == 1:
        logits = logits.unsqueeze(-1).expand(mask.shape)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits, dim=0)


def _component_log_probs(z: torch.Tensor, qz_m: torch.Tensor, qz_v: torch.Tensor) -> torch.Tensor:
    """``log q_c(z_s)`` of every point under every component, shape ``(C, S, B)``."""
    diff2 = (z.unsqueeze(0) - qz_m.unsqueeze(1)).pow(2)
    var = qz_v.unsqueeze(1)
    return -0.5 * (_LOG_2PI + var.log() + diff2 / var).sum(-1)


def moe_log_prob(
    z: torch.Tensor,
    qz_m: torch.Tensor,
    qz_v: torch.Tensor,
    mask: torch.Tensor,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-density of the mixture posterior ``q(z|x_1..M) = sum_c alpha_c q_c(z)``.

    Only the components a cell has enter its mixture; by default they weigh the same
    (``alpha_c = 1/C_i`` with ``C_i`` the number of them).

    Parameters
    ----------
    z
        Points, shape ``(S, B, D)``.
    qz_m, qz_v
        Means and variances of the components, shape ``(C, B, D)``.
    mask
        ``(C, B)`` boolean (or 0/1) tensor: which components each cell has. Every cell
        needs at least one.
    log_weights
        ``(C, B)`` log mixture weights from :func:`mixture_log_weights`; ``None`` for equal
        weights.

    Returns
    -------
    ``log q(z|x_1..M)``, shape ``(S, B)``.
    """
    if log_weights is None:
        log_weights = mixture_log_weights(mask).to(z.dtype)
    log_q = _component_log_probs(z, qz_m, qz_v) + log_weights.unsqueeze(1)
    return torch.logsumexp(log_q, dim=0)


def _unbiased_dreg_terms(
    z: torch.Tensor,
    qz_m: torch.Tensor,
    qz_v: torch.Tensor,
    log_alpha: torch.Tensor,
    log_w: torch.Tensor,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two corrections that make stratified DReG unbiased for a mixture posterior.

    For particle ``i`` drawn from component ``m`` and scored under the whole mixture, the
    score of ``log q_mix`` is ``sum_j r_j(z_i) d log q_j(z_i)`` with ``r_j`` the share of
    component ``j`` at ``z_i``. The own-component term is rewritten by reparameterization:
    ``-beta E[w~_i r_m d log q_m] = -beta E[d_z (w~_i r_m) dz/dphi_m]``, with
    ``d_z (w~_i r_m) = r_m w~_i (1 - w~_i) g_i + w~_i d_z r_m`` and ``g_i = d_z log w_i``.
    The first part scales the pathwise gradient of the particle (``factor``); the second and
    the other components' score terms, which no reparameterization reaches, form ``extra``:
    a zero-valued term per particle, to be added to its log weight, whose gradient is
    ``-beta (d_z r_m(z_i) + sum_{j != m} r_j(z_i) d log q_j(z_i))`` (the IWAE bound then
    multiplies it by ``w~_i``).

    Parameters
    ----------
    z
        Particles, shape ``(C, K, B, D)``, attached to the components' parameters.
    qz_m, qz_v
        The components, shape ``(C, B, D)``, attached.
    log_alpha
        ``(C, B)`` log mixture weights.
    log_w
        ``(C, K, B)`` log importance weights.
    kl_weight
        ``beta``.

    Returns
    -------
    ``(factor, extra)``: the factor on the gradient reaching each particle, ``(C, K, B, 1)``,
    and the zero-valued terms, ``(C, K, B)``.
    """
    n_comp, n_particles, n_cells, n_latent = z.shape
    flat = z.reshape(n_comp * n_particles, n_cells, n_latent)
    drew = torch.arange(n_comp, device=z.device).repeat_interleave(n_particles)  # (C*K,)
    own = (torch.arange(n_comp, device=z.device).unsqueeze(-1) == drew).unsqueeze(-1)
    log_alpha = log_alpha.detach().unsqueeze(1)  # (C, 1, B)
    with torch.no_grad():
        w_tilde = torch.softmax((log_w + log_alpha).reshape(-1, n_cells), dim=0)  # (C*K, B)
    # r_m(z_i) of the particle's own component, z attached and the parameters detached
    log_q = _component_log_probs(flat, qz_m.detach(), qz_v.detach()) + log_alpha
    log_r = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)
    r_own = log_r.gather(0, drew.view(1, -1, 1).expand(1, -1, n_cells)).squeeze(0).exp()
    factor = 1.0 - kl_weight * r_own.detach() * (1.0 - w_tilde)
    # other components' score terms: z and the own component's parameters detached
    log_q_att = _component_log_probs(flat.detach(), qz_m, qz_v) + log_alpha
    log_q_det = log_q.detach()
    log_q_others = torch.logsumexp(torch.where(own, log_q_det, log_q_att), dim=0)
    surrogate = r_own + log_q_others
    extra = -kl_weight * (surrogate - surrogate.detach())
    shape = (n_comp, n_particles, n_cells)
    return factor.reshape(*shape, 1), extra.reshape(shape)


def moe_importance_log_weights(
    log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    prior: GaussianMixturePrior,
    qz_m: torch.Tensor,
    qz_v: torch.Tensor,
    mask: torch.Tensor,
    n_particles: int,
    kl_weight: float = 1.0,
    dreg: bool = False,
    chunk_size: int | None = None,
    log_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified importance weights of the mixture posterior.

    ``K`` particles are drawn from every component ``q_c(z|x)`` of the mixture (stratified
    sampling) and weighted by ``log p(x_1..M | z) + log p(z) - log q(z|x_1..M)``, with the
    mixture density :func:`moe_log_prob` and the exact Gaussian-mixture prior.

    Parameters
    ----------
    log_likelihood
        Maps particles ``(N, B, D)`` to the joint ``log p(x_1..M|z)`` of the modalities each
        cell has, shape ``(N, B)``.
    prior
        The Gaussian-mixture prior shared by all modalities.
    qz_m, qz_v
        Means and variances of the components, shape ``(C, B, D)``.
    mask
        ``(C, B)``: which components each cell has; weights of particles drawn from a
        missing component are ``-inf``.
    n_particles
        Particles ``K`` per component.
    kl_weight
        Weight ``beta`` of ``log p(z) - log q(z|x)`` (KL warm-up).
    dreg
        Doubly-reparameterized gradients for the stratified IWAE bound
        (:func:`moe_iwae_bound`), unbiased for a mixture: the components' parameters are
        detached inside ``log q``; the gradient reaching particle ``i`` (drawn from component
        ``m``) is multiplied by ``1 - beta r_m(z_i) (1 - w~_i)``, with ``w~_i`` its weight
        normalized over all particles and ``r_m(z_i)`` the share of component ``m`` in the
        mixture at ``z_i``; and the log weight carries a zero-valued term whose gradient
        restores ``d_z r_m`` and the score terms of the other components (see
        ``docs/math.md``, section 8). With one component this is
        :func:`importance_log_weights`' DReG.
    chunk_size
        Particles (over components and ``K``) decoded at a time; checkpointed under
        gradients.
    log_weights
        ``(C, B)`` log mixture weights (:func:`mixture_log_weights`); ``None`` for equal
        weights.

    Returns
    -------
    ``(log_w, log_lik)``, both of shape ``(C, K, B)``.
    """
    n_comp, n_cells, n_latent = qz_m.shape
    mask = mask.bool()
    log_alpha = mixture_log_weights(mask) if log_weights is None else log_weights
    log_alpha = log_alpha.to(qz_m.dtype)
    shape = (n_comp, n_particles, n_cells, n_latent)
    eps = torch.randn(shape, dtype=qz_m.dtype, device=qz_m.device)
    z = qz_m.unsqueeze(1) + qz_v.sqrt().unsqueeze(1) * eps  # (C, K, B, D)
    dreg = dreg and torch.is_grad_enabled() and z.requires_grad
    # under DReG the pathwise gradient reaches z through a copy whose gradient is rescaled
    z_path = z.clone() if dreg else z
    q_m, q_v = (qz_m.detach(), qz_v.detach()) if dreg else (qz_m, qz_v)
    flat = z_path.reshape(n_comp * n_particles, n_cells, n_latent)
    log_q = moe_log_prob(flat, q_m, q_v, mask, log_alpha)
    log_p = prior.log_prob(flat)

    log_lik = chunked_log_likelihood(log_likelihood, flat, chunk_size)
    log_lik = log_lik.reshape(n_comp, n_particles, n_cells)
    log_w = log_lik + kl_weight * (log_p - log_q).reshape(n_comp, n_particles, n_cells)
    if dreg:
        factor, extra = _unbiased_dreg_terms(z, qz_m, qz_v, log_alpha, log_w.detach(), kl_weight)
        z_path.register_hook(lambda g: g * factor)
        log_w = log_w + extra
    log_w = log_w.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return log_w, log_lik


def moe_iwae_bound(
    log_w: torch.Tensor, mask: torch.Tensor, log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Stratified importance-weighted bound per cell (Morningstar et al., 2021).

    ``log sum_c alpha_c (1/K) sum_k w_{c,k}`` over the components the cell has: with equal
    weights the log-mean-exp of every particle's weight, whatever component drew it. It is
    at least as tight as MMVAE's ``sum_c alpha_c log (1/K) sum_k w_{c,k}``.

    Parameters
    ----------
    log_w
        ``(C, K, B)`` log weights from :func:`moe_importance_log_weights` (``-inf`` for
        missing components).
    mask
        ``(C, B)``: which components each cell has.
    log_weights
        ``(C, B)`` log mixture weights; ``None`` for equal weights.
    """
    log_alpha = mixture_log_weights(mask) if log_weights is None else log_weights
    log_alpha = log_alpha.to(log_w.dtype).unsqueeze(1)
    terms = torch.where(torch.isfinite(log_alpha), log_w + log_alpha, float("-inf"))
    return torch.logsumexp(terms.flatten(0, 1), dim=0) - math.log(log_w.shape[1])


def moe_elbo_bound(
    log_w: torch.Tensor, mask: torch.Tensor, log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Stratified ELBO per cell: the mixture-weighted mean log weight.

    ``sum_c alpha_c E_q_c(z|x)[log w(z)]``, each expectation estimated with ``K`` particles,
    over the components the cell has (MMVAE's stratified ELBO with equal weights).
    """
    return _mixture_average(log_w.mean(1), mask, log_weights)


def _mixture_average(
    per_component: torch.Tensor, mask: torch.Tensor, log_weights: torch.Tensor | None
) -> torch.Tensor:
    """``sum_c alpha_c v_c`` over each cell's components, for ``v`` of shape ``(C, B)``."""
    log_alpha = mixture_log_weights(mask) if log_weights is None else log_weights
    alpha = log_alpha.to(per_component.dtype).exp()
    return (alpha * torch.where(alpha > 0, per_component, 0.0)).sum(0)
