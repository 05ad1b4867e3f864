"""Message passing by gather + add + scatter-sum: the aggregation of GIN with edge features (Hu et al. 2020).

Public op: `gather_scatter_add`. It checks its arguments, chooses a backend (pyvl._backend.choose) and calls one of:
  reference  pyvl.reference.message_passing (index_select + index_add_; autograd by PyTorch)
  cpu        torch.ops.pyvl.gather_scatter_add, the C++ kernel in csrc/cpu/message_passing.cpp (edges bucketed by
             destination, one thread per output row: no atomics, deterministic, no [E, d] messages)
The compiled op gets its fake kernel and autograd here, so it works under torch.compile(fullgraph=True). There is
no GPU kernel yet: CUDA tensors run the reference (index_add_ with atomics on the GPU).

NaN policy: NaN and inf propagate as in IEEE arithmetic; nothing is checked.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext  # noqa: F401  (_ext registers the C++ schemas)
from ..reference import message_passing as ref
from ._checks import check_tensor

__all__ = ["gather_scatter_add"]


def _fake_gather_scatter_add(x, src, dst, edge_attr, num_out):
    return x.new_empty((num_out, x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, src, dst, edge_attr, num_out = inputs
    ctx.save_for_backward(src, dst)
    ctx.num_in = x.shape[0]
    ctx.has_edge = edge_attr is not None


def _backward(ctx, grad):
    src, dst = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_edge = None
    if ctx.needs_input_grad[0]:
        # The transposed scatter: grad_x[j] = sum over edges e with src[e] == j of grad[dst[e]], by the same kernel.
        grad_x = torch.ops.pyvl.gather_scatter_add.default(grad, dst, src, None, ctx.num_in)
    if ctx.has_edge and ctx.needs_input_grad[3]:
        grad_edge = grad.index_select(0, dst)
    return grad_x, None, None, grad_edge, None


if _ext.LOAD_ERROR is None:
    torch.library.register_fake("pyvl::gather_scatter_add")(_fake_gather_scatter_add)
    torch.library.register_autograd("pyvl::gather_scatter_add", _backward, setup_context=_setup_context)


def _check_edge_index(edge_index, x, num_nodes):
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor, got {type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"edge_index must be int64 (or int32), got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    if edge_index.device != x.device:
        raise ValueError(f"edge_index must be on {x.device} like x, got {edge_index.device}")
    if edge_index.shape[1] == 0 or torch.compiler.is_compiling():
        # Under torch.compile the values are not known at trace time; the C++ kernel checks them again as it
        # buckets the edges (and raises), and index_add_ does on the reference path.
        return
    # One pass over the indices (E is small next to E * d), so the error names the argument.
    lo, hi = torch.aminmax(edge_index, dim=1)
    lo, hi = lo.tolist(), hi.tolist()
    if lo[0] < 0 or hi[0] >= x.shape[0]:
        raise ValueError(f"edge_index[0] (sources) must lie in [0, {x.shape[0]}) (x's rows), got values in "
                         f"[{lo[0]}, {hi[0]}]")
    if lo[1] < 0 or hi[1] >= num_nodes:
        raise ValueError(f"edge_index[1] (destinations) must lie in [0, {num_nodes}) (num_nodes), got values in "
                         f"[{lo[1]}, {hi[1]}]")


def gather_scatter_add(x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor | None = None,
                       num_nodes: int | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Sum-aggregated messages x_j + e_ji: out[i] = sum over edges e = (j -> i) of (x[j] + edge_attr[e]).

    The message passing of GIN with edge features (pretrain-gnns' GINConv before its MLP), fused: the messages
    are never stored in the forward; the backward gives grad_x[j] = sum over edges (j -> i) of grad_out[i] and
    grad_edge_attr[e] = grad_out[dst[e]].

    Args:
        x: node features [N, d], float16/bfloat16/float32/float64 (any strides).
        edge_index: int64 [2, E]: row 0 the sources j, row 1 the destinations i (torch_geometric's convention).
            Duplicate edges count once each; self-loops are ordinary edges (add them yourself).
        edge_attr: [E, d] of x's dtype, or None for plain sum aggregation of x[j].
        num_nodes: rows of the output (default N); destinations must be below it.
        backend: None (PYVL_BACKEND, else the fastest that can run), "reference" or "cpu".

    Returns [num_nodes, d]; rows no edge reaches are 0.
    """
    check_tensor("x", x, dim=2)
    if num_nodes is None:
        num_nodes = x.shape[0]
    elif isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise ValueError(f"num_nodes must be an int >= 0 or None, got {num_nodes!r}")
    _check_edge_index(edge_index, x, num_nodes)
    if edge_attr is not None:
        check_tensor("edge_attr", edge_attr, dim=2, like=x)
        if edge_attr.shape != (edge_index.shape[1], x.shape[1]):
            raise ValueError(f"edge_attr must have shape [E, d] = [{edge_index.shape[1]}, {x.shape[1]}] (edges of "
                             f"edge_index, x's features), got {tuple(edge_attr.shape)}")
    edge_index = edge_index.long()
    chosen = _backend.choose("gather_scatter_add", backend, x)
    if chosen == "reference":
        return ref.gather_scatter_add(x, edge_index, edge_attr, num_nodes)
    src, dst = edge_index[0].contiguous(), edge_index[1].contiguous()
    return torch.ops.pyvl.gather_scatter_add.default(x, src, dst, edge_attr, num_nodes)
