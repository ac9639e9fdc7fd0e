"""Numerical safety: extreme data, collapsing mixture components, and diverging training."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from lightning.pytorch.callbacks import Callback

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac
from scale_scvi.module import SCALEVAE
from scale_scvi.module._components import SCALEEncoder
from scale_scvi.module._objectives import (
    CLOGLOG_ETA_MAX,
    bernoulli_log_likelihood,
    cloglog_log_likelihood,
    cloglog_rate,
    gmm_kl,
    inverse_link,
    open_probability,
)
from scale_scvi.module._prior import GaussianMixturePrior
from scale_scvi.train import NonFiniteLossError, fit_gmm

TRAIN = {"batch_size": 32, "enable_progress_bar": False}


def extreme_adata():
    """Two real types, plus cells with no open peak and cells with nearly every peak open."""
    adata = simulate_scatac(n_cells=96, n_peaks=120, n_types=2, seed=5)
    X = adata.X.toarray()
    X[:8] = 0.0  # no open peak
    rng = np.random.default_rng(0)
    X[8:16] = (rng.random((8, X.shape[1])) < 0.99).astype(np.float32)  # ~99% open
    X[16:18] = 1.0  # every peak open
    X[:, :3] = 0.0  # peaks open in no cell
    adata.X = sp.csr_matrix(X)
    return adata


def assert_finite_outputs(model: SCALE) -> None:
    for key, values in model.history.items():
        assert np.isfinite(values.to_numpy(dtype=float)).all(), key
    latent = model.get_latent_representation()
    assert np.isfinite(latent).all()
    probs = model.get_cluster_probabilities()
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    imputed = model.get_normalized_accessibility()
    assert np.isfinite(imputed).all() and (imputed >= 0).all() and (imputed <= 1).all()
    assert np.isfinite(model.get_elbo())
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=8, return_mean=False)).all()


@pytest.mark.parametrize("objective", ["elbo", "dreg"])
def test_extreme_cells_and_too_many_components(objective: str) -> None:
    """Empty and saturated cells, K = 12 components for 2 types: everything stays finite."""
    adata = extreme_adata()
    with pytest.warns(UserWarning, match="have no accessible"):
        SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=12, n_hidden=(32,), n_latent=4, objective=objective)
    model.train(max_epochs=6, gmm_init_epoch=1, **TRAIN)
    assert_finite_outputs(model)
    weights = model.module.prior.weights.detach()
    active = model.module.prior.active
    # components no cell takes are switched off at the end of training (weight exactly 0)
    assert torch.isfinite(weights).all() and (weights[active] > 0).all()
    assert (weights[~active] == 0).all() and model.n_clusters_ == int(active.sum())


def test_prior_with_collapsed_components_stays_finite() -> None:
    """Zero variances, zero weights and coinciding means are floored, and gradients stay finite."""
    prior = GaussianMixturePrior(n_components=4, n_latent=3, min_var=1e-4)
    prior.set_parameters(
        weights=torch.tensor([1.0, 0.0, 0.0, 0.0]),
        means=torch.zeros(4, 3),  # all components on one point
        variances=torch.zeros(4, 3),
    )
    assert (prior.variances >= prior.min_var).all()
    assert torch.isfinite(prior.log_weights).all()
    with torch.no_grad():
        prior.log_vars[1] = -1e4  # exp underflows to 0: the floor keeps the variance positive
    assert (prior.variances >= prior.min_var).all()

    qz_m = torch.tensor([[0.0, 0.0, 0.0], [1e3, -1e3, 50.0]], requires_grad=True)
    qz_v = torch.full((2, 3), 1e-4)
    gamma = prior.responsibilities(qz_m)
    assert torch.isfinite(gamma).all()
    torch.testing.assert_close(gamma.sum(-1), torch.ones(2))
    kl = gmm_kl(prior, qz_m, qz_v, gamma)
    assert torch.isfinite(kl).all()
    assert torch.isfinite(prior.log_prob(qz_m)).all()
    kl.sum().backward()
    assert torch.isfinite(qz_m.grad).all()
    for p in prior.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_responsibilities_are_computed_in_log_space() -> None:
    """Far from every component each density underflows to 0, the responsibilities do not."""
    prior = GaussianMixturePrior(n_components=2, n_latent=2)
    prior.set_parameters(
        torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.ones(2, 2)
    )
    z = torch.tensor([[60.0, 0.0]])  # N(z; mu, 1) ~ exp(-1800): 0 in float32
    assert (prior.component_log_prob(z).exp() == 0).all()
    gamma = prior.responsibilities(z)
    assert torch.isfinite(gamma).all()
    assert gamma[0, 1] > 0.99  # the nearer component takes it, as exp(log-ratio) says


def test_likelihood_and_encoder_variance_are_safe_at_extremes() -> None:
    logits = torch.tensor([[-1e4, 1e4, 0.0, 80.0]])
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    ll = bernoulli_log_likelihood(logits, x)
    assert torch.isfinite(ll).all()
    expected = torch.tensor([-2e4 - np.log(2.0)], dtype=torch.float32)
    torch.testing.assert_close(ll, expected, rtol=1e-6, atol=0)

    encoder = SCALEEncoder(n_input=5, n_output=2, n_hidden=(4,), var_eps=1e-4)
    with torch.no_grad():
        encoder.var_encoder.bias.fill_(-1e4)  # softplus underflows to 0
    _, qz_v = encoder(torch.ones(3, 5))
    assert (qz_v >= 1e-4).all()


def test_cloglog_likelihood_dense_and_sparse_match_the_formula() -> None:
    """``x log(1 - exp(-e^eta)) - (1 - x) e^eta``, for dense and CSR minibatches, with and
    without a leading particle dimension; the gradients are autograd's of the formula."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 50, generator=gen) < 0.3).double()
    for shape in [(6, 50), (3, 6, 50)]:
        eta = (3 * torch.randn(shape, generator=gen, dtype=torch.float64) - 1).requires_grad_()
        rate = eta.exp()
        expected = (x * torch.log(-torch.expm1(-rate)) - (1 - x) * rate).sum(-1)
        weight = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        (grad_expected,) = torch.autograd.grad((expected * weight).sum(), eta)
        for layout in (x, x.to_sparse_csr()):
            ll = cloglog_log_likelihood(eta, layout)
            torch.testing.assert_close(ll, expected)
            (grad,) = torch.autograd.grad((ll * weight).sum(), eta)
            torch.testing.assert_close(grad, grad_expected)
    # the probability and its inverse
    p = torch.rand(100, generator=gen, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    for link in ("logit", "cloglog"):
        torch.testing.assert_close(open_probability(inverse_link(p, link), link), p)
    # float32 at extreme outputs: an open peak of a huge rate costs nothing, a closed one its
    # rate; the sparse sums keep the small terms beside a huge one
    eta = torch.tensor([[-50.0, 0.0, 12.0, 25.0]])
    ll = cloglog_log_likelihood(eta, torch.ones(1, 4).to_sparse_csr())
    torch.testing.assert_close(
        ll, torch.tensor([-50.0 + np.log(1 - np.exp(-1.0))], dtype=torch.float32)
    )
    ll = cloglog_log_likelihood(eta, torch.tensor([[1.0, 1.0, 0.0, 1.0]]).to_sparse_csr())
    # beyond CLOGLOG_ETA_MAX the rate is the tangent line: exp(10) (1 + 12 - 10)
    expected = -50.0 + np.log(1 - np.exp(-1.0)) - np.exp(CLOGLOG_ETA_MAX) * 3.0
    torch.testing.assert_close(ll, torch.tensor([expected], dtype=torch.float32))


def test_cloglog_rate_continues_linearly_beyond_its_maximum() -> None:
    """Above ``CLOGLOG_ETA_MAX`` the rate is ``exp(eta)``'s tangent line: a runaway ``eta``
    (up to float32's range, where ``exp`` overflows) gives a finite loss and a bounded
    gradient, the same for dense and CSR minibatches; below it the rate is ``exp(eta)`` bit
    for bit."""
    below = torch.linspace(-30.0, CLOGLOG_ETA_MAX, 101)
    assert torch.equal(cloglog_rate(below), torch.exp(below))
    # the form used off the CPU (no check of the maximum) is exact below it too
    assert torch.equal(cloglog_rate(below, beyond=True), torch.exp(below))
    eta = torch.tensor([[-2.0, 0.5, 11.0, 100.0, 1e4], [3.0, 50.0, -1.0, 95.0, 0.0]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0]])
    results = []
    for layout in (x, x.to_sparse_csr()):
        e = eta.clone().requires_grad_()
        ll = cloglog_log_likelihood(e, layout)
        (grad,) = torch.autograd.grad(ll.sum(), e)
        assert torch.isfinite(ll).all() and torch.isfinite(grad).all()
        results.append((ll, grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    ll, grad = results[0]
    top = float(np.exp(CLOGLOG_ETA_MAX))
    # a closed peak beyond the maximum: -exp(T) (1 + eta - T), gradient -exp(T)
    assert grad[0, 3].item() == pytest.approx(-top) and grad[1, 3].item() == pytest.approx(-top)
    # an open peak beyond it costs nothing and is pushed no further
    assert grad[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert grad[0, 4].item() == pytest.approx(0.0, abs=1e-6)
    expected0 = (
        np.log(1 - np.exp(-np.exp(-2.0))) - np.exp(0.5) - top * (1 + 100.0 - CLOGLOG_ETA_MAX)
    )
    assert ll[0].item() == pytest.approx(expected0, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
@pytest.mark.parametrize("method", ["kmeans", "em"])
def test_fit_gmm_on_collapsed_latent(method: str) -> None:
    """A latent collapsed onto one point still gives a valid, finite mixture."""
    latent = np.zeros((40, 3))
    latent[:2] += 1e-3
    weights, means, variances = fit_gmm(latent, n_components=5, seed=0, method=method)
    assert (weights > 0).all()
    np.testing.assert_allclose(weights.sum(), 1.0)
    assert np.isfinite(weights).all() and np.isfinite(means).all()
    assert (variances > 0).all()
    module = SCALEVAE(n_input=10, n_centroids=5, n_latent=3, n_hidden=(4,))
    module.prior.set_parameters(
        torch.as_tensor(weights), torch.as_tensor(means), torch.as_tensor(variances)
    )
    assert torch.isfinite(module.prior.log_prob(torch.zeros(1, 3))).all()


class PoisonAt(Callback):
    """Put a NaN into a decoder weight at the start of a given epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                weight = next(pl_module.module.decoder.parameters())
                weight[(0,) * weight.dim()] = float("nan")


def _small_model(**kwargs) -> SCALE:
    adata = simulate_scatac(n_cells=64, n_peaks=60, n_types=2, seed=2)
    SCALE.setup_anndata(adata)
    return SCALE(adata, n_centroids=2, n_hidden=(16,), n_latent=3, **kwargs)


def _full_message(error: BaseException) -> str:
    return " ".join([str(error), *getattr(error, "__notes__", [])])


def test_non_finite_loss_stops_training_naming_the_epoch() -> None:
    model = _small_model()
    with pytest.raises(NonFiniteLossError) as info:
        model.train(max_epochs=5, lr=2e-3, callbacks=[PoisonAt(epoch=2)], **TRAIN)
    message = str(info.value)
    assert "at epoch 2" in message
    assert "Lower the learning rate (now 0.002)" in message
    assert "lr=0.0002" in message
    assert model.is_trained  # what epochs 0 and 1 trained is kept


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_absurd_learning_rate_stops_with_advice(objective: str) -> None:
    """A diverging run stops with the epoch and a lower learning rate, whatever the path."""
    model = _small_model(objective=objective, n_particles=2)
    with pytest.raises((NonFiniteLossError, ValueError)) as info:
        model.train(max_epochs=5, lr=1e30, gmm_init_epoch=0, **TRAIN)
    message = _full_message(info.value)
    assert "at epoch 0" in message
    assert "Lower the learning rate (now 1e+30)" in message


def _state(model: SCALE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_same_state(model: SCALE, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_diverged_run_leaves_the_model_before_it_and_trains_again() -> None:
    """lr=1e3 diverges; the model is given back as it was, and a sane lr then trains it."""
    scvi.settings.seed = 0
    model = _small_model()
    before = _state(model)
    with pytest.raises((NonFiniteLossError, ValueError)) as info:
        model.train(max_epochs=3, lr=1e3, gmm_init_epoch=0, **TRAIN)
    message = _full_message(info.value)
    assert "Lower the learning rate (now 1000)" in message
    assert "restored as it was before this train() call" in message
    _assert_same_state(model, before)
    assert not model.module.training
    assert not model.is_trained
    model.train(max_epochs=2, lr=1e-3, **TRAIN)
    assert model.is_trained
    means = model.module.prior.means.detach()
    assert torch.isfinite(means).all() and means.abs().max() < 100
    assert np.isfinite(model.get_latent_representation()).all()


def test_divergence_restores_the_last_complete_epoch() -> None:
    """A NaN put into the decoder at epoch 2: the model holds the end of epoch 1."""
    scvi.settings.seed = 0
    model = _small_model()

    class KeepEpoch1(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                self.state = _state(model)

    keep = KeepEpoch1()
    with pytest.raises(NonFiniteLossError, match="at the end of epoch 1, its last finite"):
        model.train(max_epochs=5, callbacks=[keep, PoisonAt(epoch=2)], **TRAIN)
    _assert_same_state(model, keep.state)
    assert model.is_trained and not model.module.training
    assert np.isfinite(model.get_latent_representation()).all()
    model.train(max_epochs=1, **TRAIN)


def test_diverged_model_given_to_train_asks_for_a_new_model() -> None:
    """A loss that is not finite before any update blames the model, not the lr."""
    scvi.settings.seed = 0
    model = _small_model()
    model.train(max_epochs=1, **TRAIN)
    with torch.no_grad():
        model.module.prior.means.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError) as info:
        model.train(max_epochs=2, **TRAIN)
    message = str(info.value)
    assert "at epoch 0 (step 0)" in message
    assert "Build a new model" in message
    assert "Lower the learning rate" not in message


def test_divergence_with_large_covariates_advises_standardizing() -> None:
    adata = simulate_scatac(n_cells=64, n_peaks=60, n_types=2, seed=2)
    adata.obs["size"] = np.linspace(0, 1e6, adata.n_obs)
    SCALE.setup_anndata(adata, continuous_covariate_keys=["size"])
    scvi.settings.seed = 0
    model = SCALE(adata, n_centroids=2, n_hidden=(16,), n_latent=3)
    with pytest.raises((NonFiniteLossError, ValueError)) as info:
        model.train(max_epochs=3, lr=1e3, gmm_init_epoch=0, **TRAIN)
    assert "standardize them" in _full_message(info.value)


def test_guard_lets_finite_training_through() -> None:
    scvi.settings.seed = 0
    model = _small_model()
    model.train(max_epochs=2, **TRAIN)
    assert model.is_trained
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()


def test_fit_gmm_kmeans_reads_the_partition_as_a_mixture() -> None:
    """k-means: cluster fractions, centroids and within-cluster variances; EM agrees here."""
    rng = np.random.default_rng(0)
    sizes, centers = (60, 30, 10), (-4.0, 0.0, 4.0)
    latent = np.concatenate(
        [rng.normal(c, 0.3, size=(n, 2)) for n, c in zip(sizes, centers, strict=True)]
    )
    weights, means, variances = fit_gmm(latent, 3, seed=0, method="kmeans")
    order = np.argsort(means[:, 0])
    np.testing.assert_allclose(weights[order], np.array(sizes) / 100)
    blocks = np.split(latent, np.cumsum(sizes)[:-1])
    np.testing.assert_allclose(means[order], [b.mean(0) for b in blocks])
    np.testing.assert_allclose(variances[order], [b.var(0) + 1e-4 for b in blocks])
    em_weights, em_means, _ = fit_gmm(latent, 3, seed=0, method="em")
    em_order = np.argsort(em_means[:, 0])
    np.testing.assert_allclose(em_weights[em_order], weights[order], atol=1e-3)
    np.testing.assert_allclose(em_means[em_order], means[order], atol=1e-3)
    # the posterior variances of each component's cells are added to its variance
    _, _, widened = fit_gmm(latent, 3, seed=0, posterior_var=np.full_like(latent, 0.5))
    np.testing.assert_allclose(widened, variances + 0.5)


def test_gmm_init_method_is_checked() -> None:
    with pytest.raises(ValueError, match="method must be 'kmeans', 'em' or 'leiden', got 'gmm'"):
        fit_gmm(np.zeros((10, 2)), 2, method="gmm")
    adata = simulate_scatac(n_cells=64, n_peaks=60, n_types=2, seed=2)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=3)
    with pytest.raises(ValueError, match="gmm_init_method must be 'kmeans', 'em' or 'leiden'"):
        model.train(max_epochs=1, gmm_init_method="gmm")


@pytest.mark.parametrize(
    ("latent", "match"),
    [
        (np.full((30, 3), np.nan), "training diverged. Lower the learning rate"),
        (np.zeros((4, 3)), "Cannot fit 5 mixture components to 4 training cells"),
    ],
    ids=["nan", "too few cells"],
)
def test_fit_gmm_rejects_what_it_cannot_fit(latent: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_gmm(latent, n_components=5)


def test_finite_check_of_the_module_state_finds_any_non_finite_value() -> None:
    """The guard's one-pass check (minimum and maximum) sees a NaN or an infinity in any
    floating tensor, float64 and empty ones included, and ignores integer buffers."""
    from scale_scvi.train._finite_guard import FiniteLossGuard

    module = torch.nn.Linear(3, 2)
    module.register_buffer("index", torch.arange(4))
    module.register_buffer("wide", torch.ones(2, dtype=torch.float64))
    module.register_buffer("empty", torch.ones(0))
    module.register_buffer("columns", torch.ones(5, 3).t())  # column-major, as the encoder's
    assert FiniteLossGuard._finite(module)
    big = torch.full((2, 3), torch.finfo(torch.float32).max)  # finite, summing to infinity
    with torch.no_grad():
        module.weight.copy_(big)
    assert FiniteLossGuard._finite(module)
    cases = [
        ("weight", float("nan")),
        ("bias", float("-inf")),
        ("wide", float("inf")),
        ("columns", float("nan")),
    ]
    for name, value in cases:
        tensor = getattr(module, name)
        kept = tensor.detach().clone()
        with torch.no_grad():
            tensor[(1,) * tensor.ndim] = value
        assert not FiniteLossGuard._finite(module), name
        with torch.no_grad():
            tensor.copy_(kept)
    assert FiniteLossGuard._finite(module)
