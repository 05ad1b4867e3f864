"""Tier 2: pyvl.patch on open_clip's ClipLoss and SigLipLoss: single-process values and gradients (features,
logit_scale, logit_bias) against the unpatched loss by the error criterion, output_dict, objects holding losses,
copies, the settings pyvl refuses, and a 2-process gloo run against unpatched open_clip on each rank."""
import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyvl
from pyvl.testing import assert_gradients_close_to_reference
from pyvl.testing import strategies as pst

open_clip_loss = pytest.importorskip("open_clip.loss")
ClipLoss, SigLipLoss = open_clip_loss.ClipLoss, open_clip_loss.SigLipLoss


def _loss_fn(loss, problem):
    """loss(image, text, scale, bias) on the problem's views, scale / bias the leaves where they are tensors."""
    _, _, scale, bias = problem.make_storage()

    def fn(x, y, *scalars):
        it = iter(scalars)
        s = next(it) if isinstance(scale, torch.Tensor) else scale
        b = next(it) if isinstance(bias, torch.Tensor) else bias
        return loss(problem.view(x), problem.view(y), s, b)

    return fn


@given(pst.contrastive_problems(max_N=40, max_d=24), st.booleans())
@settings(max_examples=25)
def test_patched_loss_matches_open_clip(problem, cache_labels):
    """Whole problems (N, d, dtype, strides, scale / bias as floats or tensors) through the error criterion: the
    patched loss against the unpatched open_clip loss in float64 (the truth) and in the problem's dtype."""
    if problem.kind == "softmax":
        ours, theirs = ClipLoss(cache_labels=cache_labels), ClipLoss(cache_labels=cache_labels)
    else:
        ours, theirs = SigLipLoss(cache_labels=cache_labels), SigLipLoss(cache_labels=cache_labels)
    assert pyvl.patch(ours) is ours
    first, second, scale, bias = problem.make_storage()
    args = [first, second] + [t for t in (scale, bias) if isinstance(t, torch.Tensor)]
    assert_gradients_close_to_reference(_loss_fn(ours, problem), _loss_fn(theirs, problem), args, name=str(problem))


@pytest.mark.parametrize("N,d", [(1, 3), (7, 5), (33, 16)])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_patched_loss_values_and_gradients_float64(kind, N, d):
    g = torch.Generator().manual_seed(N * d)
    x = torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    leaves = lambda: [x.clone().requires_grad_(), y.clone().requires_grad_(),  # noqa: E731
                      torch.tensor(14.3, dtype=torch.float64, requires_grad=True),
                      torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)]
    cls = ClipLoss if kind == "softmax" else SigLipLoss
    ours = pyvl.patch(cls())
    a, b = leaves(), leaves()
    got, want = ours(*a), cls()(*b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(torch.autograd.grad(got, a, allow_unused=True), torch.autograd.grad(want, b)):
        torch.testing.assert_close(torch.zeros_like(gb) if ga is None else ga, gb, rtol=1e-10, atol=1e-12)


def test_output_dict_and_no_bias():
    x, y = torch.nn.functional.normalize(torch.randn(2, 6, 4, dtype=torch.float64), dim=-1)
    for cls, bias in ((ClipLoss, None), (SigLipLoss, None), (SigLipLoss, -10.0)):
        out = pyvl.patch(cls())(x, y, 10.0, bias, output_dict=True)
        assert set(out) == {"contrastive_loss"}
        torch.testing.assert_close(out["contrastive_loss"], cls()(x, y, 10.0, bias), rtol=1e-12, atol=1e-12)


def test_patch_finds_losses_in_modules_and_objects():
    class Holder:  # a training script's loss holder: not a module
        def __init__(self):
            self.losses = {"clip": ClipLoss(), "siglip": [SigLipLoss()]}

    holder = Holder()
    assert pyvl.patch(holder) is holder
    wrapper = torch.nn.ModuleDict({"loss": ClipLoss(), "head": torch.nn.Linear(2, 2)})
    assert pyvl.patch(wrapper) is wrapper
    for loss in (holder.losses["clip"], holder.losses["siglip"][0], wrapper["loss"]):
        assert "forward" in vars(loss)  # swapped on the instance; the class is untouched
    assert "forward" not in vars(ClipLoss())
    pyvl.patch(wrapper)  # patching twice keeps one swap
    # Copies and pickles bind to the copied loss, and still compute the same.
    x, y = torch.nn.functional.normalize(torch.randn(2, 5, 3, dtype=torch.float64), dim=-1)
    for clone in (copy.deepcopy(wrapper), torch.load(_saved(wrapper), weights_only=False)):
        assert clone["loss"].forward.loss is clone["loss"]
        torch.testing.assert_close(clone["loss"](x, y, 5.0), ClipLoss()(x, y, 5.0), rtol=1e-12, atol=1e-12)


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_patch_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="local_loss=True, gather_with_grad=False"):
        pyvl.patch(ClipLoss(local_loss=True, gather_with_grad=False, rank=0, world_size=2))
    with pytest.raises(ValueError, match="use_horovod=True"):
        pyvl.patch(torch.nn.Sequential(ClipLoss(gather_with_grad=True, rank=1, world_size=2, use_horovod=True)))
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        pyvl.patch(SigLipLoss(rank=2, world_size=2))
    with pytest.raises(ValueError, match="no open_clip ClipLoss / SigLipLoss"):
        pyvl.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ClipLoss"):
        pyvl.patch(object())
    # A setting changed after patching is checked on the call.
    loss = pyvl.patch(ClipLoss(gather_with_grad=True, rank=0, world_size=2))
    loss.gather_with_grad = False
    loss.local_loss = True
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="gather_with_grad=False"):
        loss(x, x, 1.0)
    # world_size > 1 without torch.distributed initialized.
    with pytest.raises(ValueError, match="not initialized"):
        pyvl.patch(SigLipLoss(rank=0, world_size=2))(x, x, 1.0, 0.0)
    # CoCaLoss has its own forward: left alone, so a module holding only one holds nothing pyvl swaps.
    with pytest.raises(ValueError, match="no open_clip"):
        pyvl.patch(open_clip_loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0))


# ---------------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes, the patched loss against unpatched open_clip on each rank


def test_distributed_patched_matches_open_clip(tmp_path):
    import torch.multiprocessing as mp

    from _patch_open_clip_dist import worker

    world = 2
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path), 5, 6), nprocs=world, join=True)
    failures, checked = [], 0
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            result = json.load(f)
        failures += result["failures"]
        checked += result["checked"]
    assert not failures, failures
    assert checked >= 2 * 5 * 4, checked  # every setting compared its value and gradients on both ranks
