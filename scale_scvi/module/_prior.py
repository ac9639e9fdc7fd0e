"""The Gaussian-mixture prior of SCALE."""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixturePrior(nn.Module):
    """Gaussian mixture prior ``p(z) = sum_c pi_c N(z; mu_c, diag(sigma2_c))``.

    The weights are softmax-parameterized and the variances log-parameterized with a
    floor, so that no parameter update can make them invalid.

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

    @property
    def log_weights(self) -> torch.Tensor:
        """Log mixture weights ``log pi``, shape ``(K,)``."""
        return torch.log_softmax(self.logits, dim=-1)

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights ``pi``, shape ``(K,)``."""
        return torch.softmax(self.logits, dim=-1)

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
        return MixtureSameFamily(Categorical(logits=self.logits), comp)

    @torch.no_grad()
    def set_parameters(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        variances: torch.Tensor,
    ) -> None:
        """Overwrite the mixture with given weights, means and variances (e.g. a fitted GMM)."""
        weights = torch.as_tensor(weights, dtype=self.logits.dtype, device=self.logits.device)
        means = torch.as_tensor(means, dtype=self.means.dtype, device=self.means.device)
        variances = torch.as_tensor(
            variances, dtype=self.log_vars.dtype, device=self.log_vars.device
        )
        self.logits.copy_(weights.clamp_min(1e-8).log())
        self.means.copy_(means)
        self.log_vars.copy_((variances - self.min_var).clamp_min(self.min_var * 1e-2).log())
