"""AdamW on the fused kernel, for parameters stored column-major as well as row-major."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch.optim.adamw import adamw


def _contiguous_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or its transpose when that is contiguous (a column-major matrix)."""
    if t.is_contiguous() or t.dim() != 2:
        return t
    return t.t() if t.t().is_contiguous() else t


class InPlaceGradient(Protocol):
    """A layer that writes its weight's gradient itself (the encoders' sparse first
    layers, :class:`~scale_scvi.module.SparseFirstLayer`)."""

    @property
    def weight(self) -> torch.nn.Parameter:
        """The parameter whose gradient the layer writes."""

    def zero_grad(self) -> bool:
        """Zero what the layer wrote into ``weight.grad`` since the last call, in place;
        return whether that tensor is the layer's own (kept, not freed)."""

    def grad_sq_norm(self) -> torch.Tensor | None:
        """Squared norm of ``weight.grad`` if the layer knows it, else ``None``."""


class FusedAdamW(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` that always runs the fused (single-kernel) update.

    The math is exactly that of :class:`torch.optim.AdamW` (decoupled weight decay, bias
    correction, no AMSGrad). The fused kernel is many times faster than the default
    ``foreach`` path on the CPU, but only on contiguous tensors: the encoder's first layer
    stores its ``(n_hidden, n_peaks)`` weight column-major so that a sparse minibatch can
    gather whole peak rows (see :mod:`scale_scvi.module._components`), and this optimizer
    hands the kernel the contiguous transposed views of such a parameter, its gradient and
    its moment estimates, which it updates in place (measured in ``benchmarks/NOTES.md``:
    a third of the time of ``torch.optim.AdamW(fused=True)`` on such a weight).

    With ``max_grad_norm``, the gradients are clipped to that total norm inside the update:
    the same update as :func:`torch.nn.utils.clip_grad_norm_` followed by the step, but the
    scaling is the fused kernel's ``grad_scale`` instead of a separate pass that multiplies
    every gradient (a pass over the 143 MB first-layer gradient of a 140,000-peak model with
    the default 256-unit layer; 570 MB at 1,024 units).

    Layers that write their weight's gradient themselves (``in_place_layers``, see
    :class:`InPlaceGradient`) give their share of the norm when they know it, and in
    :meth:`zero_grad` zero what they wrote; their gradient tensor is kept, not freed.

    Moments that decay toward zero (the first-layer weights of peaks absent from recent
    minibatches) reach the subnormal range, where CPU arithmetic is slow; training handles
    that with ``torch.set_flush_denormal`` (:func:`~scale_scvi.train.flush_denormal`).

    Parameters
    ----------
    params
        Parameters to optimize.
    lr, betas, eps, weight_decay
        As in :class:`torch.optim.AdamW`.
    max_grad_norm
        Clip the total gradient norm (over all parameters, as ``clip_grad_norm_`` with the
        2-norm) at this value; ``None`` for no clipping.
    in_place_layers
        Layers that write their weight's gradient in place.
    clip_apart
        Parameters whose gradients are clipped to ``max_grad_norm`` on their own: the total
        norm of the others leaves them out, and theirs is taken over them alone (the
        networks of a modality whose expert is switched off, see
        :meth:`~scale_scvi.module.MultiSCALEVAE.separately_clipped_parameters`). Empty
        (the default): one total norm over every parameter.
    weight_decay_apart
        ``(parameter, weight decay)`` pairs: these parameters take their own decay instead
        of their group's (the ATAC decoder's on sparse few cells, see
        :meth:`~scale_scvi.SCALE.train`). They stay in their group, so that the groups, the
        order in which the gradient norm is summed and what Lightning logs (one learning
        rate per group) are as without them.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
        in_place_layers: Iterable[InPlaceGradient] = (),
        clip_apart: Iterable[torch.Tensor] = (),
        weight_decay_apart: Iterable[tuple[torch.Tensor, float]] = (),
    ):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}.")
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True
        )
        self.max_grad_norm = max_grad_norm
        self.in_place_layers = list(in_place_layers)
        self.clip_apart = {id(p) for p in clip_apart}
        self.weight_decay_apart = {id(p): float(decay) for p, decay in weight_decay_apart}

    def weight_decay_of(self, param: torch.Tensor, group: dict) -> float:
        """The weight decay that ``param`` of ``group`` takes."""
        return self.weight_decay_apart.get(id(param), group["weight_decay"])

    def _grad_scale(self, apart: bool = False) -> torch.Tensor | None:
        """``1 / min(1, max_norm / (total_norm + 1e-6))``, as ``clip_grad_norm_`` computes it,
        over the parameters of ``clip_apart`` (``apart``) or over the others."""
        if self.max_grad_norm is None:
            return None
        known = {}
        for layer in self.in_place_layers:
            if (id(layer.weight) in self.clip_apart) != apart:
                continue
            sq_norm = layer.grad_sq_norm()
            if sq_norm is not None:
                known[id(layer.weight)] = sq_norm.sqrt()
        norms, grads = list(known.values()), []
        for group in self.param_groups:
            for p in group["params"]:
                if (id(p) in self.clip_apart) != apart:
                    continue
                if p.grad is not None and id(p) not in known:
                    grads.append(p.grad)
        norms += list(torch._foreach_norm(grads)) if grads else []
        if not norms:
            return None
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        return (1.0 / coef).to(torch.float32)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients; those of ``in_place_layers`` are zeroed where those layers
        wrote, not freed: that saves allocating and zero-filling the model's largest tensor
        at every step."""
        keep = [(layer.weight, layer.weight.grad) for layer in self.in_place_layers]
        keep = [(w, g) for (w, g), layer in zip(keep, self.in_place_layers) if layer.zero_grad()]
        super().zero_grad(set_to_none=set_to_none)
        for weight, grad in keep:
            weight.grad = grad

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales = {False: self._grad_scale()}
        if self.clip_apart:
            scales[True] = self._grad_scale(apart=True)
        for group in self.param_groups:
            for apart, grad_scale in scales.items():
                self._update(group, grad_scale, apart)
        return loss

    def _update(self, group: dict, grad_scale: torch.Tensor | None, apart: bool) -> None:
        """The fused update of the parameters of ``group`` in ``clip_apart`` (``apart``) or
        not in it, their gradients divided by ``grad_scale``: one fused call per weight
        decay among them (:meth:`weight_decay_of`)."""
        if not self.weight_decay_apart:
            self._update_decay(group, grad_scale, apart, group["weight_decay"])
            return
        for decay in sorted({self.weight_decay_of(p, group) for p in group["params"]}):
            self._update_decay(group, grad_scale, apart, decay)

    def _update_decay(
        self, group: dict, grad_scale: torch.Tensor | None, apart: bool, decay: float
    ) -> None:
        """:meth:`_update` of the parameters whose weight decay is ``decay``."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if self.weight_decay_of(p, group) != decay:
                continue
            if p.grad is None or (id(p) in self.clip_apart) != apart:
                continue
            if p.grad.is_sparse:
                raise TypeError("FusedAdamW does not take sparse gradients.")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad = p.grad
            if grad.stride() != p.stride():
                grad = grad.contiguous() if p.is_contiguous() else grad.t().contiguous().t()
            params.append(_contiguous_view(p))
            grads.append(_contiguous_view(grad))
            exp_avgs.append(_contiguous_view(state["exp_avg"]))
            exp_avg_sqs.append(_contiguous_view(state["exp_avg_sq"]))
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=decay,
            eps=group["eps"],
            maximize=False,
            grad_scale=grad_scale,
        )
