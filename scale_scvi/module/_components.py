"""Encoder and decoder networks of SCALE, built from :class:`scvi.nn.FCLayers`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from scvi.nn import FCLayers
from torch import nn

#: The encoder's hidden-layer widths by default (the original SCALE's were 1024 -> 128;
#: benchmarks/NOTES.md, "An encoder of 256 -> 128 units").
DEFAULT_N_HIDDEN: tuple[int, ...] = (256, 128)
#: Above this fraction of stored values, the first layer's product with a sparse minibatch
#: and its weight gradient are dense products (measured on one CPU thread at 32 cells x
#: 5,036 peaks into 1,024 units, the default width then, 22 % stored: forward 5.2 ms dense
#: against 7.7 ms for the gathered rows, gradient 4.4 against 6.5 ms; equal at 10 %, sparse
#: 2x faster at 2 %).
DENSE_PRODUCT_DENSITY = 0.1
#: Once the rows written since the last ``zero_grad`` reach this fraction of the first
#: layer's gradient, the whole gradient is zeroed in one pass (a row-by-row fill costs
#: about four times as much per row).
ZERO_ALL_ROWS_FRACTION = 0.25


def _covariate_list(
    fc: FCLayers, x: torch.Tensor, cat_list: Sequence[torch.Tensor], cont: torch.Tensor | None
) -> list[torch.Tensor]:
    """One-hot categorical and continuous covariates in the order :class:`FCLayers` uses."""
    covs = [cont] if cont is not None else []
    for n_cat, cat in zip(fc.n_cat_list, cat_list, strict=False):
        if n_cat > 1:
            covs.append(nn.functional.one_hot(cat.squeeze(-1).long(), n_cat).to(x.dtype))
    return covs


def column_major(linear: nn.Linear) -> None:
    """Store the weight of ``linear`` column-major (same values, same shape and name).

    The ``(n_out, n_in)`` weight then has contiguous columns, i.e. its transpose is a
    contiguous ``(n_in, n_out)`` table with one row per input feature: a sparse input row
    gathers only the rows of its nonzero features, and the gradient (which follows the
    parameter's layout) is written the same way. Loading a state dict or moving the module
    to another device keeps the layout.
    """
    weight = linear.weight.detach()
    linear.weight = nn.Parameter(
        weight.t().contiguous().t(), requires_grad=linear.weight.requires_grad
    )


def csr_from_dense(x: torch.Tensor) -> torch.Tensor:
    """``x.to_sparse_csr()`` for a 2-d tensor, built from ``nonzero`` (several times faster
    on the CPU for a (64, 140,000) minibatch)."""
    rows, cols = x.nonzero(as_tuple=True)
    crow = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.bincount(rows, minlength=x.shape[0]), 0, out=crow[1:])
    return torch.sparse_csr_tensor(
        crow, cols, x[rows, cols], size=x.shape, device=x.device, check_invariants=False
    )  # valid by construction: nonzero is row-major


def csr_with_values(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The CSR matrix with the sparsity pattern of ``x`` (CSR or any sparse layout) and
    ``values`` in place of its stored values."""
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    return torch.sparse_csr_tensor(
        x.crow_indices(),
        x.col_indices(),
        values,
        size=x.shape,
        device=x.device,
        check_invariants=False,  # the indices of a valid CSR tensor
    )


def csr_row_indices(x: torch.Tensor) -> torch.Tensor:
    """Row index of each stored value of a sparse CSR matrix."""
    counts = x.crow_indices().diff()
    return torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), counts)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """``(x > 0)`` as float, keeping a sparse tensor sparse (CSR) and a dense one dense."""
    if x.layout == torch.strided:
        return (x > 0).to(torch.float32)
    x = x.to_sparse_csr() if x.layout != torch.sparse_csr else x
    return csr_with_values(x, (x.values() > 0).to(torch.float32))


def select_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The columns ``index`` of a minibatch, dense or sparse CSR, in the same layout.

    ``index`` holds sorted, distinct column indices. A CSR minibatch is subset through its
    stored values (one pass over them), without building the dense matrix.
    """
    if x.layout == torch.strided:
        return x.index_select(-1, index.to(x.device))
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    index = index.to(x.device)
    new_col = torch.full((x.shape[-1],), -1, dtype=torch.int64, device=x.device)
    new_col[index] = torch.arange(index.numel(), device=x.device)
    crow, col, values = x.crow_indices(), x.col_indices(), x.values()
    mapped = new_col[col]
    keep = mapped >= 0
    rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), torch.diff(crow))
    counts = torch.bincount(rows[keep], minlength=x.shape[0])
    new_crow = torch.zeros(x.shape[0] + 1, dtype=crow.dtype, device=x.device)
    new_crow[1:] = torch.cumsum(counts, 0)
    return torch.sparse_csr_tensor(
        new_crow,
        mapped[keep].to(col.dtype),
        values[keep],
        size=(x.shape[0], index.numel()),
        check_invariants=False,
    )


def _dense_enough(x: torch.Tensor) -> bool:
    """Whether a CSR minibatch stores enough values (``DENSE_PRODUCT_DENSITY``) that dense
    products through the first layer are faster than sparse ones."""
    return x.values().numel() > DENSE_PRODUCT_DENSITY * x.shape[0] * x.shape[-1]


def _sparse_linear(
    x: torch.Tensor, weight_t: torch.Tensor, covs: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T[:n_in] + covs W^T[n_in:]`` for a sparse CSR ``x``: a sum of open-peak rows."""
    h = nn.functional.embedding_bag(
        x.col_indices().long(),
        weight_t,
        x.crow_indices().long(),
        mode="sum",
        per_sample_weights=x.values().to(weight_t.dtype),
        include_last_offset=True,
    )
    if covs is not None:
        h = h + covs @ weight_t[x.shape[-1] :]
    return h


class SparseFirstLayer:
    """The encoder's first linear layer on sparse input, and the gradient it writes itself.

    The layer is the first ``nn.Linear`` of an :class:`~scvi.nn.FCLayers` (whose parameters
    stay those of ``FCLayers``, so scArches' freezing hooks and query mapping see them). On a
    sparse CSR minibatch, ``x W^T`` is an :func:`~torch.nn.functional.embedding_bag` sum
    over the rows of ``W^T`` of the open peaks, and in training the weight's gradient is
    added straight into ``weight.grad`` (created once, column-major like the weight) as
    ``x^T grad_h`` instead of handing autograd a new dense ``(n_out, n_in)`` tensor each
    step: no per-step allocation and zero-fill of the model's largest tensor (143 MB for
    140,000 peaks and 256 units). A dense minibatch is multiplied as it is (autograd's own
    gradient).

    An optimizer talks to it through two methods (:class:`~scale_scvi.train.FusedAdamW`
    does): :meth:`zero_grad`, which zeroes only the gradient rows written since the last
    call (the open peaks of the minibatches, about 40 % of the gradient at 64 cells of
    140,000-peak data) and keeps the tensor; and :meth:`grad_sq_norm`, this weight's share
    of the squared gradient norm, known from the backward pass without reading the gradient.

    Parameters
    ----------
    linear
        The layer (its weight stored column-major, see :func:`column_major`).
    """

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        # Rows of the transposed gradient written since the last zero_grad; None: any row
        # may be nonzero (autograd accumulated into it).
        self._rows_written: list[torch.Tensor] | None = []
        self._sq_norm: tuple[torch.Tensor, int] | None = None
        self._own_grad: torch.Tensor | None = None  # the gradient tensor this layer created

    @property
    def weight(self) -> nn.Parameter:
        """The layer's weight, ``(n_out, n_in + n_cov)``."""
        return self.linear.weight

    def __call__(self, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        """``[x, cov] W^T`` (no bias) for a dense or sparse CSR ``x``."""
        weight = self.linear.weight
        weight_t = weight.t()
        n_in = x.shape[-1]
        if x.layout == torch.strided:
            h = x @ weight_t[:n_in]
            if cov is not None:
                h = h + cov @ weight_t[n_in:]
            return self._mark_autograd_accumulation(h)
        x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
        if self._inplace_grad_ok():
            return _SparseInputLinear.apply(x, cov, weight, self)
        return self._mark_autograd_accumulation(_sparse_linear(x, weight_t, cov))

    # ------------------------------------------------------------------ optimizer interface
    def zero_grad(self) -> bool:
        """Zero the gradient rows written since the last call; whether to keep the tensor.

        Returns ``True`` when the gradient is the tensor this layer created (then zeroed
        here, and to be kept rather than freed), ``False`` when autograd created it.
        """
        grad = self.linear.weight.grad
        owned = grad is not None and grad is self._own_grad
        if not owned:
            self._own_grad = None
        else:
            if self._rows_written is None:
                grad.zero_()
            else:
                grad_t = grad.t()
                n_rows = sum(rows.numel() for rows in self._rows_written)
                if n_rows >= ZERO_ALL_ROWS_FRACTION * grad_t.shape[0]:
                    grad.zero_()  # one pass over memory beats a fill row by row
                else:
                    for rows in self._rows_written:
                        grad_t.index_fill_(0, rows, 0.0)
        self._rows_written = []
        self._sq_norm = None
        return owned

    def grad_sq_norm(self) -> torch.Tensor | None:
        """Squared norm of the weight's gradient, when the backward pass knows it.

        Known while the gradient is exactly one sparse product (one backward pass since
        :meth:`zero_grad`, and nothing has written to it since); ``None`` otherwise.
        """
        grad = self.linear.weight.grad
        if self._sq_norm is None or grad is None or self._sq_norm[1] != grad._version:
            return None
        return self._sq_norm[0]

    # ------------------------------------------------------------------ internals
    def _inplace_grad_ok(self) -> bool:
        """Whether the gradient may bypass autograd's accumulation."""
        weight = self.linear.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return False
        if weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None):
            return False  # e.g. scArches' hooks that zero the frozen columns' gradients
        dist = torch.distributed
        # DDP reduces gradients from autograd's accumulation hooks.
        return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)

    def _mark_autograd_accumulation(self, h: torch.Tensor) -> torch.Tensor:
        """Make the backward through ``h`` note that autograd writes the gradient whole.

        Noted in the backward pass, when autograd accumulates, and not in the forward:
        Lightning zeroes the gradients between the two.
        """
        if torch.is_grad_enabled() and self.linear.weight.requires_grad:
            return _AutogradAccumulation.apply(h, self)
        return h

    def _written_by_autograd(self) -> None:
        self._rows_written = None
        self._sq_norm = None

    def _written_in_place(self, rows: torch.Tensor, sq_norm) -> None:
        first = self._rows_written is not None and not self._rows_written
        if self._rows_written is not None:
            self._rows_written.append(rows)
        grad = self.linear.weight.grad
        self._sq_norm = (sq_norm(), grad._version) if first else None

    def __getstate__(self) -> dict:
        # the written rows are tensors of the current step; a copy starts clean
        return {"linear": self.linear, "_rows_written": None, "_sq_norm": None, "_own_grad": None}


class _SparseInputLinear(torch.autograd.Function):
    """``x W^T[:n_in] + covs W^T[n_in:]`` for a sparse CSR ``x``, writing dW in place.

    Gradients accumulate over backward passes exactly as autograd's would. Used only when
    nothing else needs to see that gradient pass by (no tensor hooks on the weight, no
    distributed data parallel); see :meth:`SparseFirstLayer._inplace_grad_ok`.
    """

    @staticmethod
    def forward(ctx, x, covs, weight, layer: SparseFirstLayer):
        ctx.x, ctx.covs, ctx.weight, ctx.layer = x, covs, weight, layer
        ctx.x_dense = None
        if _dense_enough(x):
            # a dense product is faster once a tenth of the minibatch is stored; the dense
            # copy serves the backward pass too
            weight_t = weight.t()
            ctx.x_dense = x.to_dense().to(weight.dtype)
            h = ctx.x_dense @ weight_t[: x.shape[-1]]
            return h if covs is None else h + covs @ weight_t[x.shape[-1] :]
        return _sparse_linear(x, weight.t(), covs)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, covs, weight, layer = ctx.x, ctx.covs, ctx.weight, ctx.layer
        n_in = x.shape[-1]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight, memory_format=torch.preserve_format)
            layer._own_grad = weight.grad
            layer._rows_written = []
        grad_t = weight.grad.t()
        if ctx.x_dense is not None:
            x_t = ctx.x_dense.to(grad_h.dtype).t()
            open_in = torch.bincount(x.col_indices(), minlength=n_in)
        else:
            x_csc = x.to_sparse_csc()  # the CSR of x^T, (n_in, B)
            x_t = torch.sparse_csr_tensor(
                x_csc.ccol_indices(),
                x_csc.row_indices(),
                x_csc.values().to(grad_h.dtype),
                (n_in, x.shape[0]),
                check_invariants=False,
            )
            open_in = x_t.crow_indices().diff()
        grad_t[:n_in].addmm_(x_t, grad_h)
        written = torch.nonzero(open_in).squeeze(-1)  # the open peaks
        if covs is not None:
            grad_t[n_in:].addmm_(covs.t(), grad_h)
            written = torch.cat([written, torch.arange(n_in, grad_t.shape[0], device=x.device)])

        def sq_norm() -> torch.Tensor:
            # ||x^T g||^2 = sum((x x^T) * (g g^T)): two (B, B) products instead of a pass
            # over the whole gradient
            gram = x_t.t() @ x_t if x_t.layout == torch.strided else (x @ x_t).to_dense()
            value = (gram * (grad_h @ grad_h.t())).sum()
            if covs is not None:
                value = value + (covs.t() @ grad_h).pow(2).sum()
            return value

        layer._written_in_place(written, sq_norm)
        ctx.x = ctx.x_dense = ctx.covs = ctx.weight = ctx.layer = None
        return None, None, None, None


class _AutogradAccumulation(torch.autograd.Function):
    """Identity on ``h`` whose backward tells the layer autograd writes its gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, layer: SparseFirstLayer) -> torch.Tensor:
        ctx.layer = layer
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        ctx.layer._written_by_autograd()
        ctx.layer = None
        return grad_h, None


def _first_layer(
    fc: FCLayers,
    layer: SparseFirstLayer,
    x: torch.Tensor,
    cat_list: Sequence[torch.Tensor],
    cont: torch.Tensor | None,
) -> torch.Tensor:
    """Run a one-layer :class:`FCLayers` whose linear map is ``layer``, on dense or CSR ``x``.

    The linear map of ``FCLayers`` acts on ``[x, covariates]``; the covariate part uses the
    rows of ``W^T`` after the input's. The minibatch is used in the layout it comes in:
    the data loader decides it (``load_sparse_tensor`` of ``SCALE.train``).
    """
    block = fc.fc_layers[0]
    covs = _covariate_list(fc, x, cat_list, cont)
    cov = torch.cat(covs, dim=-1).to(layer.weight.dtype) if covs else None
    h = layer(x, cov)
    if layer.linear.bias is not None:
        h = h + layer.linear.bias
    for module in list(block)[1:]:
        if module is not None:
            h = module(h)
    return h


def _input_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of the input values; a sparse tensor stays sparse (CSR)."""
    if x.layout == torch.strided:
        return nn.functional.dropout(x, p=p, training=True)
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    return csr_with_values(x, nn.functional.dropout(x.values(), p=p, training=True))


class SCALEEncoder(nn.Module):
    """MLP encoder ``x -> (mean, variance)`` of the diagonal Gaussian ``q(z|x)``.

    The first layer takes sparse minibatches directly (:class:`SparseFirstLayer`, the
    encoder's ``first_layer``); its weight is stored column-major (:func:`column_major`),
    which makes the sparse product and its gradient cheap.

    Parameters
    ----------
    n_input
        Number of input features (peaks).
    n_output
        Latent dimensionality.
    n_hidden
        Widths of the hidden layers (``DEFAULT_N_HIDDEN``).
    n_cat_list
        Number of categories of each categorical covariate (batch first).
    n_cont
        Number of continuous covariates.
    dropout_rate, use_batch_norm, use_layer_norm
        Passed to :class:`scvi.nn.FCLayers`.
    deep_inject_covariates
        Inject covariates into every hidden layer rather than only the first.
    var_eps
        Floor added to the posterior variance.
    input_dropout
        Probability with which each input value is zeroed in training (the rest are scaled by
        ``1 / (1 - input_dropout)``), sparse input included.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_hidden: Sequence[int] = DEFAULT_N_HIDDEN,
        n_cat_list: Iterable[int] | None = None,
        n_cont: int = 0,
        dropout_rate: float = 0.0,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        deep_inject_covariates: bool = False,
        var_eps: float = 1e-4,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        if len(n_hidden) < 1:
            raise ValueError(
                f"The encoder needs at least one hidden layer: n_hidden={DEFAULT_N_HIDDEN}."
            )
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}.")
        self.input_dropout = float(input_dropout)
        n_cat_list = list(n_cat_list or [])
        self.var_eps = var_eps
        self.deep_inject_covariates = deep_inject_covariates
        dims = [n_input, *n_hidden]
        self.layers = nn.ModuleList(
            FCLayers(
                n_in=d_in,
                n_out=d_out,
                n_cat_list=n_cat_list if (i == 0 or deep_inject_covariates) else None,
                n_cont=n_cont if (i == 0 or deep_inject_covariates) else 0,
                n_layers=1,
                dropout_rate=dropout_rate,
                use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
            )
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True))
        )
        column_major(self.layers[0].fc_layers[0][0])
        self.first_layer = SparseFirstLayer(self.layers[0].fc_layers[0][0])
        self.mean_encoder = nn.Linear(dims[-1], n_output)
        self.var_encoder = nn.Linear(dims[-1], n_output)

    @torch.no_grad()
    def start_new_batches(self, n_reference_batches: int) -> None:
        """Give the batches added for a query (scArches' query mapping) the weights of the
        reference's average batch, so that a query cell is encoded as a reference cell.

        The batch is the first categorical covariate; its categories after the first
        ``n_reference_batches`` are the query's. Their weight columns (random when
        ``load_query_data`` makes them) become the mean of the reference batches' columns, or
        zero when the reference had a single batch (its encoder then had no batch input, and
        the reference's own column is new too).
        """
        for layer in self.layers:
            n_cats = list(layer.n_cat_list)
            if not n_cats or n_cats[0] <= 1:
                continue
            weight = layer.fc_layers[0][0].weight
            start = weight.shape[1] - sum(n_cats)
            stop = start + n_cats[0]
            if n_reference_batches >= 2:
                reference = weight[:, start : start + n_reference_batches]
                weight[:, start + n_reference_batches : stop] = reference.mean(1, keepdim=True)
            else:
                weight[:, start:stop] = 0.0

    def forward(
        self, x: torch.Tensor, *cat_list: torch.Tensor, cont: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean and variance of ``q(z|x)``."""
        if self.training and self.input_dropout > 0:
            x = _input_dropout(x, self.input_dropout)
        h = _first_layer(self.layers[0], self.first_layer, x, cat_list, cont)
        deep_cont = cont if self.deep_inject_covariates else None
        for layer in self.layers[1:]:
            h = layer(h, *cat_list, cont=deep_cont)
        q_m = self.mean_encoder(h)
        q_v = nn.functional.softplus(self.var_encoder(h)) + self.var_eps
        return q_m, q_v


class SCALEDecoder(nn.Module):
    """Decoder ``z -> logits`` of the Bernoulli likelihood of every peak.

    With no hidden layers (the default, as in the original SCALE) it is one linear map
    (plus covariates), which keeps the latent interpretable and training fast.

    Parameters
    ----------
    n_input
        Latent dimensionality.
    n_output
        Number of peaks.
    n_hidden
        Widths of optional hidden layers; ``()`` for a linear decoder.
    n_cat_list, n_cont
        Covariates, as in :class:`SCALEEncoder`.
    dropout_rate, use_batch_norm, use_layer_norm
        For the hidden layers.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_hidden: Sequence[int] = (),
        n_cat_list: Iterable[int] | None = None,
        n_cont: int = 0,
        dropout_rate: float = 0.0,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
    ):
        super().__init__()
        n_cat_list = list(n_cat_list or [])
        dims = [n_input, *n_hidden]
        self.hidden = nn.ModuleList(
            FCLayers(
                n_in=d_in,
                n_out=d_out,
                n_cat_list=n_cat_list,
                n_cont=n_cont,
                n_layers=1,
                dropout_rate=dropout_rate,
                use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
            )
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.output = FCLayers(
            n_in=dims[-1],
            n_out=n_output,
            n_cat_list=n_cat_list,
            n_cont=n_cont,
            n_layers=1,
            dropout_rate=0.0,
            use_batch_norm=False,
            use_layer_norm=False,
            use_activation=False,
        )
        # (n_peaks, n_in) weight stored column-major: the logits' GEMM and, above all, the
        # weight-gradient GEMM (logits' gradient transposed times h) run on contiguous rows
        # of length n_peaks (a third less time for a step's decoder at 140,000 peaks).
        column_major(self.output.fc_layers[0][0])

    def forward(
        self, z: torch.Tensor, *cat_list: torch.Tensor, cont: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bernoulli logits, shape ``z.shape[:-1] + (n_output,)``."""
        h = z
        for layer in self.hidden:
            h = layer(h, *cat_list, cont=cont)
        return self.output(h, *cat_list, cont=cont)
