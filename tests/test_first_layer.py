"""The encoder's sparse first layer and the fused AdamW give the same numbers as the plain ones."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scale_scvi.module._components import SCALEEncoder
from scale_scvi.train import FusedAdamW


def _covariates(n_cat_list):
    """Categorical (when ``n_cat_list``) and one continuous covariate for 7 cells."""
    cats = [torch.tensor([[0], [1], [2], [0], [1], [2], [0]])] if n_cat_list else []
    return cats, torch.linspace(-1, 1, 7).unsqueeze(1)


def _batch(n_cells=7, n_peaks=40, seed=0, density=0.2):
    X = sp.random(
        n_cells, n_peaks, density=density, format="csr", dtype=np.float32, random_state=seed
    )
    X[0] = 0  # a cell with no open peak
    X.eliminate_zeros()
    dense = torch.from_numpy(X.toarray())
    return dense, dense.to_sparse_csr()


@pytest.mark.parametrize("density", [0.2, 0.05])
@pytest.mark.parametrize("n_cat_list", [[], [3]])
def test_sparse_first_layer_matches_dense(n_cat_list, density):
    torch.manual_seed(0)
    enc = SCALEEncoder(40, 4, (16, 8), n_cat_list=n_cat_list, n_cont=1)
    weight = enc.layers[0].fc_layers[0][0].weight
    assert weight.shape == (16, 40 + sum(n_cat_list) + 1)
    assert weight.t().is_contiguous()  # column-major storage
    dense, sparse = _batch(density=density)
    cats, cont = _covariates(n_cat_list)
    results = []
    for x in (dense, sparse):
        enc.zero_grad()
        m, v = enc(x, *cats, cont=cont)
        (m.pow(2).sum() + v.sum()).backward()
        results.append((m.detach(), v.detach(), weight.grad.clone()))
        assert weight.grad.stride() == weight.stride()
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the reference: FCLayers' own forward on the dense input
    h_ref = enc.layers[0](dense, *cats, cont=cont)
    from scale_scvi.module._components import _first_layer

    torch.testing.assert_close(
        _first_layer(enc.layers[0], enc.first_layer, sparse, cats, cont), h_ref
    )


def test_column_major_layout_survives_state_dict():
    enc = SCALEEncoder(40, 4, (16, 8))
    other = SCALEEncoder(40, 4, (16, 8))
    other.load_state_dict(enc.state_dict())
    w = other.layers[0].fc_layers[0][0].weight
    assert w.t().is_contiguous()
    torch.testing.assert_close(w, enc.layers[0].fc_layers[0][0].weight)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_fused_adamw_matches_torch_adamw(max_grad_norm, sparse):
    """Same steps as torch's AdamW, after clip_grad_norm_ when clipping (0.5 clips here);
    with sparse input the first layer's gradient norm comes from its backward."""
    torch.manual_seed(0)
    enc1 = SCALEEncoder(40, 4, (16, 8), n_cat_list=[3])
    enc2 = copy.deepcopy(enc1)
    opt1 = torch.optim.AdamW(enc1.parameters(), lr=1e-2, eps=1e-8, weight_decay=5e-4)
    opt2 = FusedAdamW(
        enc2.parameters(),
        lr=1e-2,
        eps=1e-8,
        weight_decay=5e-4,
        max_grad_norm=max_grad_norm,
        in_place_layers=[enc2.first_layer],
    )
    # the dense minibatch is too dense for the gather path: plain autograd
    dense, csr = _batch(density=0.05 if sparse else 0.2)
    cats, _ = _covariates([3])
    for _ in range(5):
        for enc, opt in ((enc1, opt1), (enc2, opt2)):
            opt.zero_grad()
            m, v = enc(csr if sparse else dense, *cats)
            (m.pow(2).sum() + v.sum()).backward()
            if max_grad_norm is not None and opt is opt1:
                norm = torch.nn.utils.clip_grad_norm_(enc.parameters(), max_grad_norm)
                assert norm > max_grad_norm
            opt.step()
    for p1, p2 in zip(enc1.parameters(), enc2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
    w = enc2.layers[0].fc_layers[0][0].weight
    assert w.t().is_contiguous()
    assert (enc2.first_layer.grad_sq_norm() is not None) == sparse
    assert not torch.equal(w, SCALEEncoder(40, 4, (16, 8)).layers[0].fc_layers[0][0].weight)
    # the optimizer state loads into torch's AdamW and back
    opt3 = torch.optim.AdamW(enc2.parameters(), lr=1e-2)
    opt3.load_state_dict(opt2.state_dict())


# 0.05: the sparse products; 0.3: above DENSE_PRODUCT_DENSITY, the dense products
@pytest.mark.parametrize("density", [0.05, 0.3])
@pytest.mark.parametrize("n_cat_list", [[], [3]])
def test_inplace_weight_gradient_equals_autograd(n_cat_list, density):
    """The sparse path writes dW into weight.grad itself: same values as autograd's,
    accumulated over backward passes, column-major, and kept (zeroed) by zero_grad."""
    torch.manual_seed(0)
    enc = SCALEEncoder(40, 4, (16, 8), n_cat_list=n_cat_list, n_cont=1)
    weight = enc.layers[0].fc_layers[0][0].weight
    dense, sparse = _batch(density=density)
    cats, cont = _covariates(n_cat_list)

    def loss(x):
        m, v = enc(x, *cats, cont=cont)
        return m.pow(2).sum() + v.sum()

    # reference: the plain autograd path, forced by a (no-op) hook on the weight
    handle = weight.register_hook(lambda g: g)
    assert not enc.first_layer._inplace_grad_ok()
    enc.zero_grad()
    loss(sparse).backward()
    loss(sparse).backward()
    reference = weight.grad.clone()
    handle.remove()
    assert enc.first_layer._inplace_grad_ok()
    opt = FusedAdamW(enc.parameters(), in_place_layers=[enc.first_layer])
    opt.zero_grad()
    assert weight.grad is None
    loss(sparse).backward()
    loss(sparse).backward()  # accumulates, as autograd does
    torch.testing.assert_close(weight.grad, reference)
    assert weight.grad.stride() == weight.stride()
    grad = weight.grad
    opt.zero_grad()
    assert weight.grad is grad and not grad.any()
    # the other parameters are reset as usual
    assert all(p.grad is None for p in enc.parameters() if p is not weight)


# 0.0: the whole gradient zeroed in one pass; 2.0: only the written rows, row by row
@pytest.mark.parametrize("zero_all_fraction", [0.0, 2.0])
def test_zero_grad_clears_every_written_row(zero_all_fraction, monkeypatch):
    """zero_grad zeroes only the rows the sparse path wrote, and everything once a dense
    (autograd) pass has written the gradient, also when it runs between forward and
    backward as in Lightning's loop."""
    from scale_scvi.module import _components

    monkeypatch.setattr(_components, "ZERO_ALL_ROWS_FRACTION", zero_all_fraction)
    torch.manual_seed(0)
    enc = SCALEEncoder(40, 4, (16, 8), n_cat_list=[3])
    weight = enc.layers[0].fc_layers[0][0].weight
    opt = FusedAdamW(enc.parameters(), in_place_layers=[enc.first_layer])
    cats, _ = _covariates([3])
    dense_low, sparse_low = _batch(density=0.05, seed=1)
    dense_high, _ = _batch(density=0.5, seed=2)  # above the gather path's density: autograd

    def step(x):
        m, v = enc(x, *cats)
        loss = m.pow(2).sum() + v.sum()
        opt.zero_grad()  # Lightning's order: forward, zero_grad, backward
        loss.backward()
        written = weight.grad.clone()
        opt.step()
        return written

    for x in (sparse_low, dense_high, sparse_low, dense_low, sparse_low):
        written = step(x)
        assert written.any()
        opt.zero_grad()
        assert not weight.grad.any(), "a row written by the last step was not zeroed"
    # a minibatch with few open peaks writes only their rows (and the covariate rows)
    m, v = enc(sparse_low, *cats)
    (m.pow(2).sum() + v.sum()).backward()
    peaks_open = sparse_low.to_dense().ne(0).any(0)
    rows_nonzero = weight.grad.t().ne(0).any(1)
    assert torch.equal(rows_nonzero[:40], peaks_open)
    assert len(enc.first_layer._rows_written) == 1


def _fused_pair(extra) -> tuple[list, list, FusedAdamW]:
    """Two encoders, their copies and a FusedAdamW on the copies (lr 1e-2, weight decay
    5e-4, clipped at a norm of 0.5) with the further arguments ``extra(copies)``."""
    torch.manual_seed(0)
    ref = [SCALEEncoder(40, 4, (16, 8)), SCALEEncoder(40, 4, (16, 8))]
    encs = copy.deepcopy(ref)
    opt = FusedAdamW(
        [p for e in encs for p in e.parameters()],
        lr=1e-2,
        eps=1e-8,
        weight_decay=5e-4,
        max_grad_norm=0.5,
        **extra(encs),
    )
    return ref, encs, opt


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_adamw_clips_apart_parameters_on_their_own(sparse):
    """With clip_apart, the two sets of parameters take the steps of torch's AdamW after
    clip_grad_norm_ applied to each set separately (0.5 clips both here); the first layer of
    the apart encoder gives its norm to the apart set only."""
    ref, encs, opt2 = _fused_pair(
        lambda encs: {
            "in_place_layers": [e.first_layer for e in encs],
            "clip_apart": list(encs[1].parameters()),
        }
    )
    params = [p for e in ref for p in e.parameters()]
    opt1 = torch.optim.AdamW(params, lr=1e-2, eps=1e-8, weight_decay=5e-4)
    dense, csr = _batch(density=0.05 if sparse else 0.2)
    for _ in range(5):
        for pair, opt in ((ref, opt1), (encs, opt2)):
            opt.zero_grad()
            loss = 0.0
            for scale, enc in zip((1.0, 30.0), pair, strict=True):
                m, v = enc(csr if sparse else dense)
                loss = loss + scale * (m.pow(2).sum() + v.sum())
            loss.backward()
            if opt is opt1:
                for enc in pair:
                    assert torch.nn.utils.clip_grad_norm_(enc.parameters(), 0.5) > 0.5
            opt.step()
    for p1, p2 in zip(params, [p for e in encs for p in e.parameters()], strict=True):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_fused_adamw_decays_apart_parameters_by_their_own_weight_decay():
    """With weight_decay_apart, the steps are torch's AdamW's with those parameters in a group
    of their own decay (after clip_grad_norm_ over all), in one parameter group. (A decay of
    0.5 against 5e-4 shrinks the weights by about 2.5 % over the 5 steps, far beyond the
    tolerance.)"""
    ref, encs, opt2 = _fused_pair(
        lambda encs: {"weight_decay_apart": [(p, 0.5) for p in encs[1].parameters()]}
    )
    opt1 = torch.optim.AdamW(
        [{"params": ref[0].parameters()}, {"params": ref[1].parameters(), "weight_decay": 0.5}],
        lr=1e-2,
        eps=1e-8,
        weight_decay=5e-4,
    )
    assert len(opt2.param_groups) == 1
    group = opt2.param_groups[0]
    assert {opt2.weight_decay_of(p, group) for p in encs[0].parameters()} == {5e-4}
    assert {opt2.weight_decay_of(p, group) for p in encs[1].parameters()} == {0.5}
    dense, _ = _batch(density=0.2)
    for _ in range(5):
        for pair, opt in ((ref, opt1), (encs, opt2)):
            opt.zero_grad()
            loss = sum((m.pow(2).sum() + v.sum()) for m, v in (e(dense) for e in pair))
            loss.backward()
            if opt is opt1:
                params = [p for e in pair for p in e.parameters()]
                assert torch.nn.utils.clip_grad_norm_(params, 0.5) > 0.5
            opt.step()
    for e1, e2 in zip(ref, encs, strict=True):
        for p1, p2 in zip(e1.parameters(), e2.parameters(), strict=True):
            torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_fused_adamw_rejects_a_bad_clipping_norm():
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedAdamW(SCALEEncoder(4, 2, (3,)).parameters(), max_grad_norm=0)


@pytest.mark.parametrize("density", [0.05, 0.3])
@pytest.mark.parametrize("n_cat_list", [[], [3]])
def test_sparse_backward_gives_the_gradient_norm(n_cat_list, density):
    """The squared norm the sparse backward leaves for the optimizer's clipping is that of
    the gradient, and stops counting once the gradient changes (a second backward)."""
    torch.manual_seed(0)
    enc = SCALEEncoder(40, 4, (16, 8), n_cat_list=n_cat_list, n_cont=1)
    weight = enc.layers[0].fc_layers[0][0].weight
    _, sparse = _batch(density=density)
    cats, cont = _covariates(n_cat_list)
    opt = FusedAdamW(enc.parameters(), max_grad_norm=1e-3, in_place_layers=[enc.first_layer])

    def backward():
        m, v = enc(sparse, *cats, cont=cont)
        (m.pow(2).sum() + v.sum()).backward()

    backward()
    sq_norm = enc.first_layer.grad_sq_norm()
    torch.testing.assert_close(sq_norm.double(), weight.grad.double().pow(2).sum())
    backward()  # accumulates: the known norm is no longer that of the gradient
    assert enc.first_layer.grad_sq_norm() is None
    everything = torch.cat([p.grad.flatten() for p in enc.parameters()])
    expected = everything.norm() / 1e-3
    torch.testing.assert_close(opt._grad_scale(), expected, rtol=1e-5, atol=0)


def test_training_flushes_subnormal_moments_and_restores_the_setting():
    """A parameter whose gradient stays zero has its first moment shrink by beta1 at every
    step; under flush_denormal (as in SCALE.train) none reaches the subnormal range (slow on
    CPUs), the parameters follow torch's AdamW, and the setting is restored afterwards, also
    after an error."""
    from scale_scvi.train import flush_denormal
    from scale_scvi.train._denormal import flush_denormal_enabled

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal numbers")
    tiny = torch.finfo(torch.float32).tiny
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(64, 8))
    w2 = torch.nn.Parameter(w1.detach().t().contiguous().t())  # column-major, as the first layer
    w3 = torch.nn.Parameter(w1.detach().clone())
    ref = torch.optim.AdamW([w1], lr=1e-3)
    opt = FusedAdamW([w2], lr=1e-3)
    plain = FusedAdamW([w3], lr=1e-3)

    def run(w, o, step):
        o.zero_grad(set_to_none=False)
        # rows 0-31 get gradients only in the first ten steps, rows 32-63 always
        w.grad = torch.ones_like(w) * 1e-3
        if step >= 10:
            w.grad[:32] = 0.0
        o.step()

    for step in range(1200):
        run(w1, ref, step)
        run(w3, plain, step)
        with flush_denormal():
            assert flush_denormal_enabled()
            run(w2, opt, step)
        assert not flush_denormal_enabled()
    m_ref, m_opt, m_plain = (o.state[w]["exp_avg"] for o, w in ((ref, w1), (opt, w2), (plain, w3)))

    def n_subnormal(t):
        return int(((t != 0) & (t.abs() < tiny)).sum())

    assert n_subnormal(m_ref) > 0 and n_subnormal(m_plain) > 0  # what the flush prevents
    assert n_subnormal(m_opt) < n_subnormal(m_plain)
    assert torch.all(m_opt[32:] > 1e-4)
    torch.testing.assert_close(w2, w1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w3, w1, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError), flush_denormal():
        raise RuntimeError("training failed")
    assert not flush_denormal_enabled()


def test_input_dropout_zeroes_and_rescales_sparse_and_dense_input():
    from scale_scvi.module._components import _input_dropout

    dense, sparse = _batch(n_cells=50, n_peaks=400, density=0.3)
    torch.manual_seed(0)
    dropped = _input_dropout(sparse, 0.5)
    assert dropped.layout == torch.sparse_csr
    kept = dropped.values()
    # every value is either dropped or doubled; about half of them are dropped
    scaled = kept[kept != 0]
    torch.testing.assert_close(scaled, 2 * sparse.values()[kept != 0])
    assert 0.4 < (kept == 0).float().mean() < 0.6
    dense_dropped = _input_dropout(dense, 0.5)
    assert ((dense_dropped == 0) | (dense_dropped == 2 * dense)).all()
    assert (dense_dropped[dense == 0] == 0).all()


def test_input_dropout_acts_in_training_only():
    torch.manual_seed(0)
    enc = SCALEEncoder(40, 4, (16, 8), input_dropout=0.5)
    _, sparse = _batch()
    enc.eval()
    m1, _ = enc(sparse)
    m2, _ = enc(sparse)
    torch.testing.assert_close(m1, m2)
    enc.train()
    torch.manual_seed(1)
    m3, _ = enc(sparse)
    assert not torch.allclose(m1, m3)
    with pytest.raises(ValueError, match="input_dropout"):
        SCALEEncoder(40, 4, (16, 8), input_dropout=1.0)
