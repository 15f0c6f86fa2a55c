r"""Count distributions for single-cell RNA-seq: negative binomial and zero-inflated negative binomial.

Both use the mean / inverse-dispersion parametrisation of scVI-style models: ``mu > 0`` is the mean and
``theta > 0`` the inverse dispersion, so that

.. math::

    \mathbb{E}[X] = \mu, \qquad \operatorname{Var}[X] = \mu + \mu^2 / \theta .

**Negative binomial.** With the logits :math:`\ell = \log\mu - \log\theta` of the success probability
:math:`\mu / (\mu + \theta)`,

.. math::

    \log \mathrm{NB}(x \mid \mu, \theta) = \log\Gamma(x + \theta) - \log\Gamma(\theta) - \log\Gamma(x + 1)
        - \theta \operatorname{softplus}(\ell) - x \operatorname{softplus}(-\ell).

Sampling is the Gamma-Poisson mixture :math:`\lambda \sim \mathrm{Gamma}(\theta, \text{rate}=\theta/\mu)`,
:math:`X \sim \mathrm{Poisson}(\lambda)`.

*Evaluation at zero.* :math:`\log \mathrm{NB}(0) = -\theta \operatorname{softplus}(\ell)
= \theta \log\sigma(-\ell)`, with ``logsigmoid`` (exact for any :math:`\mu/\theta`, no eps, no threshold).

*Evaluation at* :math:`x > 0`. As written, the formula adds terms of size :math:`(x + \theta)\log(x +
\theta)` that cancel: :math:`\log\Gamma(x + \theta) - \log\Gamma(\theta) \approx x\log\theta` against
:math:`x \operatorname{softplus}(-\ell) \approx x\log(\theta + \mu) - x\log\mu`. In float32 that loses
0.016 nats at :math:`\theta = 10^5` already for :math:`x = 1` (0.09 at :math:`x = 100`). Making the lgamma
difference exact is not enough: its cancellation against the logit term stays. So this module
uses Loader's saddle-point form (as in R's ``dnbinom_mu``). With :math:`n = x + \theta`, the binomial-style
centres :math:`n p = n\theta/(\theta + \mu)`, :math:`n q = n\mu/(\theta + \mu)` and
:math:`\Delta = x - n q = n p - \theta = \theta (x - \mu)/(\theta + \mu)`,

.. math::

    \log \mathrm{NB}(x) = -\operatorname{bd0}(\theta, n p) - \operatorname{bd0}(x, n q)
        - \tfrac12 \log x - \tfrac12 \operatorname{log1p}(x / \theta) + r(n) - r(\theta) - r(x),

an exact identity obtained from :math:`\log\Gamma(z) = (z - \tfrac12)\log z - z + r(z)`. The deviances
:math:`\operatorname{bd0}(a, b) = a\log(a/b) + b - a \ge 0` are computed from :math:`a - b = \mp\Delta`
(never by subtracting :math:`a` and :math:`b`), with the series :math:`(a - b)v + 2a\sum_{j \ge 1}
v^{2j+1}/(2j+1)`, :math:`v = (a - b)/(a + b)`, where :math:`|v| < 0.1`. The Stirling residual :math:`r(z)`
is :math:`\tfrac12\log 2\pi + \sum_{k=1}^{6} B_{2k}/(2k(2k-1)z^{2k-1})` for :math:`z \ge 10` (truncation
error below :math:`7 \cdot 10^{-16}`) and :math:`\log\Gamma(z) - (z - \tfrac12)\log z + z` below (float32
keeps only the first 3 and 4 terms of the two series, enough for its precision). No two
large terms cancel, so the rounding error stays within a few ulps of the condition number
:math:`|\log p| + |\partial \log p/\partial\log\mu| + |\partial\log p/\partial\log\theta|`, in float32 and
float64, for :math:`\mu` down to 1e-6, :math:`\theta` up to 1e5 and counts up to 1e5.

*Zeros, performance.* About 90% of single-cell counts are zero. Only :math:`\log\mathrm{NB}(0)` is computed
densely, on the broadcast shape of the parameters (a per-gene ``theta`` is never expanded to cells x genes
for it); the saddle-point form, with its lgamma / digamma work, is evaluated only at the nonzero counts,
gathered from the un-expanded parameters and scattered into the result.

*Float32 fast path.* The saddle-point form above is what float64 parameters get. Float32 parameters
(training) get the lgamma formula evaluated in float64 arithmetic on the same entries: its float64
cancellation error (about 1e-10 relative) disappears in the rounding of the float32 result, at a
fraction of the operations. Theta is cast once, so the large opposite terms of its gradient also meet
in float64. When most counts are nonzero (marker panels), every entry is evaluated densely instead of
gathering the nonzeros. Otherwise (the usual sparse counts) value and closed-form gradients come from one
fused pass; a backward with ``create_graph=True`` (Hessians, e.g. Laplace approximations) recomputes
those gradients with differentiable operations, so second derivatives are exact too.

**Zero-inflated negative binomial.** With :math:`\pi = \sigma(\eta)` the probability of an extra zero
(``zi_logits`` :math:`= \eta`), :math:`\log\pi = -\operatorname{softplus}(-\eta)` and
:math:`\log(1 - \pi) = -\operatorname{softplus}(\eta)`:

.. math::

    \log \mathrm{ZINB}(0) &= \operatorname{logaddexp}\big(-\operatorname{softplus}(-\eta),\;
        -\operatorname{softplus}(\eta) + \log \mathrm{NB}(0)\big), \\
    \log \mathrm{ZINB}(x) &= -\operatorname{softplus}(\eta) + \log \mathrm{NB}(x), \quad x > 0,

which is exactly the negative binomial at :math:`\eta = -\infty`. Its moments are
:math:`\mathbb{E}[X] = (1 - \pi)\mu` and :math:`\operatorname{Var}[X] = (1 - \pi)(\mu + \mu^2/\theta) +
\pi(1 - \pi)\mu^2`.

Parameters are stored as given, never expanded; they broadcast to ``batch_shape``, which is
``torch.broadcast_shapes`` of their shapes or the target of :meth:`~NegativeBinomial.expand`. ``log_prob``
broadcasts the value against ``batch_shape``, so parameters with extra leading (e.g. enumeration)
dimensions work.

Reference: C. Loader (2000), "Fast and accurate computation of binomial probabilities".
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints

from . import settings

__all__ = ["NegativeBinomial", "TopKCategorical", "ZeroInflatedNegativeBinomial"]

# r(z) uses Stirling's series from here on, lgamma below.
_STIRLING_MIN = 10.0
# B_2k / (2k (2k - 1)): r(z) = log(2 pi) / 2 + sum_k c_k z^(1 - 2k) for z >= 10. The first omitted term
# is below 6e-11 after 3 terms (float32) and below 7e-16 after 6 (float64).
_STIRLING_COEFFS = (1 / 12, -1 / 360, 1 / 1260, -1 / 1680, 1 / 1188, -691 / 360360)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# bd0(a, b) uses its series where |v| < 0.1, v = (a - b) / (a + b); the first omitted term, relative to
# the result, is below 2e-10 after 4 terms (float32) and below 1e-17 after 8 (float64).
_DEVIANCE_SERIES_MAX = 0.1
_DEVIANCE_COEFFS = tuple(1 / (2 * j + 1) for j in range(1, 9))


def _as_tensors(*params: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """Turns numbers into tensors with the dtype and device of the first tensor parameter."""
    like = next((p for p in params if isinstance(p, torch.Tensor)), None)
    dtype = torch.get_default_dtype() if like is None else like.dtype
    device = None if like is None else like.device
    return tuple(torch.as_tensor(p, dtype=dtype, device=device) for p in params)


def _polynomial(t: torch.Tensor, coeffs: tuple[float, ...], float32_terms: int) -> torch.Tensor:
    """sum_k coeffs[k] t^k (Horner), with only the first ``float32_terms`` unless ``t`` is float64."""
    coeffs = coeffs if t.dtype == torch.float64 else coeffs[:float32_terms]
    result = torch.full_like(t, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        result = result * t + c
    return result


def _stirling_residual(z: torch.Tensor) -> torch.Tensor:
    """r(z) = lgamma(z) - (z - 1/2) log z + z, for z > 0."""
    # Each branch sees its argument clamped to its own range, so it stays finite where it is not selected.
    w = z.clamp(min=_STIRLING_MIN).reciprocal()
    series = _HALF_LOG_2PI + w * _polynomial(w * w, _STIRLING_COEFFS, float32_terms=3)
    z_small = z.clamp(max=_STIRLING_MIN)
    direct = torch.lgamma(z_small) - (z_small - 0.5) * z_small.log() + z_small
    return torch.where(z >= _STIRLING_MIN, series, direct)


def _deviance(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """bd0(a, b) = a log(a / b) + b - a >= 0, given d = a - b computed without cancellation."""
    v = d / (a + b)
    v2 = v * v
    # a log(a / b) = 2a atanh(v) = 2a (v + v^3/3 + v^5/5 + ...) and 2av = d + dv.
    series = d * v + 2 * a * v * v2 * _polynomial(v2, _DEVIANCE_COEFFS, float32_terms=4)
    return torch.where(v.abs() < _DEVIANCE_SERIES_MAX, series, a * torch.log(a / b) - d)


def _broadcast_offsets(flat: torch.Tensor, shape: torch.Size, sizes: torch.Size) -> torch.Tensor:
    """Row-major offsets into a tensor of ``sizes`` of the entries at row-major offsets ``flat`` of its
    broadcast to ``shape``."""
    sizes = (1,) * (len(shape) - len(sizes)) + tuple(sizes)
    if sizes == tuple(shape):
        return flat
    offsets = torch.zeros_like(flat)
    remainder, stride = flat, 1
    for size, own in zip(reversed(shape), reversed(sizes)):
        if own != 1:
            offsets = offsets + (remainder % size) * stride
            stride = stride * own  # not in place: under torch.jit.trace sizes are tensors
        remainder = remainder // size
    return offsets


#: The attribute under which a dense count tensor made from sparse rows carries its nonzeros (see
#: :func:`_remember_nonzeros`).
_NONZEROS_ATTRIBUTE = "_pyro_sc_nonzeros"


def _remember_nonzeros(value: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Attach to ``value`` the row-major offsets ``flat`` of its nonzero entries (known from the sparse
    rows it was densified from), so that the NB / ZINB log-prob need not search for them. They are used
    only while ``value`` is unchanged (its in-place version counter is checked). Returns ``value``."""
    setattr(value, _NONZEROS_ATTRIBUTE, (flat, value._version))
    return value


def _known_nonzeros(value: torch.Tensor) -> torch.Tensor | None:
    """The offsets :func:`_remember_nonzeros` attached to ``value``, unless it has been modified since."""
    known = getattr(value, _NONZEROS_ATTRIBUTE, None)
    if known is None or known[1] != value._version or torch.jit.is_tracing():
        return None
    return known[0]


def _broadcast_leading(flat: torch.Tensor, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Offsets into ``shape`` of the entries at offsets ``flat`` of ``value`` broadcast to it, when the
    broadcast only adds leading dimensions (e.g. enumerated cell types); else the search itself."""
    sizes = tuple(value.shape)
    while sizes and sizes[0] == 1:
        sizes = sizes[1:]
    if tuple(shape[len(shape) - len(sizes):]) != sizes:
        return (value != 0).expand(shape).reshape(-1).nonzero().squeeze(-1)
    copies = shape.numel() // max(value.numel(), 1)
    if copies == 1:
        return flat
    starts = torch.arange(copies, device=flat.device, dtype=flat.dtype) * value.numel()
    return (starts.unsqueeze(-1) + flat).reshape(-1)


def _gather(tensor: torch.Tensor, flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The entries at row-major offsets ``flat`` of ``tensor`` broadcast to ``shape``, read from its own
    (un-expanded) storage."""
    return torch.take(tensor, _broadcast_offsets(flat, shape, tensor.shape))


class _Nonzeros:
    """The entries of ``shape`` where ``value`` (broadcast to ``shape``) is nonzero.

    Held as flat row-major offsets into ``shape`` (one 1-D ``nonzero``); a tensor of the full shape is
    read at those offsets directly, a broadcast one (e.g. per-gene ``theta``) at offsets computed once
    per shape and cached.
    """

    def __init__(self, value: torch.Tensor, shape: torch.Size) -> None:
        self.shape = torch.Size(shape)
        known = _known_nonzeros(value)
        if known is None:
            self.flat = (value != 0).expand(self.shape).reshape(-1).nonzero().squeeze(-1)
        else:
            self.flat = _broadcast_leading(known, value, self.shape)
        self._cache: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.flat)

    def _offsets(self, sizes: torch.Size) -> torch.Tensor:
        """Row-major offsets into a tensor of ``sizes`` of these entries of its broadcast to ``shape``."""
        key = tuple(sizes)
        if key not in self._cache:
            self._cache[key] = _broadcast_offsets(self.flat, self.shape, sizes)
        return self._cache[key]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The entries of ``tensor`` broadcast to ``shape``, read from its own (un-expanded) storage."""
        return torch.take(tensor, self._offsets(tensor.shape))  # _gather, with the offsets kept

    def scatter(self, dense: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``dense`` broadcast to ``shape``, with these entries replaced by ``values``."""
        return dense.expand(self.shape).reshape(-1).index_put((self.flat,), values).view(self.shape)


def _nb_zero_log_prob(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(0 | mu, theta) = theta logsigmoid(-logits), on broadcast(mu, theta)."""
    return theta * F.logsigmoid(theta.log() - mu.log())


def _nb_saddle_point_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, r_theta: torch.Tensor):
    """log NB(x | mu, theta) for x > 0 in the saddle-point form (see the module docstring)."""
    n = x + theta
    theta_mu = theta + mu
    delta = theta * (x - mu) / theta_mu  # = x - n mu / (theta + mu) = n theta / (theta + mu) - theta
    return (
        -_deviance(theta, n * (theta / theta_mu), -delta)
        - _deviance(x, n * (mu / theta_mu), delta)
        - 0.5 * (x.log() + torch.log1p(x / theta))
        + _stirling_residual(n)
        - r_theta
        - _stirling_residual(x)
    )


def _nb_lgamma_log_prob(x: torch.Tensor, mu: torch.Tensor, theta64: torch.Tensor, lgamma_theta64: torch.Tensor):
    """log NB(x | mu, theta) by the lgamma formula in float64 arithmetic, returned in mu's dtype.

    For float32 parameters this is the fast path: its float64 cancellation error (below 1e-10 relative)
    vanishes in the rounding of the float32 result, at a fraction of the saddle-point form's work.
    ``theta64`` and ``lgamma_theta64`` must come from one float64 copy of theta, so that the gradient's
    large opposite terms (digamma(x + theta) - digamma(theta)) meet in float64, not after a cast.
    """
    dtype = mu.dtype
    x, mu = x.double(), mu.double()
    logits = mu.log() - theta64.log()
    log_prob = (
        torch.lgamma(x + theta64) - lgamma_theta64 - torch.lgamma(x + 1)
        + theta64 * F.logsigmoid(-logits) + x * F.logsigmoid(logits)
    )
    return log_prob.to(dtype)


def _nb_nonzero_log_prob(
    nonzeros: _Nonzeros, value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """log NB(x | mu, theta) at the ``nonzeros``: saddle-point form in float64, lgamma form in float64
    arithmetic for lower precisions."""
    exact = mu.dtype == torch.float64
    if not exact:
        theta = theta.double()
    per_theta = _stirling_residual if exact else torch.lgamma
    # a term of theta alone costs less on theta itself when it is smaller than the gathered entries (per gene)
    if theta.numel() < len(nonzeros):
        theta_term, theta = nonzeros.gather(per_theta(theta)), nonzeros.gather(theta)
    else:
        theta = nonzeros.gather(theta)
        theta_term = per_theta(theta)
    x, mu = nonzeros.gather(value), nonzeros.gather(mu)
    if exact:
        return _nb_saddle_point_log_prob(x, mu, theta, theta_term)
    return _nb_lgamma_log_prob(x, mu, theta, theta_term)


def _nb_dense_log_prob(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The fast path on every entry (zeros included), for mostly-nonzero counts."""
    theta64 = theta.double()
    return _nb_lgamma_log_prob(value, mu, theta64, torch.lgamma(theta64))


def _mostly_nonzero(value: torch.Tensor, nonzeros: _Nonzeros | None = None) -> bool:
    """Dense evaluation beats gathering the nonzeros when they are the majority (e.g. marker panels);
    ``nonzeros``, when found already (on any shape ``value`` broadcasts to), are counted instead."""
    if value.dtype == torch.float64:
        return False
    if nonzeros is not None:
        return 2 * len(nonzeros) > nonzeros.shape.numel()
    return 2 * int(torch.count_nonzero(value)) > value.numel()


def _sparse_fused_path(value: torch.Tensor, *params: torch.Tensor) -> tuple[bool, _Nonzeros | None]:
    """(whether the counts are mostly nonzero, the nonzeros on the fused path's shape when it is taken):
    the fused path's nonzeros are found once and counted for the dense-or-sparse choice."""
    if not _use_fused(*params) or value.dtype == torch.float64:
        return _mostly_nonzero(value), None
    nonzeros = _Nonzeros(value, torch.broadcast_shapes(value.shape, *(p.shape for p in params)))
    dense = _mostly_nonzero(value, nonzeros)
    return dense, None if dense else nonzeros


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient of the broadcast shape back to the shape of its (broadcast) input."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(tuple(range(lead)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


def _zero_terms(
    mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log NB(0) (or log ZINB(0)) and its gradients on the broadcast shape of the parameters (float32).

    With r = mu / theta: log NB(0) = -theta log1p(r), d / d mu = -1 / (1 + r) and d / d theta =
    r / (1 + r) - log1p(r). At a zero of the ZINB, with a = log1p(exp(-|eta|)) (eta = zi_logits),
    log pi = -(max(-eta, 0) + a) and log(1 - pi) = -(max(eta, 0) + a) (``logsigmoid`` of +-eta, from one
    exp and one log1p); log ZINB(0) = logaddexp(log pi, log(1 - pi) + log NB(0)); with w = exp(log(1 - pi)
    + log NB(0) - log ZINB(0)) the posterior weight of the NB component, the NB gradients are scaled by
    w and d / d eta = (1 - pi) - w. Seven transcendental functions per entry.
    """
    r = mu / theta
    softplus = torch.log1p(r)  # = softplus(log mu - log theta)
    out = -theta * softplus
    one_plus_r = 1 + r
    g_mu, g_theta = -1 / one_plus_r, r / one_plus_r - softplus  # r / (1 + r): not 1 - 1 / (1 + r), for r << 1
    if zi_logits is None:
        return out, g_mu, g_theta, None
    a = torch.log1p(torch.exp(-zi_logits.abs()))
    log_keep = -(F.relu(zi_logits) + a)  # log(1 - pi) = logsigmoid(-eta)
    log_pi = -(F.relu(-zi_logits) + a)  # logsigmoid(eta)
    log_nb_weight = log_keep + out
    log_zero = torch.logaddexp(log_pi, log_nb_weight)
    w_nb = (log_nb_weight - log_zero).exp()
    return log_zero, g_mu * w_nb, g_theta * w_nb, log_keep.exp() - w_nb


# lgamma / digamma for the fused path's float64 work: the recurrence up to 8, then the asymptotic series, all
# in element-wise operations that vectorise (torch.lgamma / torch.digamma evaluate one element at a time).
_RECURRENCE = 8
# B_2k / (2k): digamma(w) = log w - 1 / (2w) - sum_k c_k w^(-2k); the first omitted term is below 2e-14 at w >= 8.
_DIGAMMA_COEFFS = (1 / 12, -1 / 120, 1 / 252, -1 / 240, 1 / 132, -691 / 32760)


def _lgamma64(z: torch.Tensor) -> torch.Tensor:
    """lgamma(z) for float64 z > 0: Stirling's series (six terms) at w = z, or at w = z + 8 below 8 with
    lgamma(z) = lgamma(z + 8) - log(z (z + 1) ... (z + 7)). Relative error below 1e-14 (the series'
    truncation at w >= 8 is below 2e-14 absolute)."""
    small = z < _RECURRENCE
    zc = z.clamp(max=_RECURRENCE)  # the product stays finite where it is not used
    product = zc
    for k in range(1, _RECURRENCE):
        product = product * (zc + k)
    w = torch.where(small, z + _RECURRENCE, z)
    r = w.reciprocal()
    series = _HALF_LOG_2PI + r * _polynomial(r * r, _STIRLING_COEFFS, float32_terms=6)
    return (w - 0.5) * w.log() - w + series - torch.where(small, product.log(), torch.zeros_like(z))


def _digamma64(z: torch.Tensor) -> torch.Tensor:
    """digamma(z) for float64 z > 0: the asymptotic series at w = z, or at w = z + 8 below 8 with
    digamma(z) = digamma(z + 8) - sum_{k < 8} 1 / (z + k). Absolute error below 1e-14."""
    small = z < _RECURRENCE
    zc = z.clamp(max=_RECURRENCE)
    # sum_k 1 / (z + k) = numerator / product, built up with one division in all (the product is
    # lgamma's, shared when both are compiled into one kernel); every term is positive: no cancellation
    numerator, product = torch.ones_like(zc), zc
    for k in range(1, _RECURRENCE):
        numerator, product = numerator * (zc + k) + product, product * (zc + k)
    shift = numerator / product
    w = torch.where(small, z + _RECURRENCE, z)
    r = w.reciprocal()
    r2 = r * r
    series = r2 * _polynomial(r2, _DIGAMMA_COEFFS, float32_terms=6)
    return w.log() - 0.5 * r - series - torch.where(small, shift, torch.zeros_like(z))


def _nonzero_terms_using(lgamma: Callable, digamma: Callable) -> Callable:
    """log NB(x) (or log ZINB(x)) and its gradients at gathered nonzero counts ``x``, with these lgamma /
    digamma: float32 ``x``, ``m`` (mu) and ``z`` (zi_logits), float64 ``t`` (theta) and its lgamma / digamma
    (None: computed here); evaluated in float64 arithmetic (the lgamma fast path), returned in float32.

    With l = log mu - log theta, p = sigmoid(l): d log NB / d mu = (x (1 - p) - theta p) / mu,
    d log NB / d theta = digamma(x + theta) - digamma(theta) - softplus(l) + p - x / (theta + mu); at a
    nonzero of the ZINB, d / d zi_logits = -sigmoid(zi_logits).
    """

    def nonzero_terms(
        x: torch.Tensor, m: torch.Tensor, t: torch.Tensor, lgamma_t: torch.Tensor | None,
        digamma_t: torch.Tensor | None, z: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, m = x.double(), m.double()
        if lgamma_t is None:
            lgamma_t, digamma_t = lgamma(t), digamma(t)
        l = m.log() - t.log()
        sp, pp = F.softplus(l), torch.sigmoid(l)
        nb = lgamma(x + t) - lgamma_t - lgamma(x + 1) - t * sp - x * F.softplus(-l)
        gm = (x * (1 - pp) - t * pp) / m
        gt = digamma(x + t) - digamma_t - sp + pp - x / (t + m)
        g_z = None
        if z is not None:
            nb = nb + F.logsigmoid(-z.double())
            g_z = -torch.sigmoid(z)
        return nb.float(), gm.float(), gt.float(), g_z

    return nonzero_terms


#: Element counts below which the fused log-prob's kernels are not compiled (their plain torch form is
#: fast enough there, and compiling costs seconds).
_COMPILE_MIN_ELEMENTS = 1 << 16
_compiled: dict[Callable, Callable] = {}
_compile_failure: list[str] = []  # the first failure's message; compilation is not tried again after one


@contextlib.contextmanager
def _torch_validation_kept():
    """Keeps the user's default of torch.distributions' argument validation: the first use of
    ``torch.compile`` in a process turns it off for the whole process (torch._dynamo's one-time patches)."""
    validate = torch.distributions.Distribution._validate_args
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)


def _kernel(fn: Callable, n_elements: int, compiled_form: Callable | None = None) -> Callable:
    """``compiled_form`` (default ``fn``), computing the same as ``fn``, compiled by ``torch.compile`` (one
    fused, parallel loop) when ``settings.compile`` allows it, the work is large enough and no gradient
    graph is asked for; otherwise ``fn`` itself. A failed compilation (no C++ compiler, an unsupported
    device) warns once and falls back to ``fn`` for good."""
    if (
        not settings.compile
        or _compile_failure
        or n_elements < _COMPILE_MIN_ELEMENTS
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return fn
    form = fn if compiled_form is None else compiled_form
    if form not in _compiled:
        with _torch_validation_kept():
            _compiled[form] = torch.compile(form, dynamic=True)
    compiled = _compiled[form]

    def call(*args):
        try:
            with _torch_validation_kept():
                return compiled(*args)
        except Exception as error:  # noqa: BLE001 -- any failure to compile means: run uncompiled
            _compile_failure.append(f"{type(error).__name__}: {error}".splitlines()[0])
            warnings.warn(
                f"pyro_sc could not compile the NB / ZINB log-probability ({_compile_failure[0]}); it runs "
                "uncompiled from now on (same values, slower). pyro_sc.settings.compile = False skips the "
                "attempt.",
                RuntimeWarning,
                stacklevel=4,
            )
            return fn(*args)

    return call


def _terms_using(lgamma: Callable, digamma: Callable, in_place: bool) -> Callable:
    """The fused log-prob's whole forward (:func:`_fused_terms`) with these lgamma / digamma: one function of
    tensors, so that ``torch.compile`` fuses the zero entries' dense pass, the gathers at the nonzeros, their
    float64 terms and the writes back into one kernel. The nonzeros' values are written ``in_place`` into the
    dense results (plain torch: no copies) or by out-of-place ``index_put`` (compiled: inductor then writes
    them in the same loop, where in-place writes cost it extra passes)."""
    nonzero_terms = _nonzero_terms_using(lgamma, digamma)

    def terms(
        value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor | None,
        flat: torch.Tensor, theta_terms: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        zi_shape = [] if zi_logits is None else [zi_logits.shape]
        shape = torch.broadcast_shapes(value.shape, mu.shape, theta.shape, *zi_shape)
        out, g_mu, g_theta, g_zi = _zero_terms(mu, theta, zi_logits)
        out, g_mu, g_theta = (t.expand(shape).contiguous() for t in (out, g_mu, g_theta))
        if g_zi is not None:
            g_zi = g_zi.expand(shape).contiguous()
        if flat.numel():
            theta64, at_theta = theta.double(), _broadcast_offsets(flat, shape, theta.shape)
            t = torch.take(theta64, at_theta)
            lgamma_t = digamma_t = None  # per entry: computed with the other terms
            if theta_terms is not None:  # per-gene theta: its own terms once, then gathered
                lgamma_t, digamma_t = (torch.take(term, at_theta) for term in theta_terms)
            x, m = _gather(value, flat, shape), _gather(mu, flat, shape)
            z = None if zi_logits is None else _gather(zi_logits, flat, shape)
            nb, gm, gt, gz = nonzero_terms(x, m, t, lgamma_t, digamma_t, z)
            if in_place:  # into fresh tensors that no backward formula reads
                for dense, values in ((out, nb), (g_mu, gm), (g_theta, gt), (g_zi, gz)):
                    if values is not None:
                        dense.view(-1).index_put_((flat,), values)
            else:
                out, g_mu, g_theta = (
                    dense.view(-1).index_put((flat,), values).view(shape)
                    for dense, values in ((out, nb), (g_mu, gm), (g_theta, gt))
                )
                if gz is not None:
                    g_zi = g_zi.view(-1).index_put((flat,), gz).view(shape)
        return out, g_mu, g_theta, g_zi

    return terms


#: :func:`_fused_terms`' work in plain torch (torch's lgamma / digamma, the fastest uncompiled).
_terms = _terms_using(torch.lgamma, torch.digamma, in_place=True)
#: The same with :func:`_lgamma64` / :func:`_digamma64`, which vectorise: what gets compiled.
_terms_vectorised = _terms_using(_lgamma64, _digamma64, in_place=False)


def _fused_terms(
    value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor | None,
    nonzeros: _Nonzeros | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log NB (or ZINB) of float32 parameters and its gradients in closed form, on the broadcast shape.

    Zero term dense in float32 (:func:`_zero_terms`), nonzero counts gathered and evaluated in float64
    (:func:`_nonzero_terms_using`) and written over it; the whole compiled as one function where
    :func:`_kernel` allows. Every operation is a differentiable torch op (the in-place writes go into fresh
    tensors that no backward formula reads), so with grad mode on the gradients returned carry their own
    graph.
    """
    zi_shape = [] if zi_logits is None else [zi_logits.shape]
    shape = torch.broadcast_shapes(value.shape, mu.shape, theta.shape, *zi_shape)
    nonzeros = _Nonzeros(value, shape) if nonzeros is None else nonzeros
    theta_terms = None
    if theta.numel() < len(nonzeros):  # lgamma / digamma of theta itself (torch's: fewer lines to compile)
        theta64 = theta.double()
        theta_terms = (torch.lgamma(theta64), torch.digamma(theta64))
    kernel = _kernel(_terms, shape.numel() + 8 * len(nonzeros), _terms_vectorised)
    return kernel(value, mu, theta, zi_logits, nonzeros.flat, theta_terms)


class _FusedLogProb(torch.autograd.Function):
    """log NB (or ZINB) of float32 parameters, with the gradients in closed form from the forward pass.

    Same values as the lgamma fast path, but one pass: autograd's backward is a product per input (see
    :func:`_fused_terms` for the formulas).

    Second derivatives: a backward that must itself be differentiable (``create_graph=True``, as in
    Hessians, e.g. ``AutoLaplaceApproximation``, or gradient penalties; autograd then runs it with grad
    mode on) recomputes the gradients with :func:`_fused_terms` from the saved inputs, so that they carry
    a graph back to mu, theta and zi_logits. A first-order backward (training) only reads the saved
    gradients; the inputs are saved by reference, not copied.
    """

    @staticmethod
    def forward(ctx, value, mu, theta, zi_logits, nonzeros=None):
        ctx.shapes = (mu.shape, theta.shape, None if zi_logits is None else zi_logits.shape)
        out, g_mu, g_theta, g_zi = _fused_terms(value, mu, theta, zi_logits, nonzeros)
        ctx.save_for_backward(g_mu, g_theta, g_zi, value, mu, theta, zi_logits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g_mu, g_theta, g_zi, value, mu, theta, zi_logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: gradients as differentiable functions of the inputs
            _, g_mu, g_theta, g_zi = _fused_terms(value, mu, theta, zi_logits)
        products = _kernel(_chain_rule, 4 * g_mu.numel())
        return (None, *products(grad_out, g_mu, g_theta, g_zi, *ctx.shapes), None)


def _chain_rule(
    grad_out: torch.Tensor, g_mu: torch.Tensor, g_theta: torch.Tensor, g_zi: torch.Tensor | None,
    mu_shape: torch.Size, theta_shape: torch.Size, zi_shape: torch.Size | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of mu, theta and zi_logits: the incoming gradient times the saved ones, summed back to
    each input's shape (compiled: one loop)."""
    g_zi = None if zi_shape is None else _sum_to(grad_out * g_zi, zi_shape)
    return _sum_to(grad_out * g_mu, mu_shape), _sum_to(grad_out * g_theta, theta_shape), g_zi


def _use_fused(*params: torch.Tensor) -> bool:
    """The fused float32 path (first and second derivatives, see :class:`_FusedLogProb`), for float32
    parameters outside ``torch.jit.trace``; float64 keeps the saddle-point form under plain autograd."""
    return all(p.dtype == torch.float32 for p in params) and not torch.jit.is_tracing()


def _gamma_poisson_sample(mu: torch.Tensor, theta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """NB(mu, theta) counts of the given shape, drawn as Poisson(Gamma(theta, rate=theta / mu))."""
    with torch.no_grad():
        mu, theta = mu.expand(shape), theta.expand(shape)
        return torch.poisson(torch.distributions.Gamma(theta, theta / mu).sample())


def _expand(
    dist: TorchDistribution, cls: type, batch_shape: torch.Size, _instance: TorchDistribution | None
) -> TorchDistribution:
    """``Distribution.expand`` for ``cls``: same (un-expanded) parameters, larger ``batch_shape``."""
    new = dist._get_checked_instance(cls, _instance)
    batch_shape = torch.Size(batch_shape)
    old_sizes = tuple(dist.batch_shape)
    if len(old_sizes) > len(batch_shape) or any(
        old not in (1, new) for old, new in zip(reversed(old_sizes), reversed(batch_shape))
    ):
        raise ValueError(f"cannot expand batch_shape {tuple(dist.batch_shape)} to {tuple(batch_shape)}")
    for name in cls.arg_constraints:
        setattr(new, name, getattr(dist, name))
    TorchDistribution.__init__(new, batch_shape, validate_args=False)
    new._validate_args = dist._validate_args
    return new


class NegativeBinomial(TorchDistribution):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``: Var = mu + mu^2 / theta.

    Parameters
    ----------
    mu
        Mean, positive.
    theta
        Inverse dispersion, positive, broadcastable with ``mu`` (e.g. per gene, ``(genes,)``).
    validate_args
        Check the parameters and the values given to :meth:`log_prob` (torch's ``validate_args``).
    """

    arg_constraints = {"mu": constraints.positive, "theta": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(
        self, mu: torch.Tensor | float, theta: torch.Tensor | float, validate_args: bool | None = None
    ) -> None:
        self.mu, self.theta = _as_tensors(mu, theta)
        batch_shape = torch.broadcast_shapes(self.mu.shape, self.theta.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: NegativeBinomial | None = None) -> NegativeBinomial:
        """The same distribution with batch shape ``batch_shape``; the parameters are not copied."""
        return _expand(self, NegativeBinomial, batch_shape, _instance)

    @property
    def mean(self) -> torch.Tensor:
        """:math:`\\mu`, of shape ``batch_shape``."""
        return self.mu.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        """:math:`\\mu + \\mu^2 / \\theta`, of shape ``batch_shape``."""
        return (self.mu + self.mu.square() / self.theta).expand(self.batch_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Counts of shape ``sample_shape + batch_shape``, drawn as Poisson(Gamma(theta, theta / mu))."""
        return _gamma_poisson_sample(self.mu, self.theta, self._extended_shape(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log NB(``value`` | mu, theta), with ``value`` broadcast against ``batch_shape``; the formulas and
        their precision are in the module docstring."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        dense, nonzeros = _sparse_fused_path(value, self.mu, self.theta)
        if self.mu.dtype != torch.float64 and dense:
            return _nb_dense_log_prob(value, self.mu, self.theta).expand(shape)
        if nonzeros is not None:
            return _FusedLogProb.apply(value, self.mu, self.theta, None, nonzeros).expand(shape)
        nonzeros = _Nonzeros(value, shape)
        log_nonzero = _nb_nonzero_log_prob(nonzeros, value, self.mu, self.theta)
        return nonzeros.scatter(_nb_zero_log_prob(self.mu, self.theta), log_nonzero)


class ZeroInflatedNegativeBinomial(TorchDistribution):
    """``NegativeBinomial(mu, theta)`` mixed with a point mass at zero of weight ``sigmoid(zi_logits)``.

    Parameters
    ----------
    mu
        Mean of the negative binomial component, positive.
    theta
        Inverse dispersion of the negative binomial component, positive.
    zi_logits
        Logits of the probability of an extra zero, real (``-inf`` gives the plain NB).
    validate_args
        Check the parameters and the values given to :meth:`log_prob` (torch's ``validate_args``).
    """

    arg_constraints = {
        "mu": constraints.positive,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: torch.Tensor | float,
        theta: torch.Tensor | float,
        zi_logits: torch.Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        self.mu, self.theta, self.zi_logits = _as_tensors(mu, theta, zi_logits)
        batch_shape = torch.broadcast_shapes(self.mu.shape, self.theta.shape, self.zi_logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size, _instance: ZeroInflatedNegativeBinomial | None = None
    ) -> ZeroInflatedNegativeBinomial:
        """The same distribution with batch shape ``batch_shape``; the parameters are not copied."""
        return _expand(self, ZeroInflatedNegativeBinomial, batch_shape, _instance)

    @property
    def mean(self) -> torch.Tensor:
        """:math:`(1 - \\pi)\\mu`, of shape ``batch_shape``."""
        return (torch.sigmoid(-self.zi_logits) * self.mu).expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        """:math:`(1 - \\pi)(\\mu + \\mu^2/\\theta) + \\pi(1 - \\pi)\\mu^2`, of shape ``batch_shape``."""
        keep = torch.sigmoid(-self.zi_logits)
        mu2 = self.mu.square()
        return (keep * (self.mu + mu2 / self.theta) + keep * (1 - keep) * mu2).expand(self.batch_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Counts of shape ``sample_shape + batch_shape``: negative binomial draws, each replaced by an
        extra zero with probability :math:`\\pi`."""
        shape = self._extended_shape(sample_shape)
        counts = _gamma_poisson_sample(self.mu, self.theta, shape)
        with torch.no_grad():
            extra_zero = torch.bernoulli(torch.sigmoid(self.zi_logits).expand(shape)).bool()
        return counts.masked_fill(extra_zero, 0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log ZINB(``value`` | mu, theta, zi_logits), with ``value`` broadcast against ``batch_shape``; the
        formulas are in the module docstring."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        dense, nonzeros = _sparse_fused_path(value, self.mu, self.theta, self.zi_logits)
        if nonzeros is not None:
            return _FusedLogProb.apply(value, self.mu, self.theta, self.zi_logits, nonzeros).expand(shape)
        log_zero = torch.logaddexp(
            F.logsigmoid(self.zi_logits),
            F.logsigmoid(-self.zi_logits) + _nb_zero_log_prob(self.mu, self.theta),
        )
        if dense:
            nb = _nb_dense_log_prob(value, self.mu, self.theta)
            return torch.where(value == 0, log_zero, F.logsigmoid(-self.zi_logits) + nb).expand(shape)
        nonzeros = _Nonzeros(value, shape)
        log_nonzero = F.logsigmoid(-nonzeros.gather(self.zi_logits)) + _nb_nonzero_log_prob(
            nonzeros, value, self.mu, self.theta
        )
        return nonzeros.scatter(log_zero, log_nonzero)


class TopKCategorical(TorchDistribution):
    """A categorical distribution restricted to each element's ``k`` most probable values, renormalised.

    A guide for a discrete site summed out by ``TraceEnum_ELBO``: its parallel enumeration runs over the
    ``k`` values each element keeps (``enumerate_support`` returns them, of shape ``(k,) + batch_shape``,
    different per element), not over all categories. The ELBO is then the exact ELBO of this truncated
    guide, a lower bound like any other, at ``k / n_categories`` of the enumerated work. A value outside
    an element's ``k`` has log-probability ``-inf``.

    Parameters
    ----------
    logits
        Unnormalised log-probabilities, ``batch_shape + (n_categories,)``.
    k
        How many values each element keeps, ``1 <= k <= n_categories``.
    validate_args
        torch's ``validate_args``.

    Examples
    --------
    >>> q = TopKCategorical(torch.tensor([[0.0, 2.0, 1.0]]), k=2)
    >>> q.enumerate_support()
    tensor([[1],
            [2]])
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_enumerate_support = True

    def __init__(self, logits: torch.Tensor, k: int, validate_args: bool | None = None) -> None:
        if logits.dim() < 1:
            raise ValueError("logits needs a last dimension of categories")
        n_categories = logits.shape[-1]
        if not 1 <= int(k) <= n_categories:
            raise ValueError(f"k must be between 1 and the number of categories ({n_categories}), got {k}")
        self.logits, self.k = logits, int(k)
        top_logits, self.top_values = logits.topk(self.k, dim=-1)  # (..., k), most probable first
        self.top_log_probs = top_logits.log_softmax(-1)
        super().__init__(logits.shape[:-1], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        """The integers ``0 .. n_categories - 1``."""
        return constraints.integer_interval(0, self.logits.shape[-1] - 1)

    def expand(self, batch_shape: torch.Size, _instance: TopKCategorical | None = None) -> TopKCategorical:
        """The same distribution with batch shape ``batch_shape``."""
        return TopKCategorical(self.logits.expand(torch.Size(batch_shape) + self.logits.shape[-1:]), self.k)

    @property
    def probs(self) -> torch.Tensor:
        """The renormalised probabilities of all categories (zero outside the ``k``), ``batch_shape + (n,)``."""
        return torch.zeros_like(self.logits).scatter(-1, self.top_values, self.top_log_probs.exp())

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Category indices of shape ``sample_shape + batch_shape``."""
        with torch.no_grad():
            slot = torch.distributions.Categorical(logits=self.top_log_probs).sample(sample_shape)
            top = self.top_values.expand(slot.shape + (self.k,))
            return top.gather(-1, slot.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The renormalised log-probability of ``value`` (``-inf`` outside the element's ``k`` values)."""
        if self._validate_args:
            self._validate_sample(value)
        log_probs = torch.full_like(self.logits, -math.inf).scatter(-1, self.top_values, self.top_log_probs)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        value = value.long().expand(shape).unsqueeze(-1)
        return log_probs.expand(shape + log_probs.shape[-1:]).gather(-1, value).squeeze(-1)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """Each element's ``k`` values, of shape ``(k,) + batch_shape`` (per element, so always expanded)."""
        return self.top_values.movedim(-1, 0)
