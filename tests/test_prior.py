"""The Gaussian-mixture prior and the closed-form part of the SCALE ELBO."""

import torch
from torch.distributions import Normal

from scale_scvi.module import GaussianMixturePrior
from scale_scvi.module._objectives import gmm_kl


def _prior(k=5, d=3, seed=0):
    torch.manual_seed(seed)
    prior = GaussianMixturePrior(k, d)
    with torch.no_grad():
        prior.logits.normal_()
        prior.means.normal_(0, 2)
        prior.log_vars.normal_(0, 0.5)
    return prior


def test_log_prob_matches_mixture_same_family():
    prior = _prior()
    z = torch.randn(64, 3) * 3
    expected = prior.distribution().log_prob(z)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-5, atol=1e-5)
    # batched particles (K, B, D)
    zz = torch.randn(4, 16, 3)
    torch.testing.assert_close(prior.log_prob(zz), prior.distribution().log_prob(zz))


def test_log_prob_is_finite_far_from_every_component():
    prior = _prior()
    z = torch.full((2, 3), 1e4)
    assert torch.isfinite(prior.log_prob(z)).all()
    assert torch.isfinite(prior.responsibilities(z)).all()


def test_responsibilities_sum_to_one_and_match_bayes():
    prior = _prior()
    z = torch.randn(50, 3)
    gamma = prior.responsibilities(z)
    torch.testing.assert_close(gamma.sum(-1), torch.ones(50))
    comp = prior.distribution().component_distribution
    joint = comp.log_prob(z.unsqueeze(1)) + torch.log_softmax(prior.logits, -1)
    torch.testing.assert_close(gamma, torch.softmax(joint, -1), rtol=1e-5, atol=1e-6)


def test_variances_are_floored_and_weights_normalized():
    prior = _prior()
    with torch.no_grad():
        prior.log_vars.fill_(-1e3)
    assert (prior.variances >= prior.min_var).all()
    torch.testing.assert_close(prior.weights.sum(), torch.tensor(1.0))


def test_expected_component_log_prob_matches_monte_carlo():
    prior = _prior()
    torch.manual_seed(1)
    m, v = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    z = Normal(m, v.sqrt()).sample((200_000,))
    comp = prior.distribution().component_distribution
    mc = comp.log_prob(z.unsqueeze(-2)).mean(0)  # (4, K)
    closed = prior.expected_component_log_prob(m, v)
    torch.testing.assert_close(closed, mc, rtol=0, atol=0.03)


def test_closed_form_kl_matches_monte_carlo():
    """KL(q(z|x) q(c|x) || p(z, c)) in closed form equals its Monte Carlo estimate."""
    prior = _prior()
    torch.manual_seed(2)
    m, v = torch.randn(6, 3), torch.rand(6, 3) + 0.1
    gamma = torch.softmax(torch.randn(6, 5), -1)
    closed = gmm_kl(prior, m, v, gamma)

    qz = Normal(m, v.sqrt())
    z = qz.sample((200_000,))
    log_q_z = qz.log_prob(z).sum(-1)
    comp = prior.distribution().component_distribution
    log_p_zc = comp.log_prob(z.unsqueeze(-2)) + torch.log_softmax(prior.logits, -1)
    mc = (log_q_z + (gamma * (gamma.log() - log_p_zc)).sum(-1)).mean(0)
    torch.testing.assert_close(closed, mc, rtol=0, atol=0.05)


def test_set_parameters_round_trip():
    prior = _prior()
    w = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    mu = torch.randn(5, 3)
    var = torch.rand(5, 3) + 0.05
    prior.set_parameters(w, mu, var)
    torch.testing.assert_close(prior.weights, w)
    torch.testing.assert_close(prior.means.data, mu)
    torch.testing.assert_close(prior.variances, var)


def test_set_parameters_with_fewer_components_switches_the_rest_off():
    prior = _prior(k=5)
    prior.set_parameters(torch.tensor([0.25, 0.75]), torch.randn(2, 3), torch.ones(2, 3))
    assert prior.active.tolist() == [True, True, False, False, False]
    assert prior.n_active == 2
    torch.testing.assert_close(prior.weights[:2], torch.tensor([0.25, 0.75]))
    assert (prior.weights[2:] == 0).all()
    resp = prior.responsibilities(torch.randn(7, 3) * 5)
    assert (resp[:, 2:] == 0).all()
    torch.testing.assert_close(resp.sum(-1), torch.ones(7))


def test_pruned_components_take_no_cell_and_no_gradient():
    prior = _prior(k=4)
    assert prior.prune(torch.tensor([True, False, True, True])) == 1
    assert prior.weights[1] == 0 and prior.n_active == 3
    qz_m, qz_v = torch.randn(6, 3), torch.rand(6, 3) + 0.1
    gamma = prior.responsibilities(qz_m)
    kl = gmm_kl(prior, qz_m, qz_v, gamma)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert prior.logits.grad[1] == 0
    assert (prior.means.grad[1] == 0).all() and (prior.log_vars.grad[1] == 0).all()
    # the pruned mixture is the mixture of the components left, renormalized
    kept = GaussianMixturePrior(3, 3)
    kept.set_parameters(
        prior.weights[[0, 2, 3]].detach(),
        prior.means[[0, 2, 3]].detach(),
        prior.variances[[0, 2, 3]].detach(),
    )
    z = torch.randn(5, 3)
    torch.testing.assert_close(prior.log_prob(z), kept.log_prob(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prior.distribution().log_prob(z), prior.log_prob(z))


def test_prune_keeps_at_least_one_component():
    prior = _prior(k=3)
    prior.prune(torch.tensor([False, False, False]))
    assert prior.n_active == 1
    assert prior.active[prior.logits.argmax()]


def test_active_mask_is_saved_and_old_checkpoints_load_with_every_component_on():
    prior = _prior(k=4)
    prior.prune(torch.tensor([True, True, False, True]))
    state = prior.state_dict()
    restored = GaussianMixturePrior(4, 3)
    restored.load_state_dict(state)
    assert restored.active.tolist() == [True, True, False, True]
    old = {k: v for k, v in state.items() if k != "active"}
    legacy = GaussianMixturePrior(4, 3)
    legacy.prune(torch.tensor([True, False, False, False]))
    legacy.load_state_dict(old)
    assert legacy.active.all()
