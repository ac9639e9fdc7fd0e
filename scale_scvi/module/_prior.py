"""The Gaussian-mixture prior of SCALE."""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)
# Log-weight of a pruned component: exp() of it is exactly 0 in float32 and float64, and it
# stays finite, so that ``0 * log_weight`` terms of the ELBO are 0 rather than NaN.
_PRUNED_LOGIT = -1e4


class GaussianMixturePrior(nn.Module):
    """Gaussian mixture prior ``p(z) = sum_c pi_c N(z; mu_c, diag(sigma2_c))``.

    The weights are softmax-parameterized and the variances log-parameterized with a
    floor, so that no parameter update can make them invalid.

    ``n_components`` is an upper bound: components can be switched off (:meth:`prune`, or
    :meth:`set_parameters` with fewer components than ``n_components``). A switched-off
    component has weight exactly 0, so it takes no cell and gets no gradient; the boolean
    buffer ``active`` (saved with the model) says which components are on.

    Parameters
    ----------
    n_components
        Number of mixture components ``K`` (SCALE's "centroids").
    n_latent
        Dimensionality ``D`` of the latent space.
    min_var
        Floor added to every component variance.
    """

    def __init__(self, n_components: int, n_latent: int, min_var: float = 1e-4):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        self.n_components = n_components
        self.n_latent = n_latent
        self.min_var = min_var
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.means = nn.Parameter(torch.randn(n_components, n_latent))
        self.log_vars = nn.Parameter(torch.zeros(n_components, n_latent))
        self.register_buffer("active", torch.ones(n_components, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints saved before components could be pruned have every component on.
        state_dict.setdefault(prefix + "active", torch.ones_like(self.active))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_active(self) -> int:
        """Number of components that are on."""
        return int(self.active.sum())

    @property
    def masked_logits(self) -> torch.Tensor:
        """The weight logits with switched-off components at a weight of exactly 0."""
        return self.logits.masked_fill(~self.active, _PRUNED_LOGIT)

    @property
    def log_weights(self) -> torch.Tensor:
        """Log mixture weights ``log pi``, shape ``(K,)`` (a large negative number when off)."""
        return torch.log_softmax(self.masked_logits, dim=-1)

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights ``pi``, shape ``(K,)`` (0 for components that are off)."""
        return torch.softmax(self.masked_logits, dim=-1)

    @property
    def variances(self) -> torch.Tensor:
        """Component variances ``sigma2``, shape ``(K, D)``, floored at ``min_var``."""
        return self.log_vars.exp() + self.min_var

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Joint log-density ``log pi_c + log N(z; mu_c, sigma2_c)`` for every component.

        Parameters
        ----------
        z
            Latent points, shape ``(..., D)``.

        Returns
        -------
        Tensor of shape ``(..., K)``.
        """
        var = self.variances
        diff = z.unsqueeze(-2) - self.means
        log_normal = -0.5 * (_LOG_2PI + var.log() + diff.pow(2) / var).sum(-1)
        return self.log_weights + log_normal

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Exact mixture log-density ``log p(z)``, shape ``(...,)``."""
        return torch.logsumexp(self.component_log_prob(z), dim=-1)

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``p(c | z)``, shape ``(..., K)``."""
        return torch.softmax(self.component_log_prob(z), dim=-1)

    def expected_component_log_prob(self, qz_m: torch.Tensor, qz_v: torch.Tensor) -> torch.Tensor:
        """Closed form of ``E_q(z|x)[log N(z; mu_c, sigma2_c)]`` for every component.

        Parameters
        ----------
        qz_m, qz_v
            Mean and variance of the diagonal Gaussian ``q(z|x)``, shape ``(N, D)``.

        Returns
        -------
        Tensor of shape ``(N, K)``.
        """
        var = self.variances
        diff2 = (qz_m.unsqueeze(-2) - self.means).pow(2)
        return -0.5 * (_LOG_2PI + var.log() + (qz_v.unsqueeze(-2) + diff2) / var).sum(-1)

    def distribution(self) -> torch.distributions.MixtureSameFamily:
        """The prior as a :class:`torch.distributions.MixtureSameFamily`."""
        from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

        comp = Independent(Normal(self.means, self.variances.sqrt()), 1)
        return MixtureSameFamily(Categorical(logits=self.masked_logits), comp)

    @torch.no_grad()
    def set_parameters(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        variances: torch.Tensor,
    ) -> None:
        """Overwrite the mixture with given weights, means and variances (e.g. a fitted GMM).

        With ``k < n_components`` rows, the first ``k`` components take them and are on;
        the others are switched off (see :meth:`prune`).

        Parameters
        ----------
        weights, means, variances
            Shapes ``(k,)``, ``(k, D)``, ``(k, D)`` with ``1 <= k <= n_components``.
        """
        weights = torch.as_tensor(weights, dtype=self.logits.dtype, device=self.logits.device)
        means = torch.as_tensor(means, dtype=self.means.dtype, device=self.means.device)
        variances = torch.as_tensor(
            variances, dtype=self.log_vars.dtype, device=self.log_vars.device
        )
        k = weights.shape[0]
        if not 1 <= k <= self.n_components or means.shape != (k, self.n_latent):
            raise ValueError(
                f"Cannot set {k} components with means of shape {tuple(means.shape)} on a "
                f"mixture of at most {self.n_components} components in {self.n_latent} "
                "dimensions."
            )
        self.logits[:k] = weights.clamp_min(1e-8).log()
        self.logits[k:] = weights.clamp_min(1e-8).log().min()
        self.means[:k] = means
        self.log_vars[:k] = (variances - self.min_var).clamp_min(self.min_var * 1e-2).log()
        self.active.fill_(False)
        self.active[:k] = True

    @torch.no_grad()
    def prune(self, keep: torch.Tensor) -> int:
        """Switch off the active components where ``keep`` is ``False``.

        At least one component always stays on: if ``keep`` would switch off every
        active component, the one of largest weight is kept.

        Parameters
        ----------
        keep
            Boolean mask of shape ``(n_components,)``.

        Returns
        -------
        The number of components switched off.
        """
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.active.device)
        new = self.active & keep
        if not new.any():
            new = torch.zeros_like(self.active)
            new[self.weights.argmax()] = True
        n_off = int((self.active & ~new).sum())
        self.active.copy_(new)
        return n_off
