"""`pyvl bench` cases of the window-attention family (imported by pyvl.bench).

Shapes: the attention of every stage of Swin-T (224 x 224 input: tokens 56^2, 28^2, 14^2, 7^2; heads 3, 6, 12, 24;
d 32; window 7, shift 3 where the stage has more than one window) and of Video Swin-T (32 x 224 x 224 clip, patch
2x4x4: tokens 16 x 56^2 ... 16 x 7^2; window 8x7x7, shift 4x3x3). `quick` halves Video Swin's frames.

Two kinds of case:
  window_attn_fwd / window_attn_fwd_bwd   the attention core on q, k, v in token layout: pyvl's op against
      "torchvision eager" (roll + pad + partition + matmul + bias + shift mask + softmax + matmul + reverse, the
      algorithm of torchvision's shifted_window_attention without its two linears; pyvl.reference is that code and
      tests/test_reference_window_attention.py holds it equal to torchvision's function) and against
      "sdpa dense" (the same partition and reverse around F.scaled_dot_product_attention with a dense
      [nW, heads, N, N] bias + mask tensor, what timm runs with TIMM_FUSED_ATTN) and against "flex compiled"
      (the same partition and reverse around torch.compile(flex_attention) on [B * nW, heads, N, d], N = 49 or 392
      unpadded, with a score_mod that gathers the bias table and applies the -100 shift mask by index arithmetic;
      the table's gradient flows through the score_mod). Flex is compiled and run once while the case is built, so
      compile time is not timed; where it cannot run (no Flex backward on the CPU in torch 2.14, a failed Inductor
      compile) that peer alone is reported skipped with the reason. The `tiny` size set (CI's, through
      tests/test_bench.py) leaves the flex peer out: CI must not pay for Inductor compiles.
  swin_block_fwd / swin_block_fwd_bwd     torchvision's own ShiftedWindowAttention(3d) module (linears included)
      against the same module after pyvl.patch; skipped until pyvl.patch exists.
  swin_model                              whole torchvision swin_t and swin3d_t (random weights), eval forward and
      one training step (forward, loss, backward, SGD step), before and after pyvl.patch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WINDOW_OPS = ("window_attn_fwd", "window_attn_fwd_bwd", "swin_block_fwd", "swin_block_fwd_bwd", "swin_model")


@dataclass(frozen=True)
class WindowShape:
    name: str
    B: int
    sizes: tuple[int, ...]
    heads: int
    window: tuple[int, ...]
    shift: tuple[int, ...]
    d: int = 32

    def label(self) -> str:
        return f"{self.name} B{self.B} {'x'.join(map(str, self.sizes))} h{self.heads}"


def _swin_t(B):
    return [WindowShape(f"swin_t s{i + 1}", B, (56 >> i, 56 >> i), 3 << i, (7, 7), (3, 3) if i < 3 else (0, 0))
            for i in range(4)]


def _video_swin_t(B, T):
    return [WindowShape(f"swin3d_t s{i + 1}", B, (T, 56 >> i, 56 >> i), 3 << i, (8, 7, 7),
                        (4, 3, 3) if i < 3 else (4, 0, 0)) for i in range(4)]


WINDOW_SIZES = {
    "quick": {"cpu": _swin_t(2) + _video_swin_t(1, 8), "cuda": _swin_t(64) + _video_swin_t(8, 16)},
    "full": {"cpu": _swin_t(8) + _video_swin_t(1, 16), "cuda": _swin_t(128) + _video_swin_t(16, 16)},
    "tiny": {"cpu": [WindowShape("tiny", 1, (9, 10), 2, (4, 4), (2, 2), d=8),
                     WindowShape("tiny3d", 1, (3, 6, 5), 2, (2, 3, 3), (1, 1, 1), d=8)],
             "cuda": [WindowShape("tiny", 1, (9, 10), 2, (4, 4), (2, 2), d=8)]},
}


def _tensors(s: WindowShape, device, dtype, grad: bool):
    gen = torch.Generator().manual_seed(0)
    shape = (s.B, *s.sizes, 3, s.heads, s.d)  # one qkv projection output, as a model has it
    qkv = torch.randn(shape, generator=gen).to(device, dtype)
    rows = math.prod([2 * w - 1 for w in s.window])
    table = (torch.randn(rows, s.heads, generator=gen) * 0.02).to(device, dtype)
    if grad:
        qkv.requires_grad_(True)
        table.requires_grad_(True)
    q, k, v = qkv.unbind(-3)
    return qkv, q, k, v, table


def _windows(q, k, v, window, shift):
    """Partition q, k, v (B, *S, heads, d) as torchvision does (pad, roll, windows): three [B * nW, heads, N, d]
    tensors, and `back(out)` that puts such an output back in token layout (reverse, unroll, crop)."""
    from pyvl.reference import window_attention as ref

    nd = len(window)
    sizes = q.shape[1:1 + nd]
    padded = [ref.padded_size(n, w) for n, w in zip(sizes, window)]
    N = math.prod(window)
    heads = q.shape[-2]
    grids = [ref._partition(ref._to_grid(t, None, window, shift, True), window) for t in (q, k, v)]
    B, nW = grids[0].shape[:2]

    def back(out):
        return ref._from_grid(ref._reverse(out.reshape(B, nW, heads, N, -1), padded, window), sizes, window, shift,
                              True)

    return [g.reshape(B * nW, heads, N, -1) for g in grids], padded, nW, back


def _sdpa_dense(q, k, v, table, window, shift):
    """timm's fused path: partition (roll + pad as torchvision), then SDPA with a dense bias + mask tensor."""
    from pyvl.reference import window_attention as ref

    (qw, kw, vw), padded, nW, back = _windows(q, k, v, window, shift)
    N, heads = math.prod(window), q.shape[-2]
    bias = table[ref.relative_position_index(window, q.device).reshape(-1)].reshape(N, N, heads).permute(2, 0, 1)
    mask = ref.shift_mask(padded, window, shift, q.device)
    full = bias[None].expand(nW, heads, N, N)
    if mask is not None:
        full = full + torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, -100.0)[:, None]
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=full.repeat(qw.shape[0] // nW, 1, 1, 1))
    return back(out)


def _flex_score_mod(table, window, shift, padded, nW):
    """FlexAttention score_mod for windows laid out as _windows makes them (batch index b = image * nW + window):
    adds table[relative_position_index[i, j], h] and -100 where query i and key j lie in different shift regions
    (pyvl.reference.window_attention.region_labels), both by index arithmetic on b, i, j, nothing materialized.
    The table is captured, so its gradient flows through the score_mod (Flex accumulates it with atomics)."""
    nd = len(window)
    counts = [p // w for p, w in zip(padded, window)]
    table_stride = [math.prod(2 * w - 1 for w in window[i + 1:]) for i in range(nd)]
    token_stride = [math.prod(window[i + 1:]) for i in range(nd)]
    window_stride = [math.prod(counts[i + 1:]) for i in range(nd)]

    def score_mod(score, b, h, i, j):
        index, differ = 0, None
        w_id = b % nW
        for dim in range(nd):
            ci = (i // token_stride[dim]) % window[dim]
            cj = (j // token_stride[dim]) % window[dim]
            index = index + (ci - cj + window[dim] - 1) * table_stride[dim]
            if shift[dim]:  # region label of a grid position p: (p >= padded - window) + (p >= padded - shift)
                start = (w_id // window_stride[dim]) % counts[dim] * window[dim]
                lo, hi = padded[dim] - window[dim], padded[dim] - shift[dim]
                li = (start + ci >= lo).to(torch.int32) + (start + ci >= hi).to(torch.int32)
                lj = (start + cj >= lo).to(torch.int32) + (start + cj >= hi).to(torch.int32)
                differ = (li != lj) if differ is None else differ | (li != lj)
        out = score + table[index, h].to(score.dtype)
        return out if differ is None else torch.where(differ, out - 100.0, out)

    return score_mod


def _flex_peer(q, k, v, table, window, shift, wrap):
    """The "flex compiled" callable, wrap(forward): torch.compile(flex_attention) built once and run once here
    (compile time is not timed). Raises pyvl.bench.Skip where this torch or device cannot run it."""
    from pyvl.bench import Skip

    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        raise Skip(f"FlexAttention is not in torch {torch.__version__}: {e}") from None
    # dynamic=False: one graph per case; torch 2.14's dynamic-shape CPU kernel indexed the table out of bounds.
    # Every case is a new graph of the one flex_attention function: past dynamo's recompile limit (8 by default)
    # it would silently run eagerly and be timed as "compiled". This process only benchmarks, so raise the limit.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, max(getattr(cfg, name), 512))
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn():
        (qw, kw, vw), padded, nW, back = _windows(q, k, v, window, shift)
        return back(compiled(qw, kw, vw, score_mod=_flex_score_mod(table, window, shift, padded, nW)))

    fn = wrap(fn)
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (e.g. no Flex backward on the CPU, an Inductor compile failure)
        raise Skip(f"flex compiled: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return fn


def _core(s: WindowShape, backward: bool, flex: bool):
    """flex: add the "flex compiled" peer (False for the tiny size set: CI must not pay for Inductor compiles)."""

    def build(device, dtype, backend):
        import pyvl
        from pyvl.bench import Built, Skip, _chosen_backend, _nbytes
        from pyvl.ops.window_attention import normalize_window_args

        qkv, q, k, v, table = _tensors(s, device, dtype, backward)
        chosen = _chosen_backend("window_attention", backend, q)
        window, shift = normalize_window_args(q, s.window, s.shift)

        def pyvl_fn():
            return pyvl.ops.window_attention(q, k, v, window, shift, rel_bias_table=table, backend=backend)

        def eager_fn():
            return pyvl.ops.window_attention(q, k, v, window, shift, rel_bias_table=table, backend="reference")

        def sdpa_fn():
            return _sdpa_dense(q, k, v, table, window, shift)

        fns = {"pyvl": pyvl_fn, "torchvision eager": eager_fn, "sdpa dense": sdpa_fn}
        nbytes = _nbytes(qkv, table) + _nbytes(q)  # q, k, v and the table read once, the output written once
        wrap = lambda fn: fn  # noqa: E731
        if backward:
            grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

            def wrap(fn):
                return lambda: torch.autograd.grad(fn(), (qkv, table), grad)

            fns = {name: wrap(fn) for name, fn in fns.items()}
            nbytes = 2 * nbytes + 2 * _nbytes(q)  # backward reads q, k, v, out, grad; writes dq, dk, dv, dtable
        skipped = {}
        if flex:
            try:
                fns["flex compiled"] = _flex_peer(q, k, v, table, window, shift, wrap)
            except Skip as e:
                skipped["flex compiled"] = str(e)
        pyvl_run = fns.pop("pyvl")
        return Built(pyvl_run, fns, nbytes, chosen, skipped)

    return build


def _block(s: WindowShape, backward: bool):
    def build(device, dtype, backend):
        from pyvl.bench import Built, Skip, _chosen_backend, _pyvl_backend_env

        try:
            from pyvl import patch
        except ImportError:
            raise Skip("pyvl.patch does not exist in this pyvl") from None
        C = s.heads * s.d
        if len(s.sizes) == 2:
            from torchvision.models.swin_transformer import ShiftedWindowAttention as Peer
        else:
            from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d as Peer
        peer = Peer(C, list(s.window), list(s.shift), s.heads).to(device, dtype)
        container = torch.nn.Sequential(copy.deepcopy(peer))
        with _pyvl_backend_env(backend):
            patch(container)
        ours = container[0]
        x = torch.randn(s.B, *s.sizes, C, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        chosen = _chosen_backend("window_attention", backend, x.reshape(s.B, *s.sizes, s.heads, s.d))
        if backward:
            x.requires_grad_(True)
            grad = torch.randn_like(x)

            def run(m):
                def fn():
                    with _pyvl_backend_env(backend):
                        return torch.autograd.grad(m(x), [x] + [p for p in m.parameters()], grad)
                return fn
        else:
            def run(m):
                def fn():
                    with torch.no_grad(), _pyvl_backend_env(backend):
                        return m(x)
                return fn
        return Built(run(ours), {"torchvision block": run(peer)}, None, chosen)

    return build


# (torchvision builder, input shape per device type and size set)
MODELS = {
    "swin_t": ("swin_t", {"quick": {"cpu": (2, 3, 224, 224), "cuda": (64, 3, 224, 224)},
                          "full": {"cpu": (8, 3, 224, 224), "cuda": (128, 3, 224, 224)},
                          "tiny": {"cpu": (1, 3, 64, 64), "cuda": (1, 3, 64, 64)}}),
    "swin3d_t": ("swin3d_t", {"quick": {"cpu": (1, 3, 16, 224, 224), "cuda": (8, 3, 32, 224, 224)},
                              "full": {"cpu": (1, 3, 32, 224, 224), "cuda": (16, 3, 32, 224, 224)},
                              "tiny": {"cpu": (1, 3, 4, 64, 64), "cuda": (1, 3, 4, 64, 64)}}),
}


def _model(name: str, mode: str, shape):
    def build(device, dtype, backend):
        import torchvision

        from pyvl.bench import Built, Skip, _chosen_backend, _pyvl_backend_env

        try:
            from pyvl import patch
        except ImportError:
            raise Skip("pyvl.patch does not exist in this pyvl") from None
        builder = getattr(torchvision.models, name, None) or getattr(torchvision.models.video, name)
        peer = builder(weights=None).to(device, dtype)
        ours = copy.deepcopy(peer)
        with _pyvl_backend_env(backend):
            patch(ours)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        chosen = _chosen_backend("window_attention", backend, x.new_empty((1, 1, 1, 1, 1)))
        if mode == "eval":
            peer.eval()
            ours.eval()

            def run(m):
                def fn():
                    with torch.no_grad(), _pyvl_backend_env(backend):
                        return m(x)
                return fn
        else:
            target = torch.zeros(shape[0], dtype=torch.long, device=device)

            def run(m):
                opt = torch.optim.SGD(m.parameters(), lr=1e-6)

                def fn():
                    with _pyvl_backend_env(backend):
                        opt.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(m(x).float(), target)
                        loss.backward()
                        opt.step()
                        return loss
                return fn
        return Built(run(ours), {f"torchvision {name}": run(peer)}, None, chosen)

    return build


def window_cases(sizes: str, device, ops):
    from pyvl.bench import Case

    dev = torch.device(device).type
    out = []
    for s in WINDOW_SIZES[sizes][dev]:
        layout = f"{len(s.sizes)}d"
        params = {"B": s.B, "sizes": list(s.sizes), "heads": s.heads, "d": s.d, "window": list(s.window),
                  "shift": list(s.shift)}
        flex = sizes != "tiny"  # tiny is CI's set (tests/test_bench.py): no Inductor compiles there
        for op, build in (("window_attn_fwd", _core(s, False, flex)), ("window_attn_fwd_bwd", _core(s, True, flex)),
                          ("swin_block_fwd", _block(s, False)), ("swin_block_fwd_bwd", _block(s, True))):
            if op in ops:
                out.append(Case(op, layout, s.label(), s.B, 1, build, params))
    if "swin_model" in ops:
        for name, (_, shapes) in MODELS.items():
            shape = shapes[sizes][dev]
            for mode in ("eval", "train"):
                label = f"{name} {mode} {'x'.join(map(str, shape))}"
                out.append(Case("swin_model", mode, label, shape[0], 1, _model(name, mode, shape),
                                {"model": f"torchvision {name}", "input": list(shape), "mode": mode}))
    return out
