"""Tier 2: pyvl.ops.gather_scatter_add: the C++ backend against the reference (hypothesis graphs with isolated
nodes, no edges, duplicate edges, self-loops, non-contiguous features, every dtype; the error criterion on the output
and both gradients), determinism, gradcheck, opcheck, torch.compile(fullgraph=True), argument checks."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyvl import _ext
from pyvl.ops import gather_scatter_add
from pyvl.reference import message_passing as ref
from pyvl.testing import assert_gradients_close_to_reference

needs_ext = pytest.mark.skipif(_ext.LOAD_ERROR is not None, reason="pyvl._C is not built")


@dataclasses.dataclass(frozen=True)
class GraphProblem:
    N: int  # source rows
    num_nodes: int  # output rows
    E: int
    d: int
    dtype: torch.dtype
    layout: str  # "dense", "sliced" (every other column), "transposed" (column-major)
    edge_attr: bool
    duplicates: bool  # repeat a block of edges
    seed: int

    def make(self):
        g = torch.Generator().manual_seed(self.seed)
        if self.layout == "sliced":
            x = torch.randn(self.N, 2 * self.d, generator=g, dtype=torch.float64)[:, ::2]
        elif self.layout == "transposed":
            x = torch.randn(self.d, self.N, generator=g, dtype=torch.float64).T
        else:
            x = torch.randn(self.N, self.d, generator=g, dtype=torch.float64)
        # Destinations drawn from the first half of the rows only, so that some rows are isolated.
        reach = max(1, (self.num_nodes + 1) // 2)
        edge_index = torch.stack([torch.randint(self.N, (self.E,), generator=g),
                                  torch.randint(reach, (self.E,), generator=g)])
        if self.duplicates and self.E:
            edge_index = torch.cat([edge_index, edge_index[:, : (self.E + 1) // 2]], 1)
        edge_attr = torch.randn(edge_index.shape[1], self.d, generator=g, dtype=torch.float64).to(self.dtype) \
            if self.edge_attr else None
        return x.to(self.dtype), edge_index, edge_attr


@st.composite
def graph_problems(draw, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)):
    N = draw(st.integers(1, 40))
    return GraphProblem(N=N, num_nodes=draw(st.sampled_from([N, N + draw(st.integers(1, 5))])),
                        E=draw(st.sampled_from([0, 1, draw(st.integers(2, 120))])), d=draw(st.integers(1, 37)),
                        dtype=draw(st.sampled_from(dtypes)),
                        layout=draw(st.sampled_from(["dense", "sliced", "transposed"])),
                        edge_attr=draw(st.booleans()), duplicates=draw(st.booleans()),
                        seed=draw(st.integers(0, 2**16)))


@needs_ext
@given(graph_problems())
def test_cpu_matches_reference(problem):
    x, edge_index, edge_attr = problem.make()
    args = [x] + ([edge_attr] if edge_attr is not None else [])

    def call(fn):
        return lambda x, *e: fn(x, edge_index, e[0] if e else None, problem.num_nodes)

    assert_gradients_close_to_reference(call(lambda *a: gather_scatter_add(*a, backend="cpu")),
                                        call(ref.gather_scatter_add), args, name=str(problem))


@needs_ext
def test_cpu_float32_equals_index_add_bitwise_and_is_deterministic():
    # Each output row sums its edges in input order, as a sequential index_add_ does, whatever the thread count.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 64, generator=g)
    edge_index = torch.randint(3000, (2, 9000), generator=g)
    edge_attr = torch.randn(9000, 64, generator=g)
    out = gather_scatter_add(x, edge_index, edge_attr, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ref.gather_scatter_add(x, edge_index, edge_attr)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, serial)
    assert torch.equal(out, gather_scatter_add(x, edge_index, edge_attr, backend="cpu"))


@needs_ext
@pytest.mark.parametrize("with_edge", [True, False])
def test_cpu_gradcheck(with_edge):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    edge_index = torch.tensor([[0, 1, 1, 5, 2, 2, 0], [1, 0, 2, 2, 1, 1, 7]])  # duplicates, rows 3, 4, 6 isolated
    e = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    args = (x, e) if with_edge else (x,)
    assert torch.autograd.gradcheck(
        lambda x, *e: gather_scatter_add(x, edge_index, e[0] if e else None, 8, backend="cpu"), args)


@needs_ext
def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g, requires_grad=True)
    src = torch.randint(9, (20,), generator=g)
    dst = torch.randint(11, (20,), generator=g)
    e = torch.randn(20, 5, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.pyvl.gather_scatter_add.default, (x, src, dst, e, 11))
    torch.library.opcheck(torch.ops.pyvl.gather_scatter_add.default, (x, src, dst, None, 11))
    torch.library.opcheck(torch.ops.pyvl.gather_scatter_add.default, (x, src[:0], dst[:0], e[:0], 11))


@needs_ext
def test_compile_fullgraph():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 6, generator=g)
    edge_index = torch.randint(12, (2, 30), generator=g)
    e = torch.randn(30, 6, generator=g)
    w = torch.randn(6, 6, generator=g)

    def fn(x, e):
        return torch.relu(gather_scatter_add(x, edge_index, e, backend="cpu") @ w).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, e)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    eager = [t.clone().requires_grad_() for t in (x, e)]
    want = fn(*eager)
    torch.testing.assert_close(out, want)
    for got, exp in zip(grads, torch.autograd.grad(want, eager)):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_no_edges_gives_zeros(backend):
    x = torch.randn(4, 3)
    out = gather_scatter_add(x, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3), 6, backend=backend)
    assert out.shape == (6, 3) and not out.any()


def _bad_cases():
    x = torch.randn(5, 3)
    ei = torch.tensor([[0, 4], [1, 2]])
    e = torch.randn(2, 3)
    return [
        ("x not a tensor", (x.tolist(), ei), {}, TypeError, ["x", "torch.Tensor"]),
        ("x integer", (x.long(), ei), {}, TypeError, ["x", "float"]),
        ("x 3-D", (x[None], ei), {}, ValueError, ["x", "2 dimensions"]),
        ("edge_index float", (x, ei.float()), {}, TypeError, ["edge_index", "int64"]),
        ("edge_index shape", (x, ei.T.reshape(4, 1)), {}, ValueError, ["edge_index", "[2, E]"]),
        ("source out of range", (x, torch.tensor([[5], [0]])), {}, ValueError, ["edge_index[0]", "[0, 5)"]),
        ("negative source", (x, torch.tensor([[-1], [0]])), {}, ValueError, ["edge_index[0]"]),
        ("destination out of range", (x, torch.tensor([[0], [3]])), {"num_nodes": 3}, ValueError,
         ["edge_index[1]", "num_nodes"]),
        ("edge_attr shape", (x, ei, e[:1]), {}, ValueError, ["edge_attr", "[2, 3]"]),
        ("edge_attr dtype", (x, ei, e.double()), {}, TypeError, ["edge_attr", "dtype"]),
        ("num_nodes negative", (x, ei), {"num_nodes": -1}, ValueError, ["num_nodes"]),
        ("backend", (x, ei), {"backend": "gpu"}, ValueError, ["backend"]),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments(case):
    _, args, kwargs, exc, words = case
    with pytest.raises(exc) as info:
        gather_scatter_add(*args, **kwargs)
    for w in words:
        assert w in str(info.value)
