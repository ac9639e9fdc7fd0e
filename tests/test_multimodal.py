"""Multimodal SCALE on MuData: mixture posteriors (MoE, MoPoE), shared GMM prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from scvi import REGISTRY_KEYS

from scale_scvi import SCALE
from scale_scvi.data import simulate_multiome
from scale_scvi.module import SCALEVAE, MultiSCALEVAE
from scale_scvi.module._objectives import (
    mixture_log_weights,
    moe_elbo_bound,
    moe_importance_log_weights,
    moe_iwae_bound,
    moe_log_prob,
)
from scale_scvi.module._prior import GaussianMixturePrior

SMALL = {"n_hidden": (32, 16), "n_latent": 4}


@pytest.fixture
def mdata():
    """60 cells x (120 peaks, 80 genes), 3 types; 3 cells lack ATAC, 3 lack RNA."""
    return simulate_multiome(
        n_cells=60, n_peaks=120, n_genes=80, n_types=3, missing_atac=0.05, missing_rna=0.05, seed=2
    )


@pytest.fixture
def trained(mdata):
    """The mixture of the two experts with equal weights, whose joint mean is their mean."""
    SCALE.setup_mudata(mdata, modality_key="modality")
    model = SCALE(mdata, n_centroids=3, posterior="moe", mixture_weights="equal", **SMALL)
    model.train(max_epochs=3, batch_size=32, enable_progress_bar=False)
    return model


# ---------------------------------------------------------------------- objectives
def test_moe_log_prob_matches_explicit_mixture():
    torch.manual_seed(0)
    qz_m, qz_v = torch.randn(2, 5, 3), torch.rand(2, 5, 3) + 0.1
    z = torch.randn(4, 5, 3)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    got = moe_log_prob(z, qz_m, qz_v, mask)
    for b in range(5):
        experts = [
            torch.distributions.Normal(qz_m[m, b], qz_v[m, b].sqrt()).log_prob(z[:, b]).sum(-1)
            for m in range(2)
            if mask[m, b]
        ]
        expected = torch.logsumexp(torch.stack(experts), 0) - math.log(len(experts))
        torch.testing.assert_close(got[:, b], expected)


def test_stratified_bounds_exact_for_the_true_posterior():
    """With q = p(z|x) every importance weight is p(x): both bounds equal log p(x)."""
    prior = GaussianMixturePrior(1, 2, min_var=0.0)
    with torch.no_grad():
        prior.means.zero_()
        prior.log_vars.zero_()
    # x | z ~ N(z, I) in 2-D, observed x; posterior N(x/2, I/2); log p(x) = log N(x; 0, 2I)
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    post_m = (x / 2).expand(2, -1, -1)  # both experts are the exact posterior
    post_v = torch.full_like(post_m, 0.5)
    mask = torch.ones(2, 2, dtype=torch.bool)

    def log_lik(z):
        return torch.distributions.Normal(z, 1.0).log_prob(x).sum(-1)

    log_w, _ = moe_importance_log_weights(log_lik, prior, post_m, post_v, mask, n_particles=3)
    expected = torch.distributions.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)
    torch.testing.assert_close(moe_iwae_bound(log_w, mask), expected)
    torch.testing.assert_close(moe_elbo_bound(log_w, mask), expected)


def test_missing_modality_particles_do_not_count():
    log_w = torch.tensor([[[0.0, 1.0]], [[float("-inf"), 3.0]]])  # (M=2, K=1, B=2)
    mask = torch.tensor([[True, True], [False, True]])
    torch.testing.assert_close(moe_iwae_bound(log_w, mask)[0], torch.tensor(0.0))
    torch.testing.assert_close(moe_elbo_bound(log_w, mask), torch.tensor([0.0, 2.0]))
    expected = torch.logsumexp(torch.tensor([1.0, 3.0]), 0) - math.log(2)
    torch.testing.assert_close(moe_iwae_bound(log_w, mask)[1], expected)


@pytest.mark.parametrize("objective", ["elbo", "iwae", "dreg"])
def test_module_loss_is_finite_and_differentiable(objective):
    torch.manual_seed(0)
    module = MultiSCALEVAE(
        n_input_atac=20, n_input_rna=15, n_centroids=3, objective=objective, n_particles=2, **SMALL
    )
    atac = (torch.rand(6, 20) < 0.3).float()
    rna = torch.poisson(torch.full((6, 15), 3.0))
    atac[0] = 0.0  # a cell without ATAC
    tensors = {
        REGISTRY_KEYS.ATAC_X_KEY: atac,
        REGISTRY_KEYS.X_KEY: rna,
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(6, 1),
    }
    _, _, loss = module(tensors)
    assert torch.isfinite(loss.loss)
    loss.loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert module.encoders["rna"].mean_encoder.weight.grad.abs().sum() > 0


def test_modality_mask_from_zeros_and_flags():
    module = MultiSCALEVAE(
        n_input_atac=4, n_input_rna=3, modality_flags=[[1, 1], [1, 0], [0, 1]], **SMALL
    )
    atac = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
    rna = torch.tensor([[2.0, 0, 0], [1, 0, 0], [3, 0, 1], [1, 1, 1]])
    flag = torch.tensor([[0], [0], [1], [2]])
    mask = module.modality_mask(atac, sp_to_torch(sp.csr_matrix(rna.numpy())), flag)
    expected = torch.tensor([[True, False, True, False], [True, True, False, True]])
    assert torch.equal(mask, expected)


def test_joint_cluster_probabilities_average_the_experts():
    torch.manual_seed(0)
    module = MultiSCALEVAE(n_input_atac=4, n_input_rna=3, n_centroids=3, **SMALL)
    qz_m = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = {
        "qzm_components": qz_m,
        "component_mask": mask,
        "component_log_weights": mixture_log_weights(mask),
    }
    got = module.joint_cluster_probabilities(out)
    resp = module.prior.responsibilities(qz_m)
    torch.testing.assert_close(got[0], (resp[0, 0] + resp[1, 0]) / 2)
    torch.testing.assert_close(got[1], resp[1, 1])
    torch.testing.assert_close(got[2], resp[0, 2])


def test_joint_samples_are_fresh_draws_of_the_mixture():
    # every call draws anew (Monte-Carlo averages over calls are averages over the
    # posterior), and the draws follow the mixture: a cell picks each of its components
    # with its weight, then a draw of that component
    torch.manual_seed(0)
    module = MultiSCALEVAE(n_input_atac=4, n_input_rna=3, n_centroids=3, **SMALL)
    comp_m = torch.tensor([[[-5.0] * 4, [0.0] * 4], [[5.0] * 4, [1.0] * 4]])  # (C=2, B=2, D)
    comp_v = torch.full_like(comp_m, 0.01)
    mask = torch.tensor([[True, True], [True, False]])  # cell 1 has only component 0
    out = {
        "qzm_components": comp_m,
        "qzv_components": comp_v,
        "component_log_weights": mixture_log_weights(mask),
    }
    draws = torch.stack([module.latent_sample(out) for _ in range(2000)])  # (S, B, D)
    assert not torch.equal(draws[0], draws[1])
    upper = (draws[:, 0, 0] > 0).float().mean()
    assert abs(float(upper) - 0.5) < 0.05  # two components of equal weight, far apart
    torch.testing.assert_close(draws[:, 1].mean(0), comp_m[0, 1], atol=0.02, rtol=0)
    # the single-modality module draws from its Gaussian posterior
    single = SCALEVAE(n_input=5, n_centroids=3, **SMALL)
    qz_m, qz_v = torch.zeros(3, 4), torch.full((3, 4), 4.0)
    z = torch.stack([single.latent_sample({"qzm": qz_m, "qzv": qz_v}) for _ in range(2000)])
    assert not torch.equal(z[0], z[1])
    torch.testing.assert_close(z.var(0), qz_v, atol=0.5, rtol=0)


def test_learned_mixture_weights_lean_on_the_better_component():
    """Trained with the stratified ELBO, the weights move to the component that explains x."""
    torch.manual_seed(0)
    prior = GaussianMixturePrior(1, 2, min_var=0.0)
    with torch.no_grad():
        prior.means.zero_()
        prior.log_vars.zero_()
    x = torch.tensor([[1.0, -0.5]])
    # component 0 is the exact posterior N(x/2, I/2); component 1 is far off
    qz_m = torch.stack([x / 2, x / 2 + 3.0])
    qz_v = torch.full_like(qz_m, 0.5)
    mask = torch.ones(2, 1, dtype=torch.bool)
    logits = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)

    def log_lik(z):
        return torch.distributions.Normal(z, 1.0).log_prob(x).sum(-1)

    for _ in range(200):
        log_alpha = mixture_log_weights(mask, logits)
        log_w, _ = moe_importance_log_weights(
            log_lik, prior, qz_m, qz_v, mask, n_particles=8, log_weights=log_alpha
        )
        loss = -moe_elbo_bound(log_w, mask, log_alpha).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.softmax(logits, 0)[0] > 0.9


def test_learned_mixture_weights_in_the_module():
    torch.manual_seed(0)
    module = MultiSCALEVAE(
        n_input_atac=20,
        n_input_rna=15,
        n_centroids=3,
        posterior="moe",
        mixture_weights="learned",
        **SMALL,
    )
    with torch.no_grad():
        module.component_logits.copy_(torch.tensor([0.0, 1.0]))
    atac = (torch.rand(4, 20) < 0.3).float()
    rna = torch.poisson(torch.full((4, 15), 3.0))
    atac[0] = 0.0  # a cell without ATAC: all weight on its RNA expert
    tensors = {
        REGISTRY_KEYS.ATAC_X_KEY: atac,
        REGISTRY_KEYS.X_KEY: rna,
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(4, 1),
    }
    inference_outputs, _, loss = module(tensors)
    weights = inference_outputs["component_log_weights"].exp()
    expected = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(weights[:, 1], expected)
    qz_ms = inference_outputs["qzm_experts"]
    torch.testing.assert_close(
        inference_outputs["qzm"][1], expected[0] * qz_ms[0, 1] + expected[1] * qz_ms[1, 1]
    )
    loss.loss.backward()
    assert module.component_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mixture_weights"):
        MultiSCALEVAE(n_input_atac=20, n_input_rna=15, mixture_weights="softmax", **SMALL)


def sp_to_torch(x: sp.csr_matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.as_tensor(x.indptr), torch.as_tensor(x.indices), torch.as_tensor(x.data), x.shape
    )


# ---------------------------------------------------------------------- model
def test_setup_mudata_picks_the_module(mdata):
    SCALE.setup_mudata(mdata)
    assert isinstance(SCALE(mdata, n_centroids=3, **SMALL).module, MultiSCALEVAE)
    SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac"})
    model = SCALE(mdata, n_centroids=3, **SMALL)
    assert isinstance(model.module, SCALEVAE)
    assert model.module.n_input == mdata.mod["atac"].n_vars
    SCALE.setup_mudata(mdata, modalities={"rna_layer": "rna"})
    model = SCALE(mdata, n_centroids=3, **SMALL)
    assert isinstance(model.module, MultiSCALEVAE) and model.module.modalities == ("rna",)


def test_decoders_start_at_the_average_cell(mdata):
    """ATAC bias = logit(open fraction), RNA bias = centered log mean share; ATAC depth offset."""
    SCALE.setup_mudata(mdata)
    module = SCALE(mdata, n_centroids=3, **SMALL).module
    atac = mdata.mod["atac"].X
    frac = np.asarray((atac > 0).mean(0)).ravel().clip(1e-4, 1 - 1e-4)
    bias = module.decoders["atac"].output.fc_layers[0][0].bias.detach().numpy()
    np.testing.assert_allclose(bias, np.log(frac / (1 - frac)), rtol=1e-4, atol=1e-4)
    mean_open = (atac > 0).sum() / mdata.n_obs
    assert module.log_mean_depth.item() == pytest.approx(np.log(mean_open), rel=1e-5)
    counts = np.asarray(mdata.mod["rna"].X.sum(0)).ravel()
    share = np.log(np.maximum(counts / counts.sum(), 1e-8))
    rna_bias = module.decoders["rna"].output.fc_layers[0][0].bias.detach().numpy()
    np.testing.assert_allclose(rna_bias, share - share.mean(), rtol=1e-4, atol=1e-4)
    x = torch.zeros(2, atac.shape[1])
    x[0, :4] = 1
    x[1, :40] = 1
    offset = module.depth_logit_offset(x).squeeze(-1)
    torch.testing.assert_close(offset, torch.log(torch.tensor([4.0, 40.0])) - np.log(mean_open))


def _has_modality(mdata) -> dict[str, np.ndarray]:
    """Which cells have each modality: flagged, and not an all-zero row."""
    kind = mdata.obs["modality"].to_numpy()
    return {
        m: (np.diff(mdata.mod[m].X.tocsr().indptr) > 0) & (kind != other)
        for m, other in (("atac", "rna"), ("rna", "atac"))
    }


def test_training_and_outputs(trained, mdata):
    n, n_peaks, n_genes = mdata.n_obs, mdata.mod["atac"].n_vars, mdata.mod["rna"].n_vars
    assert trained.module.modalities == ("atac", "rna")
    assert np.isfinite(trained.history["elbo_train"].to_numpy(dtype=float)).all()
    joint = trained.get_latent_representation()
    by_mod = {m: trained.get_latent_representation(modality=m) for m in ("atac", "rna")}
    assert joint.shape == (n, 4)
    # the joint mean is the mean of the means of the modalities a cell has: flagged, and not
    # an all-zero row
    has = _has_modality(mdata)
    assert (has["atac"] & ~has["rna"]).any() and (has["rna"] & ~has["atac"]).any()
    weight = np.stack([has["atac"], has["rna"]], 1).astype(float)
    weight /= weight.sum(1, keepdims=True)
    expected = weight[:, :1] * by_mod["atac"] + weight[:, 1:] * by_mod["rna"]
    np.testing.assert_allclose(joint, expected, atol=1e-5)

    probs = trained.get_cluster_probabilities()
    assert 1 <= trained.n_clusters_ <= 3 and probs.shape == (n, trained.n_clusters_)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert len(trained.get_cluster_assignments()) == n

    acc = trained.get_normalized_accessibility()
    assert acc.shape == (n, n_peaks) and ((acc >= 0) & (acc <= 1)).all()
    assert sp.issparse(trained.get_normalized_accessibility(threshold=0.5))
    expr = trained.get_normalized_expression()
    assert expr.shape == (n, n_genes)
    np.testing.assert_allclose(expr.sum(1), 1.0, atol=1e-4)
    observed = trained.get_normalized_expression(library_size="observed")
    lib = np.asarray(mdata.mod["rna"].X.sum(1)).ravel()
    np.testing.assert_allclose(observed.sum(1), lib, rtol=1e-4)

    assert np.isfinite(float(trained.get_elbo()))
    mll = trained.get_marginal_ll(n_mc_samples=4, return_mean=False)
    assert mll.shape == (n,) and np.isfinite(mll).all()


def test_cross_modal_prediction_uses_one_modality_only(trained, mdata):
    """RNA from ATAC must not change when the RNA changes, and vice versa."""
    from_atac = trained.get_normalized_expression(modality="atac")
    acc_from_rna = trained.get_normalized_accessibility(modality="rna")
    joint = trained.get_normalized_expression(modality="joint")
    altered = mdata.copy()
    rna = altered.mod["rna"].X.tocsr(copy=True)
    rna.data = rna.data[::-1].copy()  # shuffle the counts
    altered.mod["rna"].X = rna
    atac = altered.mod["atac"].X.tocsr(copy=True)
    altered.mod["atac"].X = sp.csr_matrix(atac[::-1].toarray())
    np.testing.assert_array_equal(
        trained.get_normalized_expression(altered, modality="atac"),
        trained.get_normalized_expression(
            _with_mod(mdata, "atac", altered.mod["atac"].X), modality="atac"
        ),
    )
    # RNA changed, ATAC unchanged -> prediction from ATAC unchanged, joint changed
    only_rna = _with_mod(mdata, "rna", rna)
    np.testing.assert_allclose(
        trained.get_normalized_expression(only_rna, modality="atac"), from_atac, rtol=1e-6
    )
    assert not np.allclose(trained.get_normalized_expression(only_rna, modality="joint"), joint)
    # ATAC changed, RNA unchanged -> accessibility from RNA unchanged
    only_atac = _with_mod(mdata, "atac", altered.mod["atac"].X)
    np.testing.assert_allclose(
        trained.get_normalized_accessibility(only_atac, modality="rna"), acc_from_rna, rtol=1e-6
    )


def test_precision_weighted_joint_mean(trained, mdata):
    """``joint_mean="precision"``: the normalized product of the experts each cell has."""
    has = _has_modality(mdata)
    experts = {m: trained.get_latent_representation(modality=m, return_dist=True) for m in has}
    precision = sum(has[m][:, None] / experts[m][1] for m in has)
    expected_m = sum(has[m][:, None] * experts[m][0] / experts[m][1] for m in has) / precision
    mean, var = trained.get_latent_representation(joint_mean="precision", return_dist=True)
    np.testing.assert_allclose(mean, expected_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, 1.0 / precision, rtol=1e-4)
    # a cell with one modality gets that expert's posterior
    only_rna = has["rna"] & ~has["atac"]
    np.testing.assert_allclose(mean[only_rna], experts["rna"][0][only_rna], rtol=1e-5)
    # it differs from the mixture's mean where both experts are present and disagree
    both = has["rna"] & has["atac"]
    mixture = trained.get_latent_representation()
    assert not np.allclose(mean[both], mixture[both], atol=1e-3)
    sample = trained.get_latent_representation(joint_mean="precision", give_mean=False)
    assert sample.shape == mean.shape and not np.allclose(sample, mean)
    with pytest.raises(ValueError, match="joint_mean"):
        trained.get_latent_representation(joint_mean="product")


def _with_mod(mdata, mod, X):
    out = mdata.copy()
    out.mod[mod].X = X
    return out


def test_missing_modality_is_left_out(trained, mdata):
    """A cell flagged as lacking RNA gets the same joint latent whatever its RNA row holds."""
    kind = mdata.obs["modality"].to_numpy()
    atac_only = np.flatnonzero(kind == "atac")
    filled = mdata.copy()
    rna = filled.mod["rna"].X.tolil()
    rna[atac_only] = 5.0  # RNA values in cells flagged as lacking RNA
    filled.mod["rna"].X = sp.csr_matrix(rna)
    a = trained.get_latent_representation(indices=atac_only)
    b = trained.get_latent_representation(filled, indices=atac_only)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_save_load_round_trip(trained, mdata, tmp_path):
    trained.save(tmp_path / "model", overwrite=True, save_anndata=False)
    loaded = SCALE.load(tmp_path / "model", adata=mdata)
    assert isinstance(loaded.module, MultiSCALEVAE)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    np.testing.assert_array_equal(
        loaded.get_normalized_expression(modality="atac"),
        trained.get_normalized_expression(modality="atac"),
    )
    np.testing.assert_array_equal(
        loaded.get_cluster_probabilities(), trained.get_cluster_probabilities()
    )


@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_importance_weighted_training(mdata, objective):
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=3, objective=objective, n_particles=2, **SMALL)
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()
    assert model.get_latent_representation(modality="rna").shape == (mdata.n_obs, 4)


def test_likelihood_scale(mdata):
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=3, likelihood_scale={"atac": 4.0}, **SMALL)
    assert model.module.likelihood_scale == {"atac": 4.0, "rna": 1.0}
    with pytest.raises(ValueError, match="likelihood_scale"):
        SCALE(mdata, n_centroids=3, likelihood_scale={"protein": 2.0}, **SMALL)


def test_input_dropout_per_modality(mdata):
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=3, **SMALL)  # default: none
    assert model.module.encoders["atac"].input_dropout == 0.0
    assert model.module.encoders["rna"].input_dropout == 0.0
    model = SCALE(mdata, n_centroids=3, input_dropout={"atac": 0.5, "rna": 0.2}, **SMALL)
    assert model.module.encoders["atac"].input_dropout == 0.5
    assert model.module.encoders["rna"].input_dropout == 0.2
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    latent = model.get_latent_representation()
    np.testing.assert_array_equal(latent, model.get_latent_representation())  # eval: no dropout
    with pytest.raises(ValueError, match="input_dropout"):
        SCALE(mdata, n_centroids=3, input_dropout={"protein": 0.5}, **SMALL)
    with pytest.raises(ValueError, match="input_dropout"):
        SCALE(mdata, n_centroids=3, input_dropout={"atac": 1.0}, **SMALL)


def test_mopoe_adds_the_product_of_the_experts():
    """posterior="mopoe": the experts' normalized product is one more mixture component."""
    torch.manual_seed(0)
    equal = {"mixture_weights": "equal", **SMALL}
    module = MultiSCALEVAE(
        n_input_atac=20, n_input_rna=15, n_centroids=3, posterior="moe", **equal
    )
    mopoe = MultiSCALEVAE(
        n_input_atac=20, n_input_rna=15, n_centroids=3, posterior="mopoe", **equal
    )
    mopoe.load_state_dict(module.state_dict())
    module.eval(), mopoe.eval()
    atac = (torch.rand(5, 20) < 0.3).float()
    rna = torch.poisson(torch.full((5, 15), 3.0))
    atac[0] = 0.0  # a cell without ATAC: no product, only its RNA expert
    out_moe = module.inference(x_atac=atac, x_rna=rna)
    out = mopoe.inference(x_atac=atac, x_rna=rna)
    qz_ms, qz_vs = out["qzm_experts"], out["qzv_experts"]
    torch.testing.assert_close(qz_ms, out_moe["qzm_experts"])
    assert out["qzm_components"].shape == (3, 5, 4)
    expected_mask = torch.tensor([[False] + [True] * 4, [True] * 5, [False] + [True] * 4])
    assert torch.equal(out["component_mask"], expected_mask)
    # the product of two Gaussians, by its definition
    v = 1.0 / (1.0 / qz_vs[0] + 1.0 / qz_vs[1])
    m = v * (qz_ms[0] / qz_vs[0] + qz_ms[1] / qz_vs[1])
    torch.testing.assert_close(out["qzm_components"][2, 1:], m[1:])
    torch.testing.assert_close(out["qzv_components"][2, 1:], v[1:])
    # mixture moments: three equal components for a paired cell, one for the RNA-only cell
    comps = torch.stack([qz_ms[0], qz_ms[1], m])
    torch.testing.assert_close(out["qzm"][1:], comps.mean(0)[1:])
    torch.testing.assert_close(out["qzm"][0], qz_ms[1, 0])
    second = (torch.stack([qz_vs[0], qz_vs[1], v]) + comps.pow(2)).mean(0) - comps.mean(0) ** 2
    torch.testing.assert_close(out["qzv"][1:], second[1:])
    with pytest.raises(ValueError, match="posterior"):
        MultiSCALEVAE(n_input_atac=20, n_input_rna=15, posterior="poe", **SMALL)


def test_sparse_minibatches_reach_the_module(mdata):
    """Sparse loading (the CPU's default): both modalities reach the module as CSR, and the
    sparse ATAC likelihood gives the dense one's loss and gradients; trained latents differ
    only by the floating-point noise of the two summation orders (amplified by Adam)."""
    SCALE.setup_mudata(mdata, modality_key="modality")
    torch.manual_seed(0)
    scvi.settings.seed = 0
    dense = SCALE(mdata, n_centroids=3, **SMALL)
    dense.train(max_epochs=2, batch_size=32, enable_progress_bar=False, load_sparse_tensor=False)
    scvi.settings.seed = 0
    model = SCALE(mdata, n_centroids=3, **SMALL)
    layouts = set()
    forward = model.module.forward

    def spy(tensors, *args, **kwargs):
        layouts.update(tensors[k].layout for k in (REGISTRY_KEYS.X_KEY, REGISTRY_KEYS.ATAC_X_KEY))
        return forward(tensors, *args, **kwargs)

    model.module.forward = spy
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False, accelerator="cpu")
    assert layouts == {torch.sparse_csr}
    np.testing.assert_allclose(
        model.get_latent_representation(), dense.get_latent_representation(), atol=2e-2
    )
    module = dense.module
    module.train()
    x_rna = torch.as_tensor(mdata.mod["rna"].X[:32].toarray(), dtype=torch.float32)
    x_atac = torch.as_tensor(mdata.mod["atac"].X[:32].toarray(), dtype=torch.float32)
    results = []
    for layout in (lambda t: t, lambda t: t.to_sparse_csr()):
        for p in module.parameters():
            p.grad = None
        torch.manual_seed(0)
        tensors = {
            REGISTRY_KEYS.X_KEY: layout(x_rna),
            REGISTRY_KEYS.ATAC_X_KEY: layout(x_atac),
            REGISTRY_KEYS.BATCH_KEY: torch.zeros(32, 1),
        }
        _, _, loss = module(tensors)
        loss.loss.backward()
        results.append([loss.loss.detach()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_default_posterior_is_mopoe_with_learned_weights(mdata):
    """The default joint posterior: the experts and their product, with learned weights; the
    joint mean is the weighted mean of the components a cell has."""
    SCALE.setup_mudata(mdata, modality_key="modality")
    model = SCALE(mdata, n_centroids=3, **SMALL)
    module = model.module
    assert (module.posterior, module.mixture_weights) == ("mopoe", "learned")
    assert module.dropout_rate == 0.0  # the ATAC model's default dropout is its own
    assert module.component_logits.shape == (3,)  # atac, rna, product
    model.train(max_epochs=3, batch_size=32, enable_progress_bar=False)
    assert not torch.equal(module.component_logits.detach(), torch.zeros(3))
    tensors = next(iter(model._make_data_loader(adata=mdata, batch_size=mdata.n_obs)))
    module.eval()
    with torch.no_grad():
        out = module.inference(**module._get_inference_input(tensors))
    weights = out["component_log_weights"].exp()  # (components, cells)
    torch.testing.assert_close(weights.sum(0), torch.ones(mdata.n_obs))
    has = _has_modality(mdata)
    paired = torch.as_tensor(has["atac"] & has["rna"])
    assert bool((weights[2] > 0)[paired].all()) and bool((weights[2] == 0)[~paired].all())
    expected = (weights.unsqueeze(-1) * out["qzm_components"]).sum(0)
    np.testing.assert_allclose(model.get_latent_representation(), expected.numpy(), atol=1e-5)
    # one modality: one component, no weights to learn
    single = MultiSCALEVAE(n_input_rna=15, n_centroids=3, **SMALL)
    assert single.settings == {"posterior": "mopoe", "mixture_weights": "equal"}
    assert not hasattr(single, "component_logits")


@pytest.mark.parametrize("objective", ["elbo", "dreg"])
def test_mopoe_training_and_marginal_ll(mdata, objective):
    SCALE.setup_mudata(mdata, modality_key="modality")
    model = SCALE(mdata, n_centroids=3, posterior="mopoe", objective=objective, **SMALL)
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()
    probs = model.get_cluster_probabilities()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=4))
    assert model.get_latent_representation().shape == (mdata.n_obs, 4)


# ---------------------------------------------------------------------- validation
def test_setup_mudata_rejects_bad_input(mdata):
    with pytest.raises(TypeError, match="MuData"):
        SCALE.setup_mudata(mdata.mod["atac"])
    with pytest.raises(ValueError, match="not in mdata.mod"):
        SCALE.setup_mudata(mdata, modalities={"atac_layer": "peaks", "rna_layer": "rna"})
    with pytest.raises(ValueError, match="Layer 'counts'"):
        SCALE.setup_mudata(mdata, rna_layer="counts")
    with pytest.raises(ValueError, match="modality_key"):
        SCALE.setup_mudata(mdata, modality_key="nope")

    negative = mdata.copy()
    x = negative.mod["rna"].X.tocsr(copy=True)
    x.data[0] = -1.0
    negative.mod["rna"].X = x
    with pytest.raises(ValueError, match="negative"):
        SCALE.setup_mudata(negative)

    nan = mdata.copy()
    x = nan.mod["atac"].X.tocsr(copy=True)
    x.data[0] = np.nan
    nan.mod["atac"].X = x
    with pytest.raises(ValueError, match="NaN"):
        SCALE.setup_mudata(nan)

    bad_flag = mdata.copy()
    bad_flag.obs["modality"] = bad_flag.obs["modality"].astype(str).replace("paired", "dna")
    with pytest.raises(ValueError, match="name no modality"):
        SCALE.setup_mudata(bad_flag, modality_key="modality")


def test_setup_mudata_rejects_cells_without_data(mdata):
    empty = mdata.copy()
    for mod in ("atac", "rna"):
        x = empty.mod[mod].X.tolil()
        x[0] = 0.0
        empty.mod[mod].X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="no data in any registered modality"):
        SCALE.setup_mudata(empty)


def test_setup_mudata_does_not_modify_the_data(mdata):
    before = {m: mdata.mod[m].X.copy() for m in mdata.mod}
    SCALE.setup_mudata(mdata, modality_key="modality")
    for m, x in before.items():
        assert (mdata.mod[m].X != x).nnz == 0


def test_single_modality_outputs_reject_other_modalities(mdata):
    SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac"})
    model = SCALE(mdata, n_centroids=3, **SMALL)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    assert model.get_latent_representation(modality="atac").shape == (mdata.n_obs, 4)
    with pytest.raises(ValueError, match="modality='rna'"):
        model.get_latent_representation(modality="rna")
    with pytest.raises(ValueError, match="needs RNA"):
        model.get_normalized_expression()


# ---------------------------------------------------------------------- peak selection
def _open_cells(matrix) -> np.ndarray:
    return np.asarray((sp.csr_matrix(matrix) > 0).sum(0)).ravel()


@pytest.mark.parametrize("modalities", [None, {"atac_layer": "atac"}])
def test_setup_mudata_selects_the_atac_peaks(tmp_path, modalities):
    """setup_mudata's n_top_peaks / min_cells choose the ATAC peaks read, as setup_anndata
    does: recorded, saved, applied again to new data, and naming every ATAC output."""
    mdata = simulate_multiome(n_cells=80, n_peaks=120, n_genes=40, n_types=2, seed=0)
    atac = mdata.mod["atac"]
    SCALE.setup_mudata(mdata, modalities=modalities, n_top_peaks=30, min_cells=2)
    scvi.settings.seed = 0
    model = SCALE(mdata, n_centroids=2, **SMALL)
    counts = _open_cells(atac.X)
    selected = atac.var_names.isin(model.selected_peaks_)
    assert selected.sum() == model.module.n_peaks == 30
    assert list(model.selected_peaks_) == list(atac.var_names[selected])  # in matrix order
    assert counts[selected].min() >= max(counts[~selected].max(), 2)
    assert model.module.peak_index is not None
    assert "peaks read: 30" in model._model_summary_string
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)

    acc = model.get_normalized_accessibility(return_numpy=False)
    assert list(acc.columns) == list(model.selected_peaks_)
    group = str(mdata.obs["cell_type"].iloc[0])
    da = model.differential_accessibility(groupby="cell_type", group1=group, n_samples_overall=100)
    assert sorted(da.index) == sorted(model.selected_peaks_)
    if modalities is None:
        from_rna = model.get_normalized_accessibility(modality="rna", return_numpy=True)
        assert from_rna.shape == (mdata.n_obs, 30)

    model.save(tmp_path / "m")
    loaded = SCALE.load(tmp_path / "m", adata=mdata.copy())
    assert list(loaded.selected_peaks_) == list(model.selected_peaks_)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    # new cells whose peak counts differ: the same peaks, not a new choice
    subset = mdata[:30].copy()
    latent = model.get_latent_representation(subset)
    np.testing.assert_allclose(latent, model.get_latent_representation()[:30], atol=1e-5)
    assert model.get_normalized_accessibility(subset, return_numpy=True).shape == (30, 30)


def test_setup_mudata_default_reads_every_peak_below_the_cap():
    mdata = simulate_multiome(n_cells=60, n_peaks=120, n_genes=40, n_types=2, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=2, **SMALL)
    assert model.module.peak_index is None and model.module.n_peaks == 120
    assert list(model.selected_peaks_) == list(mdata.mod["atac"].var_names)
    with pytest.raises(ValueError, match="n_top_peaks"):
        SCALE.setup_mudata(mdata, n_top_peaks=0)


@pytest.mark.parametrize("link", ["cloglog", "logit"])
def test_selected_peaks_at_the_observed_depth(link):
    """normalize_cells=True moves each cell's probabilities to its depth over the peaks the
    model reads, the depth its training offset used, through the model's link."""
    from scale_scvi.data import simulate_scatac

    adata = simulate_scatac(n_cells=60, n_peaks=200, n_types=2, seed=0)
    SCALE.setup_anndata(adata, n_top_peaks=80, min_fraction=None)
    model = SCALE(adata, n_centroids=2, n_hidden=(16,), atac_link=link)
    model.train(max_epochs=1, enable_progress_bar=False)
    mean_depth = model.get_normalized_accessibility(return_numpy=True)
    at_depth = model.get_normalized_accessibility(normalize_cells=True, return_numpy=True)
    x = sp.csr_matrix(adata[:, model.selected_peaks_].X)
    depth = np.log(np.maximum(np.diff((x > 0).tocsr().indptr), 1))
    offset = depth - float(model.module.log_mean_depth)
    # the offset is added to the decoder output eta, through the model's link (whose
    # formulas test_model checks)
    module = model.module
    eta = module.inverse_link(torch.as_tensor(mean_depth, dtype=torch.float64))
    expected = module.open_probability(eta + torch.as_tensor(offset)[:, None]).numpy()
    np.testing.assert_allclose(at_depth, expected, rtol=1e-3)


# ---------------------------------------------------------------------- held-out expert check
def _heldout_fit(atac, rna, product, gain_atac=0.0, gain_rna=0.0):
    """heldout_fit's ``(M + 2, M, N)`` from each candidate's total over the modalities (split
    0.3 / 0.7 between them) and the product's gain over the shared latent on each."""
    rows = torch.stack([atac, rna, product])  # (3, N)
    fit = torch.stack([0.3 * rows, 0.7 * rows], 1)  # (3, 2, N)
    gains = [torch.broadcast_to(torch.as_tensor(g), product.shape) for g in (gain_atac, gain_rna)]
    shared = fit[2] - torch.stack(gains)
    return torch.cat([fit, shared.unsqueeze(0)])


def test_select_experts_on_keeps_an_expert_only_where_it_helps():
    """An expert goes when the other expert alone explains held-out cells better than the
    product of both, by more than two standard errors, unless the product explains the
    expert's own modality better than a latent shared by all cells by at least ``min_gain``
    nats per cell (and two standard errors); the better one stays if both would go; weak
    evidence keeps both."""
    module = MultiSCALEVAE(n_input_atac=20, n_input_rna=15, n_centroids=3, **SMALL)
    assert module.expert_active.tolist() == [True, True]
    gen = torch.Generator().manual_seed(0)
    product = -100.0 + torch.randn(50, generator=gen)
    atac = product - 30.0  # ATAC alone is far worse than the product
    noise = torch.randn(50, generator=gen)
    for shift, spread, expected in ((1.0, 0.5, [False, True]), (0.1, 2.0, [True, True])):
        rna = product + shift + spread * (noise - noise.mean()) / noise.std()
        # the product explains neither modality better than the shared latent
        report = module.select_experts_on(_heldout_fit(atac, rna, product))
        assert module.expert_active.tolist() == expected
        assert report["z_atac"] == pytest.approx(shift / (spread / math.sqrt(50)), rel=1e-4)
        assert report["z_rna"] < -100  # without the RNA expert the fit is far worse
        assert report["gain_atac"] == pytest.approx(0.0, abs=1e-9)
        assert report["n_cells"] == 50
        assert report["product"] == pytest.approx(float(product.mean()), rel=1e-6)
        assert report["shared"] == pytest.approx(float(product.mean()), rel=1e-6)
    # The same evidence against the ATAC expert in sum, but the product explains the ATAC
    # 3 nats per cell better than the shared latent: its expert stays. Below min_gain, or
    # not above noise, it goes.
    rna = product + 1.0 + 0.5 * (noise - noise.mean()) / noise.std()
    for gain, expected in (
        (3.0 + 0.5 * noise, [True, True]),
        (0.5 + 0.1 * noise, [False, True]),  # z of the gain large, the gain small
        (3.0 + 30.0 * noise, [False, True]),  # the gain within its noise
    ):
        fit = _heldout_fit(atac, rna, product, gain_atac=gain)
        report = module.select_experts_on(fit)
        assert module.expert_active.tolist() == expected, gain.mean()
        assert report["gain_atac"] == pytest.approx(float(gain.mean()), rel=1e-5)
        assert report["z_atac"] == pytest.approx(1.0 / (0.5 / math.sqrt(50)), rel=1e-4)
    module.select_experts_on(
        _heldout_fit(atac, rna, product, gain_atac=0.5 + 0.1 * noise), min_gain=0.4
    )
    assert module.expert_active.tolist() == [True, True]
    # both experts alone beat the product: the better one stays
    module.select_experts_on(_heldout_fit(product + 5.0 + noise, product + 3.0 + noise, product))
    assert module.expert_active.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"\(M \+ 2, M, N\)"):
        module.select_experts_on(torch.stack([atac, rna, product]))


def test_a_switched_off_expert_encodes_only_cells_without_the_other():
    torch.manual_seed(0)
    module = MultiSCALEVAE(n_input_atac=20, n_input_rna=15, n_centroids=3, **SMALL).eval()
    atac = (torch.rand(4, 20) < 0.3).float()
    rna = torch.poisson(torch.full((4, 15), 3.0))
    rna[0] = 0.0  # a cell with ATAC only
    module.expert_active.copy_(torch.tensor([False, True]))
    out = module.inference(x_atac=atac, x_rna=rna)
    # the likelihood still reads every modality a cell has; the posterior only the RNA's
    assert out["modality_mask"].tolist() == [[True] * 4, [False, True, True, True]]
    assert out["expert_mask"].tolist() == [[True, False, False, False], [False] + [True] * 3]
    # the components the minibatch uses: the ATAC expert (cell 0) and the RNA expert; the
    # product, which would be of one expert, is left out
    assert out["component_mask"].tolist() == [
        [True, False, False, False],
        [False, True, True, True],
    ]
    assert out["qzm_components"].shape[0] == 2
    torch.testing.assert_close(out["qzm"][1:], out["qzm_rna"][1:])
    torch.testing.assert_close(out["qzm"][0], out["qzm_atac"][0])
    # paired cells only: one component, of weight one, whatever the learned weights
    paired = module.inference(x_atac=atac, x_rna=torch.poisson(torch.full((4, 15), 3.0)))
    assert paired["component_mask"].tolist() == [[True] * 4]
    assert paired["component_log_weights"].tolist() == [[0.0] * 4]
    torch.testing.assert_close(paired["qzm"], paired["qzm_rna"])
    # the switched-off modality's networks are clipped apart from the rest
    apart = {id(p) for p in module.separately_clipped_parameters()}
    atac_side = [*module.encoders["atac"].parameters(), *module.decoders["atac"].parameters()]
    assert apart == {id(p) for p in atac_side}
    module.expert_active.fill_(True)
    assert module.separately_clipped_parameters() == []
    # a module state saved before the check existed loads with every expert on
    state = {k: v for k, v in module.state_dict().items() if k != "expert_active"}
    fresh = MultiSCALEVAE(n_input_atac=20, n_input_rna=15, n_centroids=3, **SMALL)
    fresh.expert_active.fill_(False)
    fresh.load_state_dict(state)
    assert fresh.expert_active.tolist() == [True, True]


def test_experts_all_on_follows_every_change_of_the_buffer():
    """``inference`` reads whether every expert is on from a host copy; the copy follows the
    buffer through the held-out check's ``copy_``, in-place fills, ``load_state_dict`` and
    ``to``, and an unchanged buffer is not read again."""
    module = MultiSCALEVAE(n_input_atac=20, n_input_rna=15, n_centroids=3, **SMALL).eval()
    atac = (torch.rand(4, 20) < 0.3).float()
    rna = torch.poisson(torch.full((4, 15), 3.0))
    assert module.experts_all_on
    assert module.inference(x_atac=atac, x_rna=rna)["qzm_components"].shape[0] == 3
    module.expert_active.copy_(torch.tensor([False, True]))
    assert not module.experts_all_on
    assert module.inference(x_atac=atac, x_rna=rna)["qzm_components"].shape[0] == 1
    module.expert_active.fill_(True)
    assert module.experts_all_on
    off = {k: v.clone() for k, v in module.state_dict().items()}
    off["expert_active"] = torch.tensor([True, False])
    module.load_state_dict(off)
    assert not module.experts_all_on
    module.load_state_dict({**off, "expert_active": torch.tensor([True, True])}, assign=True)
    assert module.experts_all_on
    module.to(torch.float64)  # a new buffer of the same values (bool buffers keep their dtype)
    assert module.experts_all_on
    # no change: the cached value is returned without reading the buffer
    module._experts_all_on = (module._experts_all_on[0], False)
    assert not module.experts_all_on
    # a buffer made under inference mode has no version counter: read every time
    with torch.inference_mode():
        module.to(torch.float32)
        module.expert_active = torch.tensor([False, True])
    assert module.expert_active.is_inference() and not module.experts_all_on


def test_a_switched_off_modality_is_decoded_without_moving_the_latent():
    """With the ATAC expert off, the ATAC likelihood still trains the ATAC decoder, but its
    gradient stops at the latent of cells encoded by the RNA expert (the RNA encoder gets
    none of it); a cell with ATAC only is still encoded, and trained, through its expert."""
    torch.manual_seed(0)
    module = MultiSCALEVAE(
        n_input_atac=20, n_input_rna=15, n_centroids=3, likelihood_scale={"rna": 1e-30}, **SMALL
    )
    atac = (torch.rand(4, 20) < 0.3).float()
    rna = torch.poisson(torch.full((4, 15), 3.0))

    def grads(rna_in):
        module.zero_grad()
        tensors = {
            REGISTRY_KEYS.ATAC_X_KEY: atac,
            REGISTRY_KEYS.X_KEY: rna_in,
            REGISTRY_KEYS.BATCH_KEY: torch.zeros(4, 1),
        }
        _, _, loss = module(tensors, loss_kwargs={"kl_weight": 0.0})
        loss.loss.backward()
        first = lambda enc: next(enc.parameters()).grad  # noqa: E731
        return (
            first(module.encoders["rna"]),
            first(module.encoders["atac"]),
            module.decoders["atac"],
        )

    g_rna, _, dec = grads(rna)
    assert g_rna is not None and g_rna.abs().sum() > 0  # both experts on: ATAC moves z
    module.expert_active.copy_(torch.tensor([False, True]))
    g_rna, g_atac, dec = grads(rna)
    # the RNA likelihood weighs 1e-30 and the KL 0: only the ATAC likelihood could move it
    assert g_rna is None or float(g_rna.abs().max()) < 1e-20
    assert g_atac is None or not g_atac.any()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())
    rna_one_missing = rna.clone()
    rna_one_missing[0] = 0.0  # a cell with ATAC only: its expert encodes it and learns
    _, g_atac, _ = grads(rna_one_missing)
    assert g_atac is not None and g_atac.abs().sum() > 0


def _pair_with_noise(modality: str, seed: int = 0):
    """400 paired cells of 3 types in which one modality is noise: ATAC the same random
    draw for every type (about 15 of 300 peaks open per cell), or RNA counts of one profile
    for every type. Nothing in the noise holds beyond a cell."""
    mdata = simulate_multiome(n_cells=400, n_peaks=300, n_genes=200, n_types=3, seed=seed)
    rng = np.random.default_rng(seed)
    if modality == "atac":
        noise = (rng.random((400, 300)) < 0.05).astype(np.float32)
    else:
        profile = rng.lognormal(size=200)
        noise = rng.poisson(2000 * profile / profile.sum(), size=(400, 200)).astype(np.float32)
    mdata.mod[modality].X = sp.csr_matrix(noise)
    return mdata


@pytest.mark.parametrize("noise", ["atac", "rna"])
def test_train_leaves_out_an_expert_that_does_not_hold_on_new_cells(noise):
    """select_experts=True with train()'s default validation split: the expert of a modality
    that is noise is left out of the posterior at the end of the KL warm-up (its likelihood
    stays), and training starts again from the initial weights without it; without
    validation cells or with too short a warm-up every expert stays, and with
    select_experts=False no check is made."""
    mdata = _pair_with_noise(noise)
    SCALE.setup_mudata(mdata)
    scvi.settings.seed = 0
    model = SCALE(mdata, n_centroids=3, select_experts=True, **SMALL)
    initial = {k: v.clone() for k, v in model.module.encoders[noise].state_dict().items()}
    # 23 steps per epoch: the check at the start of epoch 22 follows 506 steps; the user is
    # told which modality no longer shapes the latent, and how to keep it
    with pytest.warns(UserWarning, match=f"left the {noise} expert out.*select_experts=False"):
        model.train(max_epochs=24, batch_size=16, n_epochs_kl_warmup=22, enable_progress_bar=False)
    informative = "rna" if noise == "atac" else "atac"
    assert model.module.expert_active.tolist() == [m != noise for m in ("atac", "rna")]
    assert model.expert_check_[f"z_{noise}"] > 2.0
    # The run that counts started from the initial weights with the noise expert off: its
    # encoder gets no gradient, and only weight decay moved its weights, by less than 1e-3
    # (22 epochs of training would have moved them by far more); and that run went through
    # the whole schedule ...
    trained = model.module.encoders[noise].state_dict()
    for key, value in initial.items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(trained[key].float(), value.float(), atol=1e-3, rtol=0)
    assert len(model.history["elbo_train"]) == 24
    # ... in training mode: the informative encoder's batch norm saw every one of its 24 x 23
    # minibatches (none of the first run's, whose state was discarded)
    kept = model.module.encoders[informative].state_dict()
    assert int(kept["layers.0.fc_layers.Layer 0.1.num_batches_tracked"]) == 24 * 23
    # every cell's latent is now its informative expert's
    np.testing.assert_allclose(
        model.get_latent_representation(),
        model.get_latent_representation(modality=informative),
        atol=1e-5,
    )
    # The new start is the model with the noise expert off from the first step: the same
    # initial weights and random state, the same latent.
    scvi.settings.seed = 0
    off = SCALE(mdata, n_centroids=3, select_experts=False, **SMALL)
    off.module.expert_active.copy_(torch.tensor([m != noise for m in ("atac", "rna")]))
    off.train(max_epochs=24, batch_size=16, n_epochs_kl_warmup=22, enable_progress_bar=False)
    np.testing.assert_array_equal(
        off.get_latent_representation(), model.get_latent_representation()
    )
    if noise == "rna":
        return
    # With the ATAC expert out, the joint model trains its latent as the RNA-only model of
    # the same seed does (the same initial RNA weights, the same random stream, one mixture
    # component, the ATAC networks clipped apart): the same latent and clusters, to the bit.
    rna_only = _pair_with_noise(noise)
    SCALE.setup_mudata(rna_only, modalities={"rna_layer": "rna"})
    scvi.settings.seed = 0
    alone = SCALE(rna_only, n_centroids=3, **SMALL)
    alone.train(max_epochs=24, batch_size=16, n_epochs_kl_warmup=22, enable_progress_bar=False)
    np.testing.assert_array_equal(
        alone.get_latent_representation(), model.get_latent_representation()
    )
    np.testing.assert_array_equal(
        alone.get_cluster_probabilities(), model.get_cluster_probabilities()
    )
    for kwargs in ({"train_size": 1.0}, {"n_epochs_kl_warmup": 2}):
        model = SCALE(mdata, n_centroids=3, select_experts=True, **SMALL)
        model.train(max_epochs=3, batch_size=16, enable_progress_bar=False, **kwargs)
        assert model.module.expert_active.tolist() == [True, True]
    assert SCALE(mdata, n_centroids=3, **SMALL).module.select_experts is True  # the default
    model = SCALE(mdata, n_centroids=3, select_experts=False, **SMALL)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert not any(type(c).__name__ == "ExpertCheckCallback" for c in model.trainer.callbacks)
    assert model.expert_check_ is None


def _complementary_pair(n_cells: int, seed: int = 0):
    """Paired cells whose ATAC knows one of three groups ``a`` and whose RNA knows one of two
    groups ``r``, drawn independently: the six types ``(a, r)`` need both modalities."""
    from mudata import MuData

    atac = simulate_multiome(n_cells=n_cells, n_peaks=400, n_genes=50, n_types=3, seed=seed)
    rna = simulate_multiome(n_cells=n_cells, n_peaks=50, n_genes=300, n_types=2, seed=seed + 1)
    order = np.random.default_rng(seed).permutation(n_cells)
    atac_mod, rna_mod = atac.mod["atac"].copy(), rna.mod["rna"][order].copy()
    rna_mod.obs_names = atac_mod.obs_names
    a_types = atac.obs["cell_type"].astype(str).to_numpy()
    truth = a_types + "/" + rna.obs["cell_type"].astype(str).to_numpy()[order]
    return MuData({"atac": atac_mod, "rna": rna_mod}), truth


@pytest.mark.parametrize(
    ("n_cells", "network", "max_epochs", "n_epochs_kl_warmup"),
    [(2400, {"n_hidden": (128, 64)}, 12, 8), (480, {}, 60, 40)],
)
def test_train_keeps_both_experts_where_each_modality_knows_part_of_the_types(
    n_cells, network, max_epochs, n_epochs_kl_warmup
):
    """With the defaults (the held-out check of the experts on), a pair whose modalities carry
    different halves of the types keeps both experts, and its joint latent tells the types
    apart better than either expert's, each of which knows only its own groups. On 480 cells
    the product explains the held-out cells worse in sum than the RNA expert alone (RNA
    weighs more nats), and the ATAC expert stays because the latent explains their ATAC
    better than one latent shared by all of them (``benchmarks/multiome_heldout.md``)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    mdata, truth = _complementary_pair(n_cells=n_cells)
    assert len(set(truth)) == 6
    SCALE.setup_mudata(mdata)
    scvi.settings.seed = 0
    model = SCALE(mdata, n_centroids=6, **network)
    assert model.module.select_experts  # the default
    # at least 500 steps before the check at the end of the KL warm-up (2,400 cells: 68 steps
    # per epoch, 544; 480 cells: 14 per epoch, 560)
    model.train(
        max_epochs=max_epochs, n_epochs_kl_warmup=n_epochs_kl_warmup, enable_progress_bar=False
    )
    report = model.expert_check_
    assert model.module.expert_active.tolist() == [True, True]
    # the latent explains each modality of new cells better than knowing nothing of them
    assert report["gain_atac"] >= 1.0 and report["z_gain_atac"] > 2.0
    assert report["gain_rna"] >= 1.0 and report["z_gain_rna"] > 2.0
    if n_cells == 2400:
        # The sum alone keeps both experts: the product explains the held-out cells much
        # better than the ATAC expert alone (z_rna about -10), and not worse than the RNA
        # expert alone by the check's 2 standard errors (z_atac -1.4 on one CPU, below -2 on
        # another: the RNA expert weighs most of the nats, so the margin is small and the
        # machine's float rounding moves it).
        assert report["z_rna"] < -2.0 and report["z_atac"] < 2.0
    else:  # the sum alone would leave the ATAC expert out
        assert report["z_atac"] > 2.0

    def ari(latent):
        labels = KMeans(6, n_init=10, random_state=0).fit_predict(latent)
        return adjusted_rand_score(truth, labels)

    joint = ari(model.get_latent_representation())
    experts = {m: ari(model.get_latent_representation(modality=m)) for m in ("atac", "rna")}
    if n_cells == 2400:
        # 12 short epochs of a narrow network: joint 0.84-0.99 on seeds 0-3, both experts
        # kept on each (0.92 on seed 0, the ATAC expert 0.84 and the RNA expert 0.24 on
        # this machine). With SMALL's (32, 16) encoders, 8 epochs of warm-up taught the ATAC
        # expert its groups on one seed of four, and the check then rightly left it out.
        assert joint > 0.8 and joint > max(experts.values()), (joint, experts)
        # a check that keeps every expert does not move training's random stream: the
        # same model as without the check
        scvi.settings.seed = 0
        unchecked = SCALE(mdata, n_centroids=6, select_experts=False, **network)
        unchecked.train(
            max_epochs=max_epochs, n_epochs_kl_warmup=n_epochs_kl_warmup, enable_progress_bar=False
        )
        np.testing.assert_array_equal(
            unchecked.get_latent_representation(), model.get_latent_representation()
        )
    else:  # 0.91 on this machine; with the ATAC expert left out, about 0.2
        assert joint > 0.8, (joint, experts)


def test_decoder_weight_decay_is_refused_with_rna(mdata):
    SCALE.setup_mudata(mdata, modality_key="modality")
    model = SCALE(mdata, n_centroids=3, **SMALL)
    with pytest.raises(ValueError, match="decoder_weight_decay is an argument of the model of"):
        model.train(max_epochs=1, decoder_weight_decay=0.1, enable_progress_bar=False)
