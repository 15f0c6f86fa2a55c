"""The few network blocks the VAEs share.

:class:`MLP` is scVI's fully connected stack (Linear -> BatchNorm -> ReLU -> Dropout) with categorical
covariates (e.g. the batch) injected into every layer. Concatenating a one-hot code to a layer's input
and multiplying by the weights is the same as adding one weight column per category, which is how it
is computed here (an index instead of a matrix product), which also lets a covariate broadcast against
the cells (see :meth:`MLP.forward`).

:func:`local_params` keeps the parameters of pyro_sc's ``PyroModule`` s (and of the autoguides and guide
modules it runs) inside those modules, without changing Pyro's settings for the rest of the process.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

__all__ = ["MLP", "GaussianEncoder", "local_params"]


@contextmanager
def local_params(*modules: nn.Module) -> Iterator[None]:
    """Pyro's ``module_local_params`` on inside the block only, restored after (even on an error).

    pyro_sc builds and runs its modules, autoguides and guide modules in this block, so their parameters
    live in the modules that own them, never in Pyro's global parameter store: two models in one
    process never share parameters, whatever the user's own Pyro code next to them does with the
    global setting. A ``PyroModule`` among ``modules`` built outside the block (a guide module the user
    made under Pyro's default, global mode) is given a local parameter state first, as if it had been
    built inside.
    """
    with pyro.settings.context(module_local_params=True):
        for module in modules:
            for m in module.modules():
                context = getattr(m, "_pyro_context", None)
                if isinstance(m, PyroModule) and not context.active and not hasattr(context, "param_state"):
                    context.param_state = {"params": {}, "constraints": {}}
        yield


class _CovariateLinear(nn.Module):
    """``Linear(concat(x, onehot(c_1), ..., onehot(c_k), u))`` without building the one-hot vectors:
    categorical covariates ``c_i`` and ``n_cont`` continuous ones ``u``."""

    def __init__(self, n_in: int, n_out: int, n_cat_list: Sequence[int], n_cont: int = 0):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        # A covariate with one category carries no information and gets no weights. The weights are named
        # by the covariate's position, so a model widened to more categories (a query's new batches, see
        # pyro_sc.models.SCVI.load_query_data) keeps every other covariate's weights under their names.
        used = [i for i, n in enumerate(n_cat_list) if n > 1]
        bound = 1 / (n_in + sum(n_cat_list[i] for i in used) + n_cont) ** 0.5
        self.cat_weights = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(n_cat_list[i], n_out).uniform_(-bound, bound)) for i in used}
        )
        self.cont_weight = nn.Parameter(torch.empty(n_cont, n_out).uniform_(-bound, bound)) if n_cont else None

    def forward(
        self, x: torch.Tensor, cats: Sequence[torch.Tensor | None], cont: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.linear(x)
        for i, weight in self.cat_weights.items():
            out = out + weight[cats[int(i)]]
        if self.cont_weight is not None:
            out = out + cont @ self.cont_weight  # (cells, n_cont): broadcasts against enumerated dims of x
        return out


class MLP(nn.Module):
    """``n_layers`` hidden layers of ``n_hidden`` units; covariates enter every layer.

    Parameters
    ----------
    n_in, n_hidden, n_layers
        Sizes. The output has ``n_hidden`` features (heads are added by the caller).
    n_cat_list
        Number of categories of each categorical covariate given to ``forward`` (1 = ignored).
    n_cont
        Number of continuous covariates given to ``forward`` as ``cont``; they enter the first layer
        (as scvi-tools concatenates them to the input).
    dropout_rate, use_batch_norm
        scVI's defaults: dropout 0.1, batch normalisation with momentum 0.01 and eps 1e-3.
    """

    def __init__(
        self,
        n_in: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
    ):
        super().__init__()
        self.n_cat_list = [int(n) for n in n_cat_list]
        self.n_cont = int(n_cont)
        self.layers = nn.ModuleList()
        self.post = nn.ModuleList()
        for i in range(n_layers):
            self.layers.append(
                _CovariateLinear(n_in if i == 0 else n_hidden, n_hidden, self.n_cat_list, self.n_cont if i == 0 else 0)
            )
            self.post.append(
                nn.Sequential(
                    nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3) if use_batch_norm else nn.Identity(),
                    nn.ReLU(),
                    nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity(),
                )
            )

    def forward(self, x: torch.Tensor, *cats: torch.Tensor | None, cont: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., n_in), integer covariates whose shapes broadcast with ``x.shape[:-1]`` and the
        continuous covariates ``cont`` (cells, n_cont).

        Broadcasting is cheap: with ``x`` of shape (cells, genes) and a covariate of shape (C, 1) (an
        enumerated cell type), the first layer's product is computed once per cell and the result has
        shape (C, cells, n_hidden). Batch normalisation sees all leading dimensions as one.
        """
        if len(cats) != len(self.n_cat_list):
            raise ValueError(f"expected {len(self.n_cat_list)} categorical inputs, got {len(cats)}")
        if (cont is None) != (self.n_cont == 0) or (cont is not None and cont.shape[-1] != self.n_cont):
            got = "none" if cont is None else cont.shape[-1]
            raise ValueError(f"expected {self.n_cont} continuous inputs, got {got}")
        for i, (layer, post) in enumerate(zip(self.layers, self.post)):
            h = layer(x, cats, cont if i == 0 else None)
            x = post(h.reshape(-1, h.shape[-1])).reshape(h.shape) if h.dim() > 2 else post(h)
        return x


class GaussianEncoder(nn.Module):
    """``x -> (loc, scale)`` of a diagonal Normal: an :class:`MLP` and two linear heads.

    As in scVI the variance is ``exp(head) + var_eps`` (a floor that keeps it away from zero).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        dropout_rate: float = 0.1,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        self.body = MLP(
            n_in, n_hidden=n_hidden, n_layers=n_layers, n_cat_list=n_cat_list, n_cont=n_cont, dropout_rate=dropout_rate
        )
        self.loc = nn.Linear(n_hidden, n_out)
        self.log_var = nn.Linear(n_hidden, n_out)
        self.var_eps = var_eps

    def forward(
        self, x: torch.Tensor, *cats: torch.Tensor | None, cont: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and scale (positive, at least ``sqrt(var_eps)``) of the Gaussian for input ``x`` and
        covariates ``cats`` / ``cont`` (as :meth:`MLP.forward`)."""
        h = self.body(x, *cats, cont=cont)
        return self.loc(h), (self.log_var(h).exp() + self.var_eps).sqrt()
