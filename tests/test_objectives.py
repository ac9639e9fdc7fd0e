"""The training objectives (ELBO, IWAE, DReG) and the marginal log-likelihood estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scvi
import torch
from scvi import REGISTRY_KEYS
from scvi.module._constants import MODULE_KEYS
from torch.distributions import Bernoulli, Normal

from scale_scvi import SCALE
from scale_scvi.module import SCALEVAE
from scale_scvi.module._objectives import (
    chunked_log_likelihood,
    gaussian_entropy,
    gmm_kl,
    importance_log_weights,
    iwae_bound,
    mean_field_responsibilities,
)


# ----------------------------------------------------------------------------- helpers
def _tiny_module(n_input: int = 12, n_latent: int = 2, n_centroids: int = 3, seed: int = 0):
    """A tiny SCALEVAE with a spread-out prior and a sharp decoder."""
    torch.manual_seed(seed)
    # without the depth offset, so that the decoder alone gives p(x|z) in the checks below
    module = SCALEVAE(
        n_input=n_input,
        n_centroids=n_centroids,
        n_latent=n_latent,
        n_hidden=(8,),
        depth_offset=False,
    )
    with torch.no_grad():
        module.prior.means.mul_(2.0)
        module.prior.logits.copy_(torch.randn(n_centroids))
        for p in module.decoder.parameters():
            p.mul_(2.0)
    return module


def _log_px_z(module: SCALEVAE, eta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(x|z)`` from the decoder output, written out for the module's link."""
    if module.atac_link == "logit":
        return Bernoulli(logits=eta).log_prob(x).sum(-1)
    rate = eta.double().exp()  # p = 1 - exp(-rate)
    return (x * torch.log(-torch.expm1(-rate)) - (1 - x) * rate).sum(-1).to(eta.dtype)


def _tiny_batch(module: SCALEVAE, n_cells: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n_cells, module.n_input, generator=gen) < 0.4).float()
    return {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.BATCH_KEY: torch.zeros(n_cells, 1)}


def _log_weights(module, tensors, n_particles, seed, **kwargs):
    """Importance log weights of a minibatch, from a fixed random state."""
    out = module.inference(**module._get_inference_input(tensors))
    x = tensors[REGISTRY_KEYS.X_KEY]
    torch.manual_seed(seed)
    log_w, log_lik = importance_log_weights(
        module._log_likelihood_fn(x, tensors),
        module.prior,
        out[MODULE_KEYS.QZM_KEY],
        out[MODULE_KEYS.QZV_KEY],
        n_particles=n_particles,
        **kwargs,
    )
    return log_w, log_lik, out


def _grads(module, params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).clone() for p in params])


def _iwae_gradient(module, tensors, n_particles, seed, dreg, kl_weight=1.0, chunk_size=None):
    module.zero_grad()
    log_w, _, _ = _log_weights(
        module, tensors, n_particles, seed, dreg=dreg, kl_weight=kl_weight, chunk_size=chunk_size
    )
    (-iwae_bound(log_w).sum()).backward()
    encoder = list(module.z_encoder.parameters())
    decoder = list(module.decoder.parameters()) + list(module.prior.parameters())
    return _grads(module, encoder), _grads(module, decoder), log_w.detach()


# ----------------------------------------------------------------------------- exact values
def test_iwae_with_one_particle_is_one_sample_elbo():
    module = _tiny_module()
    tensors = _tiny_batch(module)
    log_w, _, out = _log_weights(module, tensors, n_particles=1, seed=3)
    bound = iwae_bound(log_w)

    # the same draw, evaluated with torch.distributions only
    qz_m, qz_v = out[MODULE_KEYS.QZM_KEY], out[MODULE_KEYS.QZV_KEY]
    torch.manual_seed(3)
    eps = torch.randn((1, *qz_m.shape), dtype=qz_m.dtype)
    z = qz_m + qz_v.sqrt() * eps
    x = tensors[REGISTRY_KEYS.X_KEY]
    log_px_z = _log_px_z(module, module.decoder(z, tensors[REGISTRY_KEYS.BATCH_KEY]), x)
    log_pz = module.prior.distribution().log_prob(z)
    log_qz = Normal(qz_m, qz_v.sqrt()).log_prob(z).sum(-1)
    expected = (log_px_z + log_pz - log_qz)[0]
    torch.testing.assert_close(bound, expected)


def _log_px_by_quadrature(module, x, n_grid=20001, half_width=12.0) -> torch.Tensor:
    """``log p(x) = log int p(x|z) p(z) dz`` on a grid, for a one-dimensional latent."""
    grid = torch.linspace(-half_width, half_width, n_grid)
    z = grid.reshape(-1, 1, 1).expand(-1, x.shape[0], 1)
    with torch.no_grad():
        logits = module.decoder(z, torch.zeros(x.shape[0], 1))
        log_joint = _log_px_z(module, logits, x)
        log_joint = log_joint + module.prior.log_prob(z)
    return torch.logsumexp(log_joint, 0) + math.log(grid[1] - grid[0])


def test_marginal_ll_converges_to_exact_log_likelihood():
    module = _tiny_module(n_latent=1, n_centroids=3)
    tensors = _tiny_batch(module, n_cells=8)
    exact = _log_px_by_quadrature(module, tensors[REGISTRY_KEYS.X_KEY])
    assert torch.isfinite(exact).all()
    torch.manual_seed(0)
    est_1 = torch.stack([module.marginal_ll(tensors, n_mc_samples=1) for _ in range(200)])
    est_k = torch.stack(
        [
            module.marginal_ll(tensors, n_mc_samples=20_000, n_mc_samples_per_pass=5000)
            for _ in range(5)
        ]
    )
    # K = 1 is a one-sample ELBO: below log p(x) on average, by a clear gap
    se_1 = est_1.std(0) / math.sqrt(est_1.shape[0])
    assert (est_1.mean(0) < exact + 3 * se_1).all()
    assert (exact - est_1.mean(0)).mean() > 0.5
    # K = 20,000: log p(x) up to Monte Carlo error and the (small, negative) bias
    se_k = est_k.std(0) / math.sqrt(est_k.shape[0])
    assert ((est_k.mean(0) - exact).abs() < 4 * se_k + 0.01).all()
    assert (est_k.mean(0) - exact).abs().mean() < 0.02


def test_mean_field_responsibilities_are_the_optimal_q_c():
    module = _tiny_module(n_centroids=4)
    tensors = _tiny_batch(module)
    with torch.no_grad():
        out = module.inference(**module._get_inference_input(tensors))
        qz_m, qz_v = out[MODULE_KEYS.QZM_KEY], out[MODULE_KEYS.QZV_KEY]
        best = mean_field_responsibilities(module.prior, qz_m, qz_v)
        kl_best = gmm_kl(module.prior, qz_m, qz_v, best)
        # closed form of the KL at the optimum
        expected = module.prior.expected_component_log_prob(qz_m, qz_v) + module.prior.log_weights
        closed = -torch.logsumexp(expected, -1) - gaussian_entropy(qz_v)
        torch.testing.assert_close(kl_best, closed)
        # p(c | E[z]) (SCALE's gamma) and random q(c|x) give a larger KL (a lower ELBO)
        kl_mean = gmm_kl(module.prior, qz_m, qz_v, module.prior.responsibilities(qz_m))
        assert (kl_mean >= kl_best - 1e-5).all()
        gen = torch.Generator().manual_seed(0)
        for _ in range(20):
            other = torch.softmax(torch.randn(best.shape, generator=gen, dtype=best.dtype), -1)
            assert (gmm_kl(module.prior, qz_m, qz_v, other) >= kl_best - 1e-5).all()


# ----------------------------------------------------------------------------- gradients
def test_dreg_leaves_decoder_and_prior_gradients_those_of_iwae():
    module = _tiny_module()
    tensors = _tiny_batch(module)
    n_draws, mean_iwae, mean_dreg = 10, 0.0, 0.0
    for seed in range(n_draws):
        enc_i, dec_i, _ = _iwae_gradient(module, tensors, 8, seed, dreg=False)
        enc_d, dec_d, _ = _iwae_gradient(module, tensors, 8, seed, dreg=True)
        # the decoder and the prior receive the plain IWAE gradient, draw by draw ...
        torch.testing.assert_close(dec_d, dec_i)
        mean_iwae, mean_dreg = mean_iwae + dec_i / n_draws, mean_dreg + dec_d / n_draws
        # ... while the encoder's gradient estimate is a different one
        assert not torch.allclose(enc_d, enc_i)
    # and hence in expectation
    torch.testing.assert_close(mean_dreg, mean_iwae)
    assert mean_iwae.abs().max() > 0


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_dreg_encoder_gradient_matches_reference_formula(kl_weight):
    """``sum_k w~_k (1 - beta + beta w~_k) d log w_k / d z_k * d z_k / d phi``."""
    module = _tiny_module()
    tensors = _tiny_batch(module)
    module.zero_grad()
    log_w, _, out = _log_weights(module, tensors, 6, seed=5, dreg=True, kl_weight=kl_weight)
    qz_m, qz_v = out[MODULE_KEYS.QZM_KEY], out[MODULE_KEYS.QZV_KEY]
    g_m, g_v = torch.autograd.grad(-iwae_bound(log_w).sum(), [qz_m, qz_v])

    # reference: recompute the particles, take d log w_k / d z_k with q's parameters fixed
    torch.manual_seed(5)
    eps = torch.randn((6, *qz_m.shape), dtype=qz_m.dtype)
    z = (qz_m.detach() + qz_v.detach().sqrt() * eps).requires_grad_(True)
    x = tensors[REGISTRY_KEYS.X_KEY]
    logits = module.decoder(z, tensors[REGISTRY_KEYS.BATCH_KEY])
    log_wz = _log_px_z(module, logits, x) + kl_weight * (
        module.prior.log_prob(z) - Normal(qz_m.detach(), qz_v.detach().sqrt()).log_prob(z).sum(-1)
    )
    (dlogw_dz,) = torch.autograd.grad(log_wz.sum(), z)
    w = torch.softmax(log_wz.detach(), 0)
    g_z = -(w * (1 - kl_weight + kl_weight * w)).unsqueeze(-1) * dlogw_dz
    # z = m + sqrt(v) eps: dz/dm = 1, dz/dv = eps / (2 sqrt(v))
    torch.testing.assert_close(g_m, g_z.sum(0))
    torch.testing.assert_close(g_v, (g_z * eps / (2 * qz_v.detach().sqrt())).sum(0))


def _per_draw_encoder_output_gradients(module, tensors, n_draws, n_particles, dreg, kl_weight):
    """Gradients of ``-iwae`` w.r.t. ``q(z|x)``'s mean and variance, one row per draw.

    The cell is repeated ``n_draws`` times in one minibatch, so each row holds an
    independent draw of ``n_particles`` particles; the encoder's parameter gradient is a
    fixed linear map of these.
    """
    rep = {k: v.repeat(n_draws, 1) for k, v in tensors.items()}
    log_w, _, out = _log_weights(module, rep, n_particles, 0, dreg=dreg, kl_weight=kl_weight)
    qz_m, qz_v = out[MODULE_KEYS.QZM_KEY], out[MODULE_KEYS.QZV_KEY]
    g_m, g_v = torch.autograd.grad(-iwae_bound(log_w).sum(), [qz_m, qz_v])
    return torch.cat([g_m, g_v], dim=1)


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_dreg_and_iwae_encoder_gradients_agree_in_expectation(kl_weight):
    module = _tiny_module()
    tensors = {k: v[:1] for k, v in _tiny_batch(module, seed=2).items()}
    args = (module, tensors, 20_000, 4)
    g_iwae = _per_draw_encoder_output_gradients(*args, dreg=False, kl_weight=kl_weight)
    g_dreg = _per_draw_encoder_output_gradients(*args, dreg=True, kl_weight=kl_weight)
    diff = (g_dreg - g_iwae).double()  # paired draws: the same particles
    z_score = diff.mean(0) / (diff.std(0) / math.sqrt(diff.shape[0]))
    assert z_score.abs().max() < 4.5
    assert g_iwae.mean(0).abs().max() > 10 * (diff.std(0) / math.sqrt(diff.shape[0])).max()
    # the two estimators differ draw by draw, and DReG's has the smaller variance
    assert diff.std(0).min() > 0
    assert g_dreg.var(0).sum() < g_iwae.var(0).sum()


# ----------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("dreg", [False, True])
def test_chunked_particles_give_the_unchunked_values_and_gradients(dreg):
    module = _tiny_module()
    tensors = _tiny_batch(module)
    enc_a, dec_a, log_w_a = _iwae_gradient(module, tensors, 10, 7, dreg, chunk_size=None)
    enc_b, dec_b, log_w_b = _iwae_gradient(module, tensors, 10, 7, dreg, chunk_size=3)
    torch.testing.assert_close(log_w_b, log_w_a)
    torch.testing.assert_close(enc_b, enc_a)
    torch.testing.assert_close(dec_b, dec_a)
    with torch.no_grad():
        torch.manual_seed(11)
        full = module.marginal_ll(tensors, n_mc_samples=10, n_mc_samples_per_pass=10)
        torch.manual_seed(11)
        chunked = module.marginal_ll(tensors, n_mc_samples=10, n_mc_samples_per_pass=4)
    torch.testing.assert_close(chunked, full)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors that autograd keeps for the backward pass of ``fn()``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return total


def test_chunking_bounds_memory_with_and_without_gradients():
    n_peaks, n_particles, chunk = 4000, 32, 4
    torch.manual_seed(0)
    module = SCALEVAE(n_input=n_peaks, n_centroids=3, n_latent=2, n_hidden=(8,))
    tensors = {
        REGISTRY_KEYS.X_KEY: (torch.rand(5, n_peaks) < 0.1).float(),
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(5, 1),
    }
    decoded = []
    inner = module._log_likelihood_fn(tensors[REGISTRY_KEYS.X_KEY], tensors)

    def recording(z):
        decoded.append(z.shape[0])
        return inner(z)

    # without gradients: the decoder never sees more than `chunk` particles at once
    with torch.inference_mode():
        z = torch.randn(n_particles, 5, 2)
        chunked_log_likelihood(recording, z, chunk)
    assert max(decoded) == chunk and sum(decoded) == n_particles

    # with gradients: what is kept for backward does not grow with K * B * P
    z = torch.randn(n_particles, 5, 2, requires_grad=True)
    full = _saved_bytes(lambda: chunked_log_likelihood(inner, z, None))
    chunked = _saved_bytes(lambda: chunked_log_likelihood(inner, z, chunk))
    one_decoding = n_particles * 5 * n_peaks * 4  # the logits of every particle, float32
    assert full >= one_decoding
    assert chunked < one_decoding / 10


def test_invalid_particle_settings_raise():
    with pytest.raises(ValueError, match="n_particles"):
        SCALEVAE(n_input=10, n_centroids=2, n_hidden=(4,), objective="iwae", n_particles=0)
    with pytest.raises(ValueError, match="particle_chunk_size"):
        SCALEVAE(n_input=10, n_centroids=2, n_hidden=(4,), particle_chunk_size=0)
    with pytest.raises(ValueError, match="objective"):
        SCALEVAE(n_input=10, n_centroids=2, n_hidden=(4,), objective="vae")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_log_likelihood(lambda z: z.sum(-1), torch.zeros(3, 2, 1), chunk_size=0)


def test_loss_reports_the_true_bound_during_kl_warmup():
    module = _tiny_module()
    module.objective, module.n_particles = "iwae", 5
    tensors = _tiny_batch(module)
    inference_outputs, generative_outputs = module.forward(tensors, compute_loss=False)
    torch.manual_seed(4)
    out = module.loss(tensors, inference_outputs, generative_outputs, kl_weight=0.25)
    log_w_true, log_lik, _ = _log_weights(module, tensors, 5, seed=4)
    log_w_warm, _, _ = _log_weights(module, tensors, 5, seed=4, kl_weight=0.25)
    reconst, kl = out.reconstruction_loss["reconstruction_loss"], out.kl_local["kl_local"]
    torch.testing.assert_close(reconst, -log_lik.mean(0).detach())
    torch.testing.assert_close(reconst + kl, -iwae_bound(log_w_true).detach())
    torch.testing.assert_close(out.loss, -iwae_bound(log_w_warm).mean())


# ----------------------------------------------------------------------------- public API
@pytest.fixture(scope="module")
def trained(request):
    """A small model trained on 160 simulated cells; 40 cells held out."""
    from scale_scvi.data import simulate_scatac

    scvi.settings.seed = 0
    adata = simulate_scatac(n_cells=200, n_peaks=300, n_types=4, seed=1)
    train, held_out = adata[:160].copy(), adata[160:].copy()
    SCALE.setup_anndata(train)
    model = SCALE(train, n_centroids=4, n_latent=5, n_hidden=(64, 16))
    model.train(max_epochs=15, batch_size=32, enable_progress_bar=False)
    return model, held_out


def test_marginal_ll_is_above_the_elbo_on_held_out_cells(trained):
    model, held_out = trained
    scvi.settings.seed = 0
    # the ELBO's reconstruction term is a one-sample estimate: average 20 of them per cell
    elbos = np.stack([model.get_elbo(held_out, return_mean=False) for _ in range(20)])
    elbo, elbo_se = elbos.mean(0), elbos.std(0, ddof=1) / np.sqrt(elbos.shape[0])
    # the marginal likelihood is a Monte-Carlo estimate too: average 5 of them per cell
    log_pxs = np.stack(
        [model.get_marginal_ll(held_out, n_mc_samples=100, return_mean=False) for _ in range(5)]
    )
    log_px, log_px_se = log_pxs.mean(0), log_pxs.std(0, ddof=1) / np.sqrt(log_pxs.shape[0])
    assert log_px.shape == elbo.shape == (held_out.n_obs,)
    assert np.isfinite(log_px).all() and np.isfinite(elbo).all()
    assert log_px.mean() > elbo.mean()
    # per cell too, up to the Monte Carlo noise of both estimates
    assert (log_px >= elbo - 4 * np.sqrt(elbo_se**2 + log_px_se**2)).all()
    assert model.get_marginal_ll(held_out, n_mc_samples=10) == pytest.approx(
        float(model.get_marginal_ll(held_out, n_mc_samples=10, return_mean=False).mean()),
        abs=1.0,
    )


def test_marginal_ll_does_not_decrease_with_k(trained):
    model, held_out = trained
    scvi.settings.seed = 0
    repeats = {1: 10, 10: 5, 100: 3}  # average draws: the per-cell noise shrinks with K
    estimates = {
        k: np.stack(
            [model.get_marginal_ll(held_out, n_mc_samples=k, return_mean=False) for _ in range(r)]
        ).mean(0)
        for k, r in repeats.items()
    }
    for small, large in ((1, 10), (10, 100)):
        diff = estimates[large] - estimates[small]  # paired by cell
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        assert diff.mean() > -3 * se, (small, large, diff.mean(), se)
    # and it does tighten from K = 1 (a one-sample ELBO) to K = 100
    diff = estimates[100] - estimates[1]
    assert diff.mean() > 2 * diff.std(ddof=1) / np.sqrt(diff.size)


@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_importance_weighted_training_through_the_public_api(small_adata, objective):
    SCALE.setup_anndata(small_adata)
    model = SCALE(
        small_adata,
        n_centroids=4,
        n_latent=5,
        n_hidden=(32, 16),
        objective=objective,
        n_particles=6,
        particle_chunk_size=4,
    )
    assert model.module.objective == objective and model.module.n_particles == 6
    model.train(max_epochs=4, batch_size=50, enable_progress_bar=False)
    history = model.history["elbo_train"].to_numpy(dtype=float)
    assert np.isfinite(history).all()
    probs = model.get_cluster_probabilities()
    assert 1 <= model.n_clusters_ <= 4 and probs.shape == (small_adata.n_obs, model.n_clusters_)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert len(model.get_cluster_assignments()) == small_adata.n_obs
    log_px = model.get_marginal_ll(n_mc_samples=20, return_mean=False)
    assert np.isfinite(log_px).all() and (log_px < 0).all()
    assert np.isfinite(model.get_elbo())


@pytest.mark.parametrize("depth_offset", [False, True])
def test_bernoulli_mass_over_all_cells_is_one_only_without_the_depth_offset(
    depth_offset: bool,
) -> None:
    """Exact enumeration of the 2^P binary cells for a fixed z (docs/math.md, section 1).

    Without the depth offset, ``p(x|z)`` is a distribution over ``x``: its mass is one. With
    it, each cell's logits are shifted by its own depth, read from ``x``: a conditional
    pseudo-likelihood whose mass over ``x`` is not one (here above one).
    """
    torch.manual_seed(0)
    n_peaks = 10
    module = SCALEVAE(
        n_input=n_peaks,
        n_batch=1,
        n_centroids=2,
        n_latent=2,
        n_hidden=(8,),
        depth_offset=depth_offset,
    ).eval()
    module.log_mean_depth.fill_(math.log(3.0))
    codes = torch.arange(2**n_peaks).unsqueeze(1)
    x = ((codes >> torch.arange(n_peaks)) & 1).float()
    z = torch.randn(1, 2).expand(x.shape[0], 2)
    with torch.no_grad():
        batch = {REGISTRY_KEYS.BATCH_KEY: torch.zeros(x.shape[0], 1, dtype=torch.long)}
        log_px = module._log_likelihood_fn(x, batch)(z)
    mass = float(torch.logsumexp(log_px.double(), 0).exp())
    if depth_offset:
        assert mass > 1.05
    else:
        assert mass == pytest.approx(1.0, abs=1e-5)


def test_get_elbo_returns_a_float_or_an_array(trained) -> None:
    model, held_out = trained
    elbo = model.get_elbo(held_out)
    per_cell = model.get_elbo(held_out, return_mean=False)
    assert type(elbo) is float
    assert isinstance(per_cell, np.ndarray) and per_cell.shape == (held_out.n_obs,)
    assert type(model.get_marginal_ll(held_out, n_mc_samples=5)) is float
