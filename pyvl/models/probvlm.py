"""ProbVLM: Upadhyay, Karthik, Mancini, Akata, "ProbVLM: Probabilistic Adapter for Frozen Vision-Language Models",
ICCV 2023, arXiv:2307.00398. Official code: github.com/ExplainableML/ProbVLM (src/networks.py, src/losses.py,
src/train_probVLM.py, src/utils.py, src/train_ProbVLM_CLIP.ipynb).

A probabilistic adapter per modality sits on top of a frozen vision-language model (here pyvl's CLIP, or
precomputed embeddings) and predicts, for every embedding dimension, a generalized Gaussian (GGD)

    p(y | mu, alpha, beta) = beta / (2 alpha Gamma(1/beta)) * exp(-(|y - mu| / alpha)^beta)

whose parameters come from three heads on a shared trunk (official `BayesCap_MLP`, kept here as `ProbAdapter` with
the same module names, so the official `BayesCap_for_CLIP` state_dicts load with load_state_dict):

- trunk `mod`: Linear(d, hidden) - ReLU - Linear(hidden, hidden) - ReLU - Dropout(p) - Linear(hidden, d), plus the
  residual input (x + mod(x)); the official class builds this 3-layer pattern for num_layers=3, the only value its
  models use.
- `block_mu`: Linear(d, d) - ReLU - Linear(d, d) (no output activation).
- `block_alpha`: Linear(d, d) - ReLU - Linear(d, d) - ReLU. It predicts 1/alpha, not alpha.
- `block_beta`: Linear(d, d) - ReLU - Linear(d, d) - ReLU. ReLU (not softplus): beta may be exactly 0, which the
  loss's beta_eps (1e-4) guards.

Defaults follow the official code's `BayesCap_for_CLIP`: d = 512, hidden 256, dropout 0.1 (the CUB notebook uses
0.05; BayesCLIP 512 / 0.3).

Losses (`ggd_nll`, `adapter_loss`, `probvlm_loss`):

- The paper (eq. 4) writes the negative log-likelihood with the power `(|mu - y| / alpha)^beta`:
      form="paper":  (|mu - y| / alpha)^beta - log(1/alpha) - log(beta) + lgamma(1/beta) + log 2
  which is the exact GGD NLL (scipy.stats.gennorm.logpdf(y, beta, mu, alpha) negated; tests check this).
- The official code (losses.py `GenGaussLoss`; the power line is commented out there) uses a product instead:
      form="code":   clamp(|mu - y| * (1/alpha) * beta, resi_min, resi_max) - log(1/alpha) - log(beta) + lgamma(1/beta)
  with 1/alpha + alpha_eps and beta + beta_eps (eps 1e-4) and the clamp [1e-4, 1e3] (the "resolution" trick: the
  residual term neither vanishes nor explodes). It equals the paper's form (less log 2, inside the clamp) only at
  beta = 1; for other beta it is not a normalized density, but it is what the released models were trained with.
  **pyvl's default is form="code"**, to reproduce the official training; form="paper" gives the true NLL (clamped
  the same way unless resi_min / resi_max are None).
- `adapter_loss` is the code's `TempCombLoss`: T1 * L1(mu, y) + T2 * GGD-NLL, T1 = 1, T2 = 5e-2 (train_probVLM.py's
  defaults; the CUB notebook passes T2 = 1e-4). The paper does not mention the L1 term.
- `probvlm_loss` combines them as train_ProbVLM does: L(img -> img) + L(txt -> txt) + lambda_cross * (L(img mu ->
  txt embedding) + L(txt mu -> img embedding)), lambda_cross = 1e-4, targets are the frozen model's embeddings
  (computed without gradient), and the predictions are not detached in the cross-modal terms. The paper's
  cross-modal likelihood (section 3.2) is a convolution of two GGDs, whose density it approximates; the code
  uses the same GGD loss across modalities, and so does pyvl.

Uncertainty (`aleatoric_uncertainty`, `mc_dropout`):

- aleatoric: the GGD variance alpha^2 Gamma(3/beta) / Gamma(1/beta), per dimension (paper, eq. 6). The official
  `get_GGuncer` clips 1/alpha to [1e-4, 5] and beta + 0.1 to [0.1, 5] and divides by Gamma(2.8/beta) (its c2
  argument) instead of Gamma(1/beta); pyvl computes the variance as written in the paper, with the loss's eps.
- epistemic: the variance of mu over `n_passes` forward passes with the dropout layers sampling (MC dropout; the
  official multi_fwpass_ProbVLM uses 15 passes and forces the dropout probability to 0.3, pyvl's `dropout_p`).
  pyvl restores the modules' train/eval modes and dropout probabilities afterwards (the official code does not).
  The official multi_fwpass_ProbVLM returns sqrt(var(aleatoric) * var(mu)) over the passes as its epistemic figure;
  pyvl returns var(mu), the paper's definition (section 3.3).

Retrieval and calibration (`retrieval_hits`, `recall_at_k`, `uncertainty_bins`, `recall_per_bin`,
`spearman_correlation`, `r_squared`, `calibration_metrics`): queries are ranked against a gallery by cosine
similarity from pyvl.ops.similarity_logits, split into bins by their (per-query mean) uncertainty, Recall@K is
computed per bin, and the paper's calibration figures are the Spearman rank correlation S between the uncertainty
level (bin index, lowest uncertainty first) and the recall of that bin, and the R^2 of a least-squares line through
the same points. A well-calibrated model has recall falling with uncertainty: S near -1. Bins partition the
queries (equal counts by default, or equal widths of the uncertainty range); the official create_uncer_bins_*
helpers differ (equal spacing puts a query into every bin whose upper edge it is under). `retrieval_calibration`
runs both directions (image -> text, text -> image) for paired embeddings: ranking by the frozen embeddings, binning
by the mean of aleatoric + epistemic uncertainty (the official code's sum), per K.

Sampling (`sample_ggd`): |x - mu| / alpha = G^(1/beta) with G ~ Gamma(1/beta, 1) and a random sign, which is
exactly a GGD draw; it is reparameterized (torch's Gamma rsample), so gradients reach mu, alpha and beta.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProbAdapter", "ProbVLM", "ProbOutput", "Uncertainty", "ggd_nll", "adapter_loss", "probvlm_loss",
           "aleatoric_uncertainty", "ggd_variance", "sample_ggd", "mc_dropout", "retrieval_similarity",
           "retrieval_hits", "recall_at_k", "uncertainty_bins", "recall_per_bin", "spearman_correlation",
           "r_squared", "calibration_metrics", "retrieval_calibration"]

ALPHA_EPS = 1e-4
BETA_EPS = 1e-4
RESI_MIN = 1e-4
RESI_MAX = 1e3
LOSS_FORMS = ("code", "paper")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _probability(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _float_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _features(t, name, dim=None):
    _float_tensor(t, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [batch, dim], got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} features (the adapter's dim), got {t.shape[1]}")


# ----------------------------------------------------------------------------------------------------------------
# The adapters


class ProbOutput(NamedTuple):
    """One adapter's prediction: the GGD's mu, 1/alpha (>= 0) and beta (>= 0), each shaped like its input."""

    mu: torch.Tensor
    one_over_alpha: torch.Tensor
    beta: torch.Tensor


class ProbAdapter(nn.Module):
    """The official BayesCap_MLP with num_layers=3: a residual MLP trunk and the heads mu, 1/alpha, beta.

    Args:
        dim: the embedding width (input = output, for the residual connection).
        hidden_dim: the trunk's hidden width (official BayesCap_for_CLIP: 256).
        p_drop: dropout after the trunk's second layer (official default 0.1); MC dropout samples it.
    """

    def __init__(self, dim: int = 512, hidden_dim: int = 256, p_drop: float = 0.1):
        super().__init__()
        _positive_int(dim, "dim")
        _positive_int(hidden_dim, "hidden_dim")
        _probability(p_drop, "p_drop")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.mod = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Dropout(p_drop), nn.Linear(hidden_dim, dim))
        self.block_mu = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.block_alpha = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.block_beta = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> ProbOutput:
        """[batch, dim] embeddings -> ProbOutput(mu, 1/alpha, beta), each [batch, dim]."""
        _features(x, "x", self.dim)
        h = self.mod(x) + x
        return ProbOutput(self.block_mu(h), self.block_alpha(h), self.block_beta(h))


class ProbVLM(nn.Module):
    """Two ProbAdapters (image, text) on a frozen vision-language model's embeddings.

    Args:
        clip: an optional pyvl CLIP (pyvl.models.CLIP) whose encoders give the embeddings; it is frozen
            (requires_grad False) and kept in eval mode whatever `train()` is called with. None: the model takes
            precomputed embeddings only.
        dim: the embedding width; defaults to clip.embed_dim, else 512.
        hidden_dim, p_drop: each adapter's (see ProbAdapter).
        normalize: L2-normalize CLIP's embeddings before the adapters (what CLIP's retrieval uses).

    Module names follow the official BayesCap_for_CLIP (`img_BayesCap`, `txt_BayesCap`); the CLIP model, when
    given, is `clip_model` as in the official BayesCLIP.
    """

    def __init__(self, clip: nn.Module | None = None, dim: int | None = None, hidden_dim: int = 256,
                 p_drop: float = 0.1, normalize: bool = True):
        super().__init__()
        if clip is not None and not isinstance(clip, nn.Module):
            raise TypeError(f"clip must be a pyvl CLIP module or None, got {type(clip).__name__}")
        if dim is None:
            dim = int(getattr(clip, "embed_dim", 512))
        elif clip is not None and getattr(clip, "embed_dim", dim) != dim:
            raise ValueError(f"dim {dim} differs from clip.embed_dim {clip.embed_dim}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self.normalize = normalize
        self.img_BayesCap = ProbAdapter(dim, hidden_dim, p_drop)
        self.txt_BayesCap = ProbAdapter(dim, hidden_dim, p_drop)
        self.clip_model = clip
        if clip is not None:
            clip.requires_grad_(False)
            clip.eval()

    @property
    def dim(self) -> int:
        return self.img_BayesCap.dim

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clip_model is not None:
            self.clip_model.eval()  # frozen: its dropout / norms never switch to training behaviour
        return self

    @torch.no_grad()
    def embed(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """The frozen CLIP's (image, text) embeddings, without gradient (either may be None)."""
        if self.clip_model is None:
            raise ValueError("this ProbVLM has no CLIP model: pass embeddings to forward() instead")
        img = None if image is None else self.clip_model.encode_image(image, normalize=self.normalize)
        txt = None if text is None else self.clip_model.encode_text(text, normalize=self.normalize)
        return img, txt

    def forward(self, image_features: torch.Tensor | None = None, text_features: torch.Tensor | None = None):
        """(image ProbOutput, text ProbOutput) for [batch, dim] embeddings (either may be None; its output is
        None). Use `embed` first to go from images / token ids through the frozen CLIP."""
        img = None if image_features is None else self.img_BayesCap(image_features)
        txt = None if text_features is None else self.txt_BayesCap(text_features)
        return img, txt


# ----------------------------------------------------------------------------------------------------------------
# Losses


def _check_ggd(mu, one_over_alpha, beta, target):
    for name, t in (("mu", mu), ("one_over_alpha", one_over_alpha), ("beta", beta), ("target", target)):
        _float_tensor(t, name)
    try:
        torch.broadcast_shapes(mu.shape, one_over_alpha.shape, beta.shape, target.shape)
    except RuntimeError:
        raise ValueError(f"mu {tuple(mu.shape)}, one_over_alpha {tuple(one_over_alpha.shape)}, beta "
                         f"{tuple(beta.shape)} and target {tuple(target.shape)} must broadcast") from None


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def ggd_nll(mu: torch.Tensor, one_over_alpha: torch.Tensor, beta: torch.Tensor, target: torch.Tensor, *,
            form: str = "code", alpha_eps: float = ALPHA_EPS, beta_eps: float = BETA_EPS,
            resi_min: float | None = RESI_MIN, resi_max: float | None = RESI_MAX,
            reduction: str = "mean") -> torch.Tensor:
    """The generalized-Gaussian negative log-likelihood of `target` (the official GenGaussLoss for form="code").

    form="code":  clamp(|mu - y| * a * b, resi_min, resi_max) - log a - log b + lgamma(1/b)
    form="paper": clamp((|mu - y| * a)^b, resi_min, resi_max) - log a - log b + lgamma(1/b) + log 2  (the exact NLL)
    with a = one_over_alpha + alpha_eps, b = beta + beta_eps. resi_min / resi_max None: no clamp on that side.
    reduction: "mean" (default), "sum" or "none".
    """
    _check_ggd(mu, one_over_alpha, beta, target)
    if form not in LOSS_FORMS:
        raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, v in (("alpha_eps", alpha_eps), ("beta_eps", beta_eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name} must be a non-negative float, got {v!r}")
    a = one_over_alpha + alpha_eps
    b = beta + beta_eps
    scaled = (mu - target).abs() * a
    if form == "code":
        resi = scaled * b
    else:
        # (r a)^b through exp(b log(r a)): finite gradients at r = 0 for b < 1, where pow's derivative is infinite.
        resi = torch.exp(b * torch.log(scaled.clamp_min(torch.finfo(scaled.dtype).tiny)))
    if resi_min is not None or resi_max is not None:
        resi = resi.clamp(min=resi_min, max=resi_max)
    loss = resi - torch.log(a) - torch.log(b) + torch.lgamma(1.0 / b)
    if form == "paper":
        loss = loss + math.log(2.0)
    return _reduce(loss, reduction)


def adapter_loss(pred: ProbOutput, target: torch.Tensor, *, T1: float = 1.0, T2: float = 5e-2, form: str = "code",
                 **nll_kwargs) -> torch.Tensor:
    """The official TempCombLoss: T1 * mean|mu - target| + T2 * ggd_nll(..., reduction="mean")."""
    mu, one_over_alpha, beta = pred
    nll = ggd_nll(mu, one_over_alpha, beta, target, form=form, reduction="mean", **nll_kwargs)
    return T1 * F.l1_loss(mu, target.to(mu.dtype)) + T2 * nll


def probvlm_loss(image: ProbOutput, text: ProbOutput, image_features: torch.Tensor, text_features: torch.Tensor, *,
                 cross_modal_lambda: float = 1e-4, T1: float = 1.0, T2: float = 5e-2, form: str = "code",
                 **nll_kwargs) -> torch.Tensor:
    """ProbVLM's training objective as train_ProbVLM computes it:

        L(img -> img) + L(txt -> txt) + cross_modal_lambda * (L(img mu -> txt features) + L(txt mu -> img features))

    with L = adapter_loss (T1, T2, form). The target embeddings are detached (a frozen encoder's output); the
    predictions are not, in any term.
    """
    _features(image_features, "image_features")
    _features(text_features, "text_features")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must be paired (same shape)")
    yi, yt = image_features.detach(), text_features.detach()
    kw = dict(T1=T1, T2=T2, form=form, **nll_kwargs)
    intra = adapter_loss(image, yi, **kw) + adapter_loss(text, yt, **kw)
    if cross_modal_lambda == 0:
        return intra
    return intra + cross_modal_lambda * (adapter_loss(image, yt, **kw) + adapter_loss(text, yi, **kw))


# ----------------------------------------------------------------------------------------------------------------
# Uncertainty and sampling


def ggd_variance(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The variance of a GGD with scale alpha and shape beta: alpha^2 Gamma(3/beta) / Gamma(1/beta)."""
    _float_tensor(alpha, "alpha")
    _float_tensor(beta, "beta")
    # In log space: Gamma(3/beta) alone overflows float32 for beta < ~0.09.
    return torch.exp(2 * torch.log(alpha) + torch.lgamma(3.0 / beta) - torch.lgamma(1.0 / beta))


def aleatoric_uncertainty(one_over_alpha: torch.Tensor, beta: torch.Tensor, *, alpha_eps: float = ALPHA_EPS,
                          beta_eps: float = BETA_EPS) -> torch.Tensor:
    """Per-dimension aleatoric uncertainty of an adapter's prediction: the GGD variance at
    alpha = 1 / (one_over_alpha + alpha_eps), beta + beta_eps (the loss's eps, so 0 outputs stay finite)."""
    _float_tensor(one_over_alpha, "one_over_alpha")
    _float_tensor(beta, "beta")
    return ggd_variance(1.0 / (one_over_alpha + alpha_eps), beta + beta_eps)


def sample_ggd(mu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Draws from GGD(mu, alpha, beta) (broadcast together), reparameterized: gradients reach mu, alpha, beta.

    n: None for one draw shaped like the broadcast parameters, else n draws stacked in a new leading dim.
    Uses torch's global generator (torch.manual_seed makes it reproducible), as torch.distributions does.
    """
    for name, t in (("mu", mu), ("alpha", alpha), ("beta", beta)):
        _float_tensor(t, name)
    if n is not None:
        _positive_int(n, "n")
    try:
        shape = torch.broadcast_shapes(mu.shape, alpha.shape, beta.shape)
    except RuntimeError:
        raise ValueError(f"mu {tuple(mu.shape)}, alpha {tuple(alpha.shape)} and beta {tuple(beta.shape)} must "
                         "broadcast") from None
    if n is not None:
        shape = (n, *shape)
    concentration = (1.0 / beta).expand(shape)
    g = torch.distributions.Gamma(concentration, torch.ones_like(concentration)).rsample()
    # |x - mu| / alpha = G^(1/beta): P(|x-mu|/alpha > t) = P(G > t^beta) = Gamma(1/beta, t^beta) / Gamma(1/beta),
    # which is the GGD's tail; the sign is a fair coin.
    magnitude = torch.exp(torch.log(g) / beta)
    sign = torch.randint(0, 2, shape, device=mu.device).to(mu.dtype) * 2 - 1
    return mu + alpha * sign * magnitude


class Uncertainty(NamedTuple):
    """One modality's MC-dropout summary, each [batch, dim]: the means over passes of mu, 1/alpha and beta, the
    aleatoric uncertainty at those means, and the epistemic uncertainty (variance of mu over passes)."""

    mu: torch.Tensor
    one_over_alpha: torch.Tensor
    beta: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


def _summary(outs: list[ProbOutput]) -> Uncertainty:
    mu = torch.stack([o.mu for o in outs])
    a = torch.stack([o.one_over_alpha for o in outs]).mean(0)
    b = torch.stack([o.beta for o in outs]).mean(0)
    epistemic = mu.var(0) if len(outs) > 1 else torch.zeros_like(mu[0])
    return Uncertainty(mu.mean(0), a, b, aleatoric_uncertainty(a, b), epistemic)


@torch.no_grad()
def mc_dropout(model: ProbVLM, image_features: torch.Tensor | None = None,
               text_features: torch.Tensor | None = None, *, n_passes: int = 15, dropout_p: float | None = None):
    """(image Uncertainty, text Uncertainty) from n_passes forward passes with only the dropout layers sampling.

    dropout_p: the dropout probability during the passes (official: 0.3); None keeps the adapters' own. The
    model's modes and dropout probabilities are restored afterwards.
    """
    if not isinstance(model, ProbVLM):
        raise TypeError(f"model must be a ProbVLM, got {type(model).__name__}")
    _positive_int(n_passes, "n_passes")
    if dropout_p is not None:
        _probability(dropout_p, "dropout_p")
    modes = {m: m.training for m in model.modules()}
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    probs = [m.p for m in drops]
    try:
        model.eval()
        for m in drops:
            m.train()
            if dropout_p is not None:
                m.p = dropout_p
        outs = [model(image_features, text_features) for _ in range(n_passes)]
    finally:
        for m, p in zip(drops, probs):
            m.p = p
        for m, mode in modes.items():
            m.training = mode
    img = None if image_features is None else _summary([o[0] for o in outs])
    txt = None if text_features is None else _summary([o[1] for o in outs])
    return img, txt


# ----------------------------------------------------------------------------------------------------------------
# Retrieval and calibration


def retrieval_similarity(queries: torch.Tensor, gallery: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Cosine similarity [Q, G] of queries [Q, d] against a gallery [G, d], by pyvl.ops.similarity_logits."""
    from pyvl.ops import similarity_logits

    _features(queries, "queries")
    _features(gallery, "gallery", queries.shape[1])
    return similarity_logits(queries, gallery, 1.0, backend=backend)


def _ks(ks, n_gallery):
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one K")
    for k in ks:
        _positive_int(k, "each K in ks")
        if k > n_gallery:
            raise ValueError(f"K = {k} exceeds the gallery size {n_gallery}")
    return ks


def retrieval_hits(similarity: torch.Tensor, positives: torch.Tensor, ks: int | Sequence[int] = (1, 5, 10)):
    """[Q, len(ks)] bool: whether query q has a positive among its top-K gallery items, for each K.

    similarity: [Q, G] scores (higher is better). positives: a [Q] integer tensor (the one correct gallery index per
    query) or a [Q, G] bool mask (several correct items, as COCO's five captions per image). Ties in the scores are
    broken by torch.topk.
    """
    _float_tensor(similarity, "similarity")
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [queries, gallery], got shape {tuple(similarity.shape)}")
    Q, G = similarity.shape
    if not isinstance(positives, torch.Tensor):
        raise TypeError(f"positives must be a tensor, got {type(positives).__name__}")
    if positives.dtype == torch.bool:
        if positives.shape != similarity.shape:
            raise ValueError(f"a bool positives mask must be [Q, G] = {(Q, G)}, got {tuple(positives.shape)}")
        mask = positives
    elif not positives.is_floating_point() and not positives.is_complex():
        if positives.shape != (Q,):
            raise ValueError(f"positives indices must be [Q] = [{Q}], got {tuple(positives.shape)}")
        if Q and (positives.min() < 0 or positives.max() >= G):
            raise ValueError(f"positives indices must lie in [0, {G}), got range "
                             f"[{int(positives.min())}, {int(positives.max())}]")
        mask = F.one_hot(positives.long(), G).bool()
    else:
        raise TypeError(f"positives must be an integer index tensor or a bool mask, got {positives.dtype}")
    ks = _ks(ks, G)
    top = similarity.topk(max(ks), dim=1).indices
    found = mask.gather(1, top)  # [Q, maxK]: is the item ranked j a positive
    return torch.stack([found[:, :k].any(dim=1) for k in ks], dim=1)


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: int | Sequence[int] = (1, 5, 10)):
    """Recall@K for each K (a [len(ks)] float tensor): the fraction of queries with a positive in their top K."""
    return retrieval_hits(similarity, positives, ks).double().mean(dim=0)


def _per_query(uncertainty):
    _float_tensor(uncertainty, "uncertainty")
    if uncertainty.dim() == 2:  # per-dimension uncertainty: a query's level is its mean over dimensions
        uncertainty = uncertainty.mean(dim=1)
    if uncertainty.dim() != 1:
        raise ValueError(f"uncertainty must be [Q] or [Q, dim], got shape {tuple(uncertainty.shape)}")
    return uncertainty


def uncertainty_bins(uncertainty: torch.Tensor, n_bins: int = 10, mode: str = "count") -> torch.Tensor:
    """The bin (0 = least uncertain) of each query: a [Q] int64 tensor.

    uncertainty: [Q], or [Q, dim] (averaged over dim). mode "count": equal-count bins by rank (sizes differ by at
    most one; ties broken by query order); "width": n_bins equal widths of [min, max] (the maximum goes in the last).
    """
    u = _per_query(uncertainty)
    _positive_int(n_bins, "n_bins")
    Q = u.shape[0]
    if mode == "count":
        order = torch.sort(u, stable=True).indices
        bins = torch.empty(Q, dtype=torch.int64, device=u.device)
        bins[order] = torch.arange(Q, device=u.device) * n_bins // max(Q, 1)
        return bins
    if mode == "width":
        lo, hi = u.min(), u.max()
        if Q == 0 or hi == lo:
            return torch.zeros(Q, dtype=torch.int64, device=u.device)
        return ((u - lo) / (hi - lo) * n_bins).floor().clamp(max=n_bins - 1).long()
    raise ValueError(f"mode must be 'count' or 'width', got {mode!r}")


def recall_per_bin(hits: torch.Tensor, bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """[n_bins] float64: the fraction of hits among the queries of each bin (NaN for an empty bin).

    hits: [Q] bool (one K, e.g. retrieval_hits(...)[:, 0]); bins: [Q] from uncertainty_bins.
    """
    if not isinstance(hits, torch.Tensor) or hits.dtype != torch.bool or hits.dim() != 1:
        raise TypeError("hits must be a [Q] bool tensor")
    if not isinstance(bins, torch.Tensor) or bins.dtype != torch.int64 or bins.shape != hits.shape:
        raise TypeError(f"bins must be a [Q] = {tuple(hits.shape)} int64 tensor")
    _positive_int(n_bins, "n_bins")
    if bins.numel() and (bins.min() < 0 or bins.max() >= n_bins):
        raise ValueError(f"bins must lie in [0, {n_bins})")
    count = torch.bincount(bins, minlength=n_bins).double()
    hit = torch.bincount(bins, weights=hits.double(), minlength=n_bins)
    return torch.where(count > 0, hit / count.clamp_min(1), torch.full_like(count, float("nan")))


def _ranks(x):
    """Average ranks (1-based; tied values share the mean of their ranks), as scipy.stats.rankdata."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    n = x.shape[0]
    new_group = torch.ones(n, dtype=torch.bool, device=x.device)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    n_groups = int(group[-1]) + 1
    mean_rank = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(0, group, positions)
    mean_rank = mean_rank / torch.bincount(group, minlength=n_groups).double()
    ranks = torch.empty(n, dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[group]
    return ranks


def _pair_1d(x, y):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    y = y.to(x.device)
    if x.dim() != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    keep = torch.isfinite(x) & torch.isfinite(y)  # empty bins (NaN recall) do not count
    return x[keep], y[keep]


def _pearson(x, y):
    if x.shape[0] < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = (xc.square().sum() * yc.square().sum()).sqrt()
    return (xc * yc).sum() / denom if denom > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def spearman_correlation(x, y) -> torch.Tensor:
    """Spearman's rank correlation of two 1-D sequences (pairs with a non-finite value are dropped; NaN when fewer
    than 2 pairs remain or either side is constant): the Pearson correlation of their average ranks."""
    x, y = _pair_1d(x, y)
    if x.shape[0] < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return _pearson(_ranks(x), _ranks(y))


def r_squared(x, y) -> torch.Tensor:
    """R^2 of the least-squares line y = a x + b (1 - SS_res / SS_tot, which for one regressor with an intercept
    is the squared Pearson correlation); non-finite pairs are dropped."""
    x, y = _pair_1d(x, y)
    return _pearson(x, y).square()


def calibration_metrics(uncertainty: torch.Tensor, hits: torch.Tensor, n_bins: int = 10, mode: str = "count"):
    """The paper's calibration figures for one retrieval direction and one K.

    uncertainty: [Q] or [Q, dim] per-query uncertainty; hits: [Q] bool (a column of retrieval_hits). Returns a dict
    with "recall_per_bin" ([n_bins], NaN where empty), "S" (Spearman correlation between the bin level 1..n_bins and
    its recall) and "R2" (R^2 of a linear fit of recall on the level).
    """
    bins = uncertainty_bins(uncertainty, n_bins, mode)
    recall = recall_per_bin(hits, bins, n_bins)
    level = torch.arange(1, n_bins + 1, dtype=torch.float64, device=recall.device)
    return {"recall_per_bin": recall, "S": spearman_correlation(level, recall), "R2": r_squared(level, recall)}


def retrieval_calibration(model: ProbVLM, image_features: torch.Tensor, text_features: torch.Tensor, *,
                          ks: int | Sequence[int] = (1, 5, 10), n_bins: int = 10, n_passes: int = 15,
                          dropout_p: float | None = None, mode: str = "count", backend: str | None = None) -> dict:
    """Both retrieval directions of paired embeddings (query i's positive is gallery item i) with ProbVLM's
    uncertainty, as the paper evaluates calibration.

    The ranking uses the frozen model's embeddings (ProbVLM estimates the uncertainty of that retrieval, it does
    not change it), by cosine similarity through pyvl.ops.similarity_logits; each query's uncertainty is the mean
    over dimensions of aleatoric + epistemic (MC dropout, `n_passes`, `dropout_p`), as the official
    get_features_uncer_ProbVLM sums them. Returns {"i2t": ..., "t2i": ...}, each a dict with "recall" ([len(ks)]),
    "uncertainty" ([Q]) and, per K, calibration_metrics under "calibration" (a list in the order of ks).
    """
    _features(image_features, "image_features", model.dim)
    _features(text_features, "text_features", model.dim)
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must be paired (same shape)")
    img, txt = mc_dropout(model, image_features, text_features, n_passes=n_passes, dropout_p=dropout_p)
    positives = torch.arange(image_features.shape[0], device=image_features.device)
    out = {}
    for name, query, gallery, unc in (("i2t", image_features, text_features, img),
                                      ("t2i", text_features, image_features, txt)):
        hits = retrieval_hits(retrieval_similarity(query, gallery, backend=backend), positives, ks)
        u = (unc.aleatoric + unc.epistemic).mean(dim=1)
        out[name] = {"recall": hits.double().mean(dim=0), "uncertainty": u,
                     "calibration": [calibration_metrics(u, hits[:, j], n_bins, mode) for j in range(hits.shape[1])]}
    return out
