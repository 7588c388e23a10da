"""PyTorch adapter: Jacobians as operators, implicit gradients and recurrent back-propagation.

At a fixed point ``h* = f(h*)`` of a map ``f`` that closes over parameters ``w``, the gradient
of a loss ``L(h*)`` is ``dL/dw = z^T df/dw`` where ``(I - J^T) z = dL/dh*`` and ``J = df/dh``
at ``h*`` (recurrent back-propagation, RBP; Almeida 1987, Pineda 1987; Liao et al., 2018).

The data flows down through the modules of this package (each imports only those above it in
this list, and none imports the command line, the experiments or the test problems):

- ``_checks``: argument checks, the failure policy, autocast regions (no state).
- ``jacobian``: :class:`JacobianOperator`, ``J`` as a :class:`linsolve_rbp.LinearOperator`;
  ``J.T @ u`` is a vector-Jacobian product on one recorded evaluation of ``f``, ``J @ v`` a
  Jacobian-vector product (forward mode, or the double-backward trick).
- ``implicit``: :func:`implicit_grad`, the adjoint solve with any method of
  :func:`linsolve_rbp.methods`, and ``z^T df/dw``.
- ``layer``: :func:`fixed_point`, a differentiable fixed-point layer (the forward pass
  iterates without a graph, the backward pass solves the adjoint system), its per-call
  :class:`FixedPointInfo` and the per-layer :class:`WarmStart` store.
- ``baselines``: :func:`unroll`, back-propagation through time (BPTT) and its truncated
  variant (TBPTT), the baselines of the paper.
- ``penalties``: :func:`jacobian_penalty` (the Hutchinson estimate of ``||J||_F^2``),
  :func:`jacobian_matrix`, and :func:`column_norm_penalty`, :func:`gershgorin_penalty`,
  penalties on a dense Jacobian; all to add to a training loss.
- ``dropout``: :class:`VariationalDropout`, one dropout mask per forward solve.
- ``module``: :class:`DEQ`, the layer as an :class:`torch.nn.Module` with its configuration,
  train and eval budgets, warm-start store, regularisers and per-call statistics.

No module keeps state: warm starts live in the :class:`WarmStart` a layer is given, and the
result of a backward pass in the :class:`FixedPointInfo` of the call (and that store); a
:class:`DEQ` keeps its own store and the records of its calls.

References
----------
R. Liao, Y. Xiong, E. Fetaya, L. Zhang, K. Yoon, X. Pitkow, R. Urtasun, R. Zemel,
"Reviving and Improving Recurrent Back-Propagation", ICML 2018.

S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019 (the gradient hook
used by :func:`fixed_point`).
"""

from .baselines import unroll
from .implicit import implicit_grad
from .jacobian import JacobianOperator
from .layer import FixedPointInfo, WarmStart, fixed_point
from .penalties import column_norm_penalty, gershgorin_penalty, jacobian_matrix, jacobian_penalty
from .dropout import VariationalDropout, reset_dropout
from .module import DEQ, DEQCall

__all__ = [
    "JacobianOperator",
    "implicit_grad",
    "fixed_point",
    "unroll",
    "FixedPointInfo",
    "WarmStart",
    "column_norm_penalty",
    "gershgorin_penalty",
    "jacobian_penalty",
    "jacobian_matrix",
    "VariationalDropout",
    "reset_dropout",
    "DEQ",
    "DEQCall",
]
