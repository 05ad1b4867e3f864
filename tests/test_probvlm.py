"""Tier 2: pyvl.models.probvlm (ProbVLM, Upadhyay et al. 2023): the GGD likelihood against scipy's density, the
sampler's distribution, uncertainty that learns a known per-sample noise level, retrieval recall per uncertainty bin
and the calibration metrics on hand-checkable inputs, gradients (gradcheck, frozen CLIP), torch.compile."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyvl.models
from pyvl.models import probvlm as P
from pyvl.testing import check_error_criterion

scipy_stats = pytest.importorskip("scipy.stats")


def _ggd_params(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    one_over_alpha = 0.2 + 2.8 * torch.rand(shape, generator=g, dtype=torch.float64)
    beta = 0.3 + 3.7 * torch.rand(shape, generator=g, dtype=torch.float64)
    target = mu + torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return [t.to(dtype) for t in (mu, one_over_alpha, beta, target)]


def _scipy_nll(mu, one_over_alpha, beta, target):
    """-log p(target) of GGD(mu, alpha = 1 / one_over_alpha, beta) in float64 by scipy."""
    mu, a, b, y = (t.detach().double().numpy() for t in (mu, one_over_alpha, beta, target))
    return torch.from_numpy(-scipy_stats.gennorm.logpdf(y, b, loc=mu, scale=1.0 / a))


NO_CLAMP = dict(alpha_eps=0.0, beta_eps=0.0, resi_min=None, resi_max=None, reduction="none")

# ---------------------------------------------------------------------------------------------------------------
# The likelihood


def test_paper_nll_is_the_ggd_density():
    args = _ggd_params((7, 33), seed=1)
    nll = P.ggd_nll(*args, form="paper", **NO_CLAMP)
    torch.testing.assert_close(nll, _scipy_nll(*args), rtol=1e-12, atol=1e-12)


def test_paper_nll_eps_and_clamp():
    """The eps shift 1/alpha and beta; the clamp bounds only the residual term (as the official code's)."""
    mu, a, b, y = _ggd_params((50,), seed=2)
    nll = P.ggd_nll(mu, a, b, y, form="paper", alpha_eps=1e-4, beta_eps=1e-4, resi_min=None, resi_max=None,
                    reduction="none")
    torch.testing.assert_close(nll, _scipy_nll(mu, a + 1e-4, b + 1e-4, y), rtol=1e-12, atol=1e-12)
    y_far = mu + 1e3  # residual term (1e3 a)^b far above 1e3 for these a, b
    clamped = P.ggd_nll(mu, a, b, y_far, form="paper", alpha_eps=0.0, beta_eps=0.0, resi_min=1e-4, resi_max=1e3,
                        reduction="none")
    expected = 1e3 - torch.log(a) - torch.log(b) + torch.lgamma(1 / b) + math.log(2)
    big = (1e3 * a) ** b > 1e3
    assert big.sum() > 10
    torch.testing.assert_close(clamped[big], expected[big])


def test_code_form_matches_paper_form_at_beta_one_only():
    """The official product |mu - y| (1/alpha) beta equals the power (|mu - y| / alpha)^beta at beta = 1 (and the
    code drops the constant log 2); elsewhere they differ."""
    mu, a, _, y = _ggd_params((40,), seed=3)
    one = torch.ones_like(mu)
    code = P.ggd_nll(mu, a, one, y, form="code", **NO_CLAMP)
    torch.testing.assert_close(code + math.log(2), _scipy_nll(mu, a, one, y), rtol=1e-12, atol=1e-12)
    two = 2 * one
    code2 = P.ggd_nll(mu, a, two, y, form="code", **NO_CLAMP)
    assert (code2 - _scipy_nll(mu, a, two, y)).abs().max() > 0.1


def test_code_form_defaults():
    """form="code" with the official eps 1e-4 and clamp [1e-4, 1e3], mean reduction, is pyvl's default."""
    mu, a, b, y = _ggd_params((6, 5), seed=4)
    a = a.clone()
    a[0, 0] = 0.0  # a ReLU head's exact zero stays finite through alpha_eps
    b = b.clone()
    b[1, 1] = 0.0
    out = P.ggd_nll(mu, a, b, y)
    a1, b1 = a + 1e-4, b + 1e-4
    resi = ((mu - y).abs() * a1 * b1).clamp(1e-4, 1e3)
    expected = (resi - a1.log() - b1.log() + torch.lgamma(1 / b1)).mean()
    assert torch.isfinite(out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert P.ggd_nll(mu, a, b, y, reduction="sum").item() == pytest.approx(out.item() * 30)


LAYOUTS = ("contiguous", "transposed", "sliced")


def _layout(t, layout):
    if layout == "transposed":
        return t.T.contiguous().T
    if layout == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


@given(B=st.integers(1, 9), d=st.integers(1, 37), dtype=st.sampled_from((torch.float32, torch.float64)),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_paper_nll_problems_match_scipy(B, d, dtype, layout, seed):
    """Whole problems (odd shapes, dtypes, non-contiguous views) against scipy's float64 density by the error
    criterion; the peer is the density written out directly in the same dtype."""
    args = [_layout(t, layout) for t in _ggd_params((B, d), dtype, seed)]
    out = P.ggd_nll(*args, form="paper", **NO_CLAMP)
    mu, a, b, y = args
    direct = -torch.log(b * a / (2 * torch.exp(torch.lgamma(1 / b))) * torch.exp(-((y - mu).abs() * a) ** b))
    check_error_criterion(out, _scipy_nll(*args), direct, name=f"B{B} d{d} {dtype} {layout}")


@pytest.mark.parametrize("form", P.LOSS_FORMS)
def test_nll_gradcheck(form):
    mu, a, b, y = _ggd_params((3, 4), seed=5)
    leaves = [t.clone().requires_grad_() for t in (mu, a, b)]
    # Residual terms inside the clamp range (the clamp's edges are kinks).
    assert torch.autograd.gradcheck(
        lambda m, a_, b_: P.ggd_nll(m, a_, b_, y, form=form, resi_min=1e-8, resi_max=1e8, reduction="none"), leaves)


# ---------------------------------------------------------------------------------------------------------------
# Uncertainty and sampling


def test_aleatoric_uncertainty_is_ggd_variance():
    _, a, b, _ = _ggd_params((64,), seed=6)
    u = P.aleatoric_uncertainty(a, b, alpha_eps=0.0, beta_eps=0.0)
    expected = torch.from_numpy(scipy_stats.gennorm.var(b.numpy(), scale=1 / a.numpy()))
    torch.testing.assert_close(u, expected, rtol=1e-10, atol=0)
    # Computed in log space: Gamma(3 / 0.08) alone overflows float32, the variance (~e^80) does not.
    b32 = torch.full((3,), 0.08)
    u32 = P.aleatoric_uncertainty(torch.ones(3), b32, alpha_eps=0.0, beta_eps=0.0)
    torch.testing.assert_close(u32.double(), torch.full((3,), float(scipy_stats.gennorm.var(0.08)), dtype=torch.float64),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.7), (0.5, 1.0), (2.0, 2.0), (1.3, 5.0)])
def test_sampler_matches_ggd(alpha, beta):
    """Mean, variance (within 5 standard errors from the GGD's fourth moment) and the whole distribution
    (Kolmogorov-Smirnov against scipy's gennorm) of 100k draws with a fixed seed."""
    n = 100_000
    torch.manual_seed(1234)
    mu = torch.tensor(0.25, dtype=torch.float64)
    x = P.sample_ggd(mu, torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), n)
    assert x.shape == (n,)
    var = alpha**2 * math.gamma(3 / beta) / math.gamma(1 / beta)
    m4 = alpha**4 * math.gamma(5 / beta) / math.gamma(1 / beta)
    assert abs(x.mean().item() - 0.25) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * math.sqrt((m4 - var**2) / n)
    ks = scipy_stats.kstest(x.numpy(), scipy_stats.gennorm(beta, loc=0.25, scale=alpha).cdf)
    assert ks.pvalue > 1e-3, ks


def test_sampler_shapes_and_gradients():
    torch.manual_seed(0)
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(4, 1, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.tensor(1.5, dtype=torch.float64)
    assert P.sample_ggd(mu, alpha, beta).shape == (4, 3)

    def draw(m, a):
        torch.manual_seed(7)  # the same draw on every call: the sample is a smooth function of mu and alpha
        return P.sample_ggd(m, a, beta, 5)

    assert torch.autograd.gradcheck(draw, (mu, alpha))


def test_mc_dropout():
    torch.manual_seed(0)
    model = P.ProbVLM(dim=12, hidden_dim=10, p_drop=0.1).double().train()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    img, txt = P.mc_dropout(model, x, y, n_passes=8, dropout_p=0.3)
    assert img.epistemic.shape == (5, 12) and (img.epistemic > 0).any() and (txt.epistemic > 0).any()
    assert model.training and all(m.p == 0.1 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    # Without dropout every pass is the eval forward: no epistemic uncertainty, the means are that forward.
    img0, _ = P.mc_dropout(model, x, None, n_passes=3, dropout_p=0.0)
    model.eval()
    with torch.no_grad():
        ref = model.img_BayesCap(x)
    assert torch.equal(img0.epistemic, torch.zeros_like(x))
    torch.testing.assert_close(img0.mu, ref.mu)
    torch.testing.assert_close(img0.aleatoric, P.aleatoric_uncertainty(ref.one_over_alpha, ref.beta))


def _spearman_ranks(x, y):
    return scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic


def test_aleatoric_uncertainty_learns_the_noise_level():
    """An adapter trained briefly on pairs y = x + s(x) * noise, with a per-sample noise level s known to the test
    (a smooth function of x the adapter must learn), predicts aleatoric uncertainty that ranks with s on held-out
    pairs (Spearman 0.92 here; 100 steps give 0.76)."""
    d, n_train, n_test = 8, 256, 256
    g = torch.Generator().manual_seed(0)
    x = F_normalize(torch.randn(n_train + n_test, d, generator=g))
    w = torch.randn(d, generator=g)
    s = 0.02 + 0.3 * torch.sigmoid(4 * x @ w / w.norm())
    y = x + s[:, None] * torch.randn(x.shape, generator=g)
    torch.manual_seed(0)
    adapter = P.ProbAdapter(d, hidden_dim=32, p_drop=0.0)
    with torch.no_grad():
        # The 1/alpha and beta heads end in a ReLU: a unit that starts dead (half of them, at the default init)
        # never learns, and its alpha = 1 / alpha_eps swamps the per-query mean. A positive bias keeps them alive
        # for a short run.
        adapter.block_alpha[2].bias.fill_(1.0)
        adapter.block_beta[2].bias.fill_(1.0)
    opt = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 200 steps of tiny matmuls: extra threads only wait on each other (20x on a busy box)
    try:
        for _ in range(200):
            opt.zero_grad()
            P.adapter_loss(adapter(x[:n_train]), y[:n_train], T2=1.0).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        out = adapter(x[n_train:])
    u = P.aleatoric_uncertainty(out.one_over_alpha, out.beta).mean(dim=1)
    rho = P.spearman_correlation(u, s[n_train:]).item()
    assert rho == pytest.approx(_spearman_ranks(u, s[n_train:]), abs=1e-9)
    assert rho > 0.8, rho


def F_normalize(t):
    return torch.nn.functional.normalize(t, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Retrieval and calibration


def test_retrieval_similarity_is_cosine():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 2 * 7, generator=g)[:, ::2]
    gal = torch.randn(7, 11, generator=g).T
    torch.testing.assert_close(P.retrieval_similarity(q, gal), F_normalize(q) @ F_normalize(gal).T)


def test_recall_at_k_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.0],   # positive 0: rank 1
                        [0.9, 0.1, 0.5, 0.0],   # positive 2: rank 2
                        [0.9, 0.1, 0.5, 0.0],   # positive 1: rank 3
                        [0.0, 0.3, 0.2, 0.1]])  # positive 1: rank 1
    positives = torch.tensor([0, 2, 1, 1])
    hits = P.retrieval_hits(sim, positives, (1, 2, 3))
    assert hits.tolist() == [[True, True, True], [False, True, True], [False, False, True], [True, True, True]]
    assert P.recall_at_k(sim, positives, (1, 2, 3)).tolist() == [0.5, 0.75, 1.0]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2, 1] = mask[2, 2] = True  # several positives: the best-ranked one counts
    mask[0, 0] = mask[1, 2] = mask[3, 1] = True
    assert P.recall_at_k(sim, mask, 2).tolist() == [1.0]


def test_bins_recall_and_calibration_by_hand():
    u = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    bins = P.uncertainty_bins(u, 3)
    assert bins.tolist() == [1, 0, 2, 1, 2, 0]
    # per-dimension uncertainty is averaged per query
    assert P.uncertainty_bins(u[:, None].expand(6, 4), 3).tolist() == bins.tolist()
    assert P.uncertainty_bins(torch.arange(7.0), 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert P.uncertainty_bins(torch.tensor([0.0, 0.1, 0.49, 0.5, 0.9, 1.0]), 2, mode="width").tolist() == \
        [0, 0, 0, 1, 1, 1]
    hits = torch.tensor([True, True, False, False, False, True])
    recall = P.recall_per_bin(hits, bins, 3)
    assert recall.tolist() == [1.0, 0.5, 0.0]
    m = P.calibration_metrics(u, hits, n_bins=3)
    assert m["recall_per_bin"].tolist() == [1.0, 0.5, 0.0]
    assert m["S"].item() == pytest.approx(-1.0) and m["R2"].item() == pytest.approx(1.0)
    # recall [1, 0, 0.5] on levels [1, 2, 3]: Pearson of ranks -0.5; the line's R^2 = 0.25
    hits2 = torch.tensor([False, True, True, False, False, True])
    m2 = P.calibration_metrics(u, hits2, n_bins=3)
    assert m2["recall_per_bin"].tolist() == [1.0, 0.0, 0.5]
    assert m2["S"].item() == pytest.approx(-0.5) and m2["R2"].item() == pytest.approx(0.25)
    # An empty bin is NaN and left out of S and R^2.
    r = P.recall_per_bin(torch.tensor([True, False]), torch.tensor([0, 2]), 3)
    assert r[0] == 1.0 and math.isnan(r[1]) and r[2] == 0.0


def test_spearman_and_r2_against_scipy_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = x * 0.3 + torch.randn(40, generator=g, dtype=torch.float64)
    assert P.spearman_correlation(x, y).item() == pytest.approx(_spearman_ranks(x, y), abs=1e-12)
    a, b = np.polyfit(x.numpy(), y.numpy(), 1)
    resid = y.numpy() - (a * x.numpy() + b)
    r2 = 1 - (resid**2).sum() / ((y.numpy() - y.numpy().mean()) ** 2).sum()
    assert P.r_squared(x, y).item() == pytest.approx(r2, abs=1e-12)
    assert math.isnan(P.spearman_correlation([1.0, 2.0], [3.0, 3.0]).item())


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_adapter_state_dict_has_official_keys():
    """Module names as the official BayesCap_MLP / BayesCap_for_CLIP, so their checkpoints load."""
    model = P.ProbVLM()
    keys = set(model.state_dict())
    layers = {"mod": (0, 2, 5), "block_mu": (0, 2), "block_alpha": (0, 2), "block_beta": (0, 2)}
    expected = {f"{side}_BayesCap.{block}.{i}.{p}" for side in ("img", "txt") for block, idx in layers.items()
                for i in idx for p in ("weight", "bias")}
    assert keys == expected
    sd = model.img_BayesCap.state_dict()
    assert sd["mod.0.weight"].shape == (256, 512) and sd["mod.5.weight"].shape == (512, 256)
    assert sd["block_alpha.2.weight"].shape == (512, 512)


def test_heads_nonnegative_and_residual():
    torch.manual_seed(0)
    adapter = P.ProbAdapter(8, 6).eval()
    x = torch.randn(4, 8)
    out = adapter(x)
    assert (out.one_over_alpha >= 0).all() and (out.beta >= 0).all()
    h = adapter.mod(x) + x
    torch.testing.assert_close(out.mu, adapter.block_mu(h))


def _tiny_clip():
    torch.manual_seed(0)
    return pyvl.models.CLIP(16, dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                            dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1))


def test_gradients_reach_only_the_adapters():
    clip = _tiny_clip()
    model = P.ProbVLM(clip, hidden_dim=12)
    model.train()
    assert not clip.training and model.img_BayesCap.training
    images = torch.randn(3, 3, 16, 16)
    text = torch.randint(1, 49, (3, 8))
    text[:, 5] = 49  # EOT (the largest id)
    img_f, txt_f = model.embed(images, text)
    assert img_f.shape == (3, 16) and not img_f.requires_grad
    torch.testing.assert_close(img_f.norm(dim=1), torch.ones(3))
    loss = P.probvlm_loss(*model(img_f, txt_f), img_f, txt_f)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    for adapter in (model.img_BayesCap, model.txt_BayesCap):
        assert adapter.mod[0].weight.grad is not None and adapter.mod[0].weight.grad.abs().sum() > 0


def test_probvlm_loss_combination():
    """intra-modal terms plus lambda times the cross-modal ones, as the official train_ProbVLM."""
    torch.manual_seed(0)
    model = P.ProbVLM(dim=6, hidden_dim=5).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    img, txt = model(x, y)
    kw = dict(T1=0.7, T2=0.3)
    total = P.probvlm_loss(img, txt, x, y, cross_modal_lambda=0.25, **kw)
    parts = [P.adapter_loss(img, x, **kw), P.adapter_loss(txt, y, **kw), P.adapter_loss(img, y, **kw),
             P.adapter_loss(txt, x, **kw)]
    torch.testing.assert_close(total, parts[0] + parts[1] + 0.25 * (parts[2] + parts[3]))
    l1 = (img.mu - x).abs().mean()
    torch.testing.assert_close(parts[0], 0.7 * l1 + 0.3 * P.ggd_nll(*img, x))


def test_probvlm_loss_gradcheck_parameters():
    torch.manual_seed(0)
    model = P.ProbVLM(dim=4, hidden_dim=3).double().eval()  # eval: dropout would make the loss random
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    names = ["img_BayesCap.block_alpha.2.bias", "img_BayesCap.block_beta.2.bias", "txt_BayesCap.block_mu.2.weight",
             "txt_BayesCap.mod.0.weight"]
    params = dict(model.named_parameters())
    # 1/alpha and beta heads away from the ReLU kink, so finite differences see one side.
    with torch.no_grad():
        for side in ("img", "txt"):
            for head in ("alpha", "beta"):
                params[f"{side}_BayesCap.block_{head}.2.bias"].add_(3.0)

    def loss(*tensors):
        out = torch.func.functional_call(model, {**params, **dict(zip(names, tensors))}, (x, y))
        return P.probvlm_loss(*out, x, y, cross_modal_lambda=0.5, T2=1.0, resi_min=1e-8, resi_max=1e8)

    assert torch.autograd.gradcheck(loss, [params[n].detach().clone().requires_grad_() for n in names])


def test_torch_compile_fullgraph_training_step():
    torch.manual_seed(0)
    model = P.ProbVLM(dim=10, hidden_dim=7, p_drop=0.0)
    x, y = torch.randn(5, 10), torch.randn(5, 10)

    def step(x, y):
        img, txt = model(x, y)
        return P.probvlm_loss(img, txt, x, y), P.retrieval_similarity(img.mu, txt.mu)

    loss, sim = step(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # aot_eager: the whole capture, forward and backward, without inductor's code generation (minutes here).
    c_loss, c_sim = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    c_grads = torch.autograd.grad(c_loss, list(model.parameters()))
    torch.testing.assert_close(c_loss, loss)
    torch.testing.assert_close(c_sim, sim)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b)


def test_bad_input():
    with pytest.raises(ValueError, match="dim"):
        P.ProbAdapter(0)
    with pytest.raises(ValueError, match="p_drop"):
        P.ProbAdapter(4, 4, p_drop=1.5)
    with pytest.raises(TypeError, match="hidden_dim"):
        P.ProbAdapter(4, 4.0)
    with pytest.raises(ValueError, match="x must have 4"):
        P.ProbAdapter(4, 3)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be a floating"):
        P.ProbAdapter(4, 3)(torch.ones(2, 4, dtype=torch.long))
    t = torch.randn(3)
    with pytest.raises(ValueError, match="form"):
        P.ggd_nll(t, t, t, t, form="power")
    with pytest.raises(ValueError, match="reduction"):
        P.ggd_nll(t, t, t, t, reduction="max")
    with pytest.raises(ValueError, match="broadcast"):
        P.ggd_nll(t, t, t, torch.randn(4))
    with pytest.raises(ValueError, match="no CLIP"):
        P.ProbVLM(dim=4).embed(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="embed_dim"):
        P.ProbVLM(_tiny_clip(), dim=32)
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match="exceeds the gallery"):
        P.recall_at_k(sim, torch.tensor([0, 1, 2]), 5)
    with pytest.raises(TypeError, match="positives"):
        P.recall_at_k(sim, torch.tensor([0.0, 1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="lie in"):
        P.recall_at_k(sim, torch.tensor([0, 1, 4]), 1)
    with pytest.raises(ValueError, match="mode"):
        P.uncertainty_bins(torch.rand(5), 2, mode="quantile")
    with pytest.raises(ValueError, match="paired"):
        P.probvlm_loss(None, None, torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="ProbVLM"):
        P.mc_dropout(P.ProbAdapter(4, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="n must be positive"):
        P.sample_ggd(t, t.abs(), t.abs(), 0)


def test_bench_case_peers_compute_the_same_step():
    """`pyvl bench`'s probvlm_step: pyvl's and the plain-PyTorch step do the same arithmetic (same similarity)."""
    from pyvl._bench_probvlm import probvlm_cases

    (case,) = probvlm_cases("tiny", "cpu", ("probvlm_step",))
    built = case.build(torch.device("cpu"), torch.float32, None)
    (peer,) = built.peers.values()
    for seed in range(2):  # two steps: the Adam updates agree too; one seed per step gives both one dropout mask
        torch.manual_seed(seed)
        ours = built.pyvl()
        torch.manual_seed(seed)
        theirs = peer()
        torch.testing.assert_close(ours, theirs)
    assert ours.shape == (8, 8)


@given(Q=st.integers(1, 40), G=st.integers(1, 30), n_bins=st.integers(1, 7), multi=st.booleans(),
       mode=st.sampled_from(("count", "width")), seed=st.integers(0, 2**16))
def test_retrieval_and_calibration_problems(Q, G, n_bins, multi, mode, seed):
    """Random retrieval problems against a direct NumPy / SciPy evaluation: Recall@K (one or several positives per
    query), the bins (a partition ordered by uncertainty, equal counts or equal widths), recall per bin, S and R^2."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(Q, G, generator=g, dtype=torch.float64)
    if multi:
        positives = torch.rand(Q, G, generator=g) < 0.2
        pos_sets = [set(np.flatnonzero(row.numpy())) for row in positives]
    else:
        positives = torch.randint(0, G, (Q,), generator=g)
        pos_sets = [{int(p)} for p in positives]
    ks = sorted({1, max(1, G // 2), G})
    hits = P.retrieval_hits(sim, positives, ks)
    order = np.argsort(-sim.numpy(), axis=1, kind="stable")
    expected = [[bool(pos_sets[q] & set(order[q, :k])) for k in ks] for q in range(Q)]
    assert hits.tolist() == expected
    u = torch.rand(Q, 3, generator=g, dtype=torch.float64)
    bins = P.uncertainty_bins(u, n_bins, mode)
    level = u.mean(1)
    assert bins.min() >= 0 and bins.max() < n_bins
    for b in range(n_bins - 1):  # every query of a bin is at most as uncertain as every query of a later bin
        lower, upper = level[bins <= b], level[bins > b]
        if len(lower) and len(upper):
            assert lower.max() <= upper.min()
    if mode == "count":
        counts = torch.bincount(bins, minlength=n_bins)
        assert counts.max() - counts.min() <= 1
    recall = P.recall_per_bin(hits[:, 0], bins, n_bins)
    for b in range(n_bins):
        members = hits[bins == b, 0]
        if len(members):
            assert recall[b].item() == pytest.approx(members.double().mean().item())
        else:
            assert math.isnan(recall[b])
    m = P.calibration_metrics(u, hits[:, 0], n_bins, mode)
    lv = np.arange(1, n_bins + 1)[np.isfinite(recall.numpy())]
    rv = recall.numpy()[np.isfinite(recall.numpy())]
    if len(lv) >= 2 and rv.std() > 0:
        assert m["S"].item() == pytest.approx(scipy_stats.spearmanr(lv, rv).statistic, abs=1e-12)
        assert m["R2"].item() == pytest.approx(scipy_stats.linregress(lv, rv).rvalue ** 2, abs=1e-12)
    else:
        assert math.isnan(m["S"]) and math.isnan(m["R2"])


@given(B=st.integers(1, 6), d=st.integers(1, 13), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_adapter_non_contiguous_inputs(B, d, layout, seed):
    torch.manual_seed(seed)
    adapter = P.ProbAdapter(d, 5).eval()
    x = torch.randn(B, d)
    view = _layout(x, layout)
    for got, want in zip(adapter(view), adapter(x)):
        torch.testing.assert_close(got, want)


def test_retrieval_calibration_composes_the_parts():
    torch.manual_seed(0)
    model = P.ProbVLM(dim=6, hidden_dim=5).double()
    g = torch.Generator().manual_seed(1)
    img = F_normalize(torch.randn(23, 6, generator=g, dtype=torch.float64))
    txt = F_normalize(img + 0.5 * torch.randn(23, 6, generator=g, dtype=torch.float64))
    torch.manual_seed(5)
    res = P.retrieval_calibration(model, img, txt, ks=(1, 3), n_bins=4, n_passes=4, dropout_p=0.2)
    torch.manual_seed(5)
    u_img, u_txt = P.mc_dropout(model, img, txt, n_passes=4, dropout_p=0.2)
    for name, q, gal, u in (("i2t", img, txt, u_img), ("t2i", txt, img, u_txt)):
        hits = P.retrieval_hits(F_normalize(q) @ F_normalize(gal).T, torch.arange(23), (1, 3))
        level = (u.aleatoric + u.epistemic).mean(1)
        torch.testing.assert_close(res[name]["uncertainty"], level)
        torch.testing.assert_close(res[name]["recall"], hits.double().mean(0))
        for j, m in enumerate(res[name]["calibration"]):
            ref = P.calibration_metrics(level, hits[:, j], 4)
            torch.testing.assert_close(m["recall_per_bin"], ref["recall_per_bin"], equal_nan=True)
            assert (math.isnan(m["S"]) and math.isnan(ref["S"])) or m["S"] == ref["S"]
