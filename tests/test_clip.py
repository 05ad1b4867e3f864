"""CLIP (pyvl.models.clip) and from_open_clip, against open_clip's CLIP built with random weights (pretrained=None).

Small custom configurations keep the parity tests fast; the ViT-B-32 and RN50 configurations are checked for
parameter counts and state_dict keys (on the meta device) and run once at batch 1.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pyvl.interop
import pyvl.models
from pyvl.models import clip as pclip
from pyvl.testing import check_error_criterion, randomize_norms

open_clip = pytest.importorskip("open_clip")

VOCAB, CONTEXT = 49408, 16  # the real vocabulary, so that prompts from the real tokenizer can be encoded
TEXT_CFG = dict(context_length=CONTEXT, vocab_size=VOCAB, width=48, heads=4, layers=2)
VISION_CFGS = {
    "vit-quickgelu": (dict(layers=2, width=64, head_width=16, patch_size=8, image_size=(32, 40)), True),
    "vit-gelu": (dict(layers=2, width=64, head_width=32, patch_size=(8, 4), image_size=32, mlp_ratio=2.0), False),
    "resnet": (dict(layers=(1, 2, 1, 1), width=16, head_width=32, image_size=64, patch_size=None), False),
}


def _open_clip_model(kind, seed=0):
    vision_cfg, quick_gelu = VISION_CFGS[kind]
    torch.manual_seed(seed)
    model = open_clip.CLIP(32, vision_cfg, TEXT_CFG, quick_gelu=quick_gelu)
    # Random norms: open_clip zero-inits each bottleneck's bn3, which would hide the residual branch.
    return randomize_norms(model, seed, layer_norms=True).eval()


@pytest.fixture(scope="module", params=list(VISION_CFGS))
def pair(request):
    oc = _open_clip_model(request.param)
    return oc, pyvl.interop.from_open_clip(oc)


def _images(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *pclip._pair(model.visual.image_size, "image_size"), generator=g)


def _text(batch=4, length=CONTEXT, seed=2):
    """Token ids laid out as the tokenizer's: SOT, tokens, EOT (the largest id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, length - 1, (1,), generator=g))
        ids[i, 0] = VOCAB - 2
        ids[i, 1:n] = torch.randint(1, VOCAB - 2, (n - 1,), generator=g)
        ids[i, n] = VOCAB - 1
    return ids


def _has_similarity_logits():
    try:
        pclip._cosine_logits(torch.ones(1, 2), torch.ones(1, 2))
    except NotImplementedError:
        return False
    return True


needs_similarity_logits = pytest.mark.skipif(
    not _has_similarity_logits(), reason="pyvl.ops.similarity_logits (contrastive family) is not in this pyvl yet")


_FLOAT64 = {}


def _float64(oc):
    """A float64 copy of the open_clip model, made once per model."""
    if id(oc) not in _FLOAT64:
        _FLOAT64[id(oc)] = (oc, copy.deepcopy(oc).double())  # oc kept alive so that its id stays unique
    return _FLOAT64[id(oc)][1]


def _criterion(out, fn, oc, name):
    """out (pyvl in float32) against fn(open_clip in float64) with fn(open_clip in float32) as torch's error."""
    with torch.no_grad():
        ref = fn(_float64(oc), torch.float64)
        torch_out = fn(oc, torch.float32)
    check_error_criterion(out, ref, torch_out, name=name)


def test_image_features_match_open_clip(pair):
    oc, model = pair
    images = _images(oc)
    with torch.no_grad():
        out = model.encode_image(images)
    _criterion(out, lambda m, dt: m.encode_image(images.to(dt)), oc, "image features")


def test_text_features_match_open_clip(pair):
    oc, model = pair
    text = _text()
    with torch.no_grad():
        out = model.encode_text(text)
        # Trailing padding may be cut: the causal EOT token never attends to it.
        short = model.encode_text(text[:, : int(text.argmax(-1).max()) + 1])
    for o, name in ((out, "text features"), (short, "text features, padding cut")):
        _criterion(o, lambda m, dt: m.encode_text(text), oc, name)


def test_forward_output_format_matches_open_clip(pair):
    oc, model = pair
    images, text = _images(oc), _text()
    with torch.no_grad():
        ours, theirs = model(images, text), oc(images, text)
        assert isinstance(ours, tuple) and len(ours) == len(theirs) == 3
        ref = _float64(oc)(images.double(), text)
        for i, name in enumerate(("image features", "text features")):
            check_error_criterion(ours[i], ref[i], theirs[i], name=name)
            torch.testing.assert_close(ours[i].norm(dim=-1), torch.ones(ours[i].shape[0]))
        assert ours[2].shape == theirs[2].shape == ()
        torch.testing.assert_close(ours[2], theirs[2])
        assert model(images)[1] is None and model(text=text)[0] is None
        as_dict = copy.deepcopy(model)
        as_dict.output_dict = True
        d = as_dict(images, text)
        assert set(d) == {"image_features", "text_features", "logit_scale"}
        torch.testing.assert_close(d["image_features"], ours[0])


@needs_similarity_logits
def test_logits_match_open_clip(pair):
    oc, model = pair
    images, text = _images(oc), _text()
    with torch.no_grad():
        image_logits, text_logits = model.get_logits(images, text)
    assert image_logits.shape == (3, 4)
    torch.testing.assert_close(text_logits, image_logits.T)
    _criterion(image_logits, lambda m, dt: m.get_logits(images.to(dt), text)[0], oc, "logits")

    def scale_grad(m, dt):  # the logit scale's gradient flows through similarity_logits' tensor scale
        with torch.enable_grad():
            return torch.autograd.grad(m.get_logits(images.to(dt), text)[0].sum(), m.logit_scale)[0]

    _criterion(scale_grad(model, torch.float32), scale_grad, oc, "logit_scale gradient")


def test_logits_without_similarity_logits_say_what_is_missing(monkeypatch):
    model = pyvl.interop.from_open_clip(_open_clip_model("vit-gelu"))
    monkeypatch.delattr(pyvl.ops, "similarity_logits", raising=False)
    with pytest.raises(NotImplementedError, match="pyvl.ops.similarity_logits"):
        model.get_logits(_images(model), _text())
    with pytest.raises(NotImplementedError, match="pyvl.ops.similarity_logits"):
        pyvl.models.ZeroShotClassifier(model, CLASSNAMES, TEMPLATES, _tokenizer)(_images(model))


def test_gradients_match_open_clip():
    """A training step's parameter gradients (train mode: BN batch statistics) against open_clip's."""
    oc = _open_clip_model("resnet").train()
    model = pyvl.interop.from_open_clip(oc)
    assert model.training
    images, text = _images(oc, batch=2), _text(batch=3)
    weights = torch.randn(2 + 3, 32, generator=torch.Generator().manual_seed(3))

    def loss_grads(m, dt):
        img, txt, scale = m(images.to(dt), text)
        loss = (torch.cat([img, txt]) * weights.to(dt)).sum() * scale
        return dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(m.parameters()))))

    ours = loss_grads(model, torch.float32)
    ref = loss_grads(copy.deepcopy(oc).double(), torch.float64)
    theirs = loss_grads(oc, torch.float32)
    assert set(ours) == set(ref)
    for name, grad in ours.items():
        check_error_criterion(grad, ref[name], theirs[name], name=f"grad {name}")


def test_state_dict_round_trip(pair):
    oc, model = pair
    ours, theirs = model.state_dict(), oc.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    back = copy.deepcopy(oc)  # open_clip's module with its state wiped, then loaded from pyvl's state_dict
    with torch.no_grad():
        for v in back.state_dict().values():
            v.zero_()
    back.load_state_dict(ours, strict=True)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)


def test_from_open_clip_keeps_mode_dtype_and_frozen_parameters():
    oc = _open_clip_model("vit-gelu").double().train()
    oc.visual.conv1.weight.requires_grad_(False)
    model = pyvl.interop.from_open_clip(oc)
    assert model.training and model.logit_scale.dtype == torch.float64
    assert not model.visual.conv1.weight.requires_grad and model.visual.proj.requires_grad
    assert model.visual.conv1.weight.data_ptr() != oc.visual.conv1.weight.data_ptr()  # a copy, not shared
    assert float(pyvl.models.CLIP(32, VISION_CFGS["vit-gelu"][0], TEXT_CFG).logit_scale.detach()) == \
        pytest.approx(math.log(1 / 0.07))  # the paper's initial temperature 0.07


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_parameter_count_and_keys_match_open_clip(name):
    with torch.device("meta"):
        oc = open_clip.CLIP(**open_clip.get_model_config(name))
        ours = pyvl.models.create_clip(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in oc.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in oc.state_dict().items()}
    assert ours.logit_scale.shape == ()


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_real_config_batch_one(name):
    torch.manual_seed(0)
    oc = open_clip.create_model(name, pretrained=None).eval()
    model = pyvl.interop.from_open_clip(oc)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    text = pclip.tokenize(["a photo of a dog"])
    with torch.no_grad():
        ours, theirs = model(image, text), oc(image, text)
    for o, t, what in zip(ours, theirs, ("image features", "text features", "logit scale")):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-5, msg=what)
    torch.testing.assert_close(ours[2], torch.tensor(1 / 0.07))


def test_tokenize_matches_open_clip():
    texts = ["a photo of a dog.", "A PHOTO of a  cat", "x " * 100]
    ids = pclip.tokenize(texts)
    torch.testing.assert_close(ids, open_clip.tokenize(texts), rtol=0, atol=0)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert int(ids[2, -1]) == int(ids.max()) == VOCAB - 1  # truncated with EOT kept last
    assert pclip.tokenize("one", context_length=5).shape == (1, 5)
    with pytest.raises(TypeError, match="texts"):
        pclip.tokenize(["ok", 3])


CLASSNAMES = ["dog", "cat", "golden retriever", "airplane", "red car"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", lambda c: f"itap of a {c}."]


def _direct_class_embeddings(model):
    """The paper's recipe prompt by prompt: normalize each prompt embedding, average over templates, renormalize."""
    rows = []
    with torch.no_grad():
        for c in CLASSNAMES:
            prompts = [t.format(c) if isinstance(t, str) else t(c) for t in TEMPLATES]
            feats = torch.stack([model.encode_text(pclip.tokenize([p], CONTEXT))[0] for p in prompts])
            rows.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def _tokenizer(texts):
    return pclip.tokenize(texts, CONTEXT)


def test_zero_shot_weights_are_the_prompt_ensemble(pair):
    oc, model = pair
    direct = _direct_class_embeddings(model)
    for per_batch in (None, 2):
        weights = pyvl.models.zero_shot_weights(model, CLASSNAMES, TEMPLATES, _tokenizer, per_batch)
        torch.testing.assert_close(weights, direct, rtol=1e-5, atol=1e-6)
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    # open_clip's builder takes format strings or callables, not a mix.
    strings = [t for t in TEMPLATES if isinstance(t, str)]
    theirs = build_zero_shot_classifier(oc, _tokenizer, CLASSNAMES, strings, num_classes_per_batch=2)
    ours = pyvl.models.zero_shot_weights(model, CLASSNAMES, strings, _tokenizer)
    torch.testing.assert_close(ours, theirs.T, rtol=1e-5, atol=1e-6)


@needs_similarity_logits
def test_zero_shot_classifier_logits(pair):
    oc, model = pair
    images = _images(oc, batch=4)
    classifier = pyvl.models.ZeroShotClassifier(model, CLASSNAMES, TEMPLATES, _tokenizer)
    direct = _direct_class_embeddings(model)
    with torch.no_grad():
        features = F.normalize(model.encode_image(images), dim=-1)
        logits = classifier(images)
        torch.testing.assert_close(logits, 100.0 * features @ direct.T, rtol=1e-5, atol=1e-4)
        model_scale = pyvl.models.ZeroShotClassifier(model, CLASSNAMES, TEMPLATES, _tokenizer, logit_scale=None)
        torch.testing.assert_close(model_scale(images), model.logit_scale.exp() * features @ direct.T,
                                   rtol=1e-5, atol=1e-4)
    assert logits.shape == (4, len(CLASSNAMES))


def test_argument_errors():
    oc = _open_clip_model("vit-gelu")
    model = pyvl.interop.from_open_clip(oc)
    with pytest.raises(ValueError, match="image must be"):
        model.encode_image(torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="dtype"):
        model.encode_image(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="integer tensor"):
        model.encode_text(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.zeros(1, CONTEXT + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="name must be one of"):
        pyvl.models.create_clip("ViT-Z-99")
    with pytest.raises(ValueError, match="vision_cfg has keys"):
        pyvl.models.CLIP(32, dict(layers=2, width=64, patch_size=8, image_size=32, pool_type="avg"), TEXT_CFG)
    with pytest.raises(ValueError, match="divisible"):
        pyvl.models.CLIP(32, dict(layers=2, width=64, patch_size=7, image_size=32), TEXT_CFG)
    with pytest.raises(ValueError, match="classnames"):
        pyvl.models.zero_shot_weights(model, [], TEMPLATES, _tokenizer)
    with pytest.raises(ValueError, match="logit_scale"):
        pyvl.models.ZeroShotClassifier(model, CLASSNAMES, TEMPLATES, _tokenizer, logit_scale=-1.0)


def test_from_open_clip_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="from_open_clip supports"):
        pyvl.interop.from_open_clip(torch.nn.Linear(2, 2))
    vision = VISION_CFGS["vit-gelu"][0]
    cases = [
        (dict(vision_cfg=dict(vision, ls_init_value=0.1)), "layer scale"),
        (dict(vision_cfg=dict(vision, pool_type="avg")), "pool_type"),
        (dict(vision_cfg=dict(vision, qk_norm=True)), "custom block"),
        (dict(text_cfg=dict(TEXT_CFG, pool_type="last")), "argmax"),
        (dict(text_cfg=dict(TEXT_CFG, proj_bias=True)), "text_projection"),
        (dict(init_logit_bias=-10.0), "logit_bias"),
    ]
    for kwargs, match in cases:
        oc = open_clip.CLIP(32, kwargs.get("vision_cfg", vision), kwargs.get("text_cfg", TEXT_CFG),
                            **{k: v for k, v in kwargs.items() if k not in ("vision_cfg", "text_cfg")})
        with pytest.raises(ValueError, match=match):
            pyvl.interop.from_open_clip(oc)
    mixed = _open_clip_model("vit-gelu")
    mixed.visual.proj.data = mixed.visual.proj.data.half()
    with pytest.raises(ValueError, match="one floating dtype"):
        pyvl.interop.from_open_clip(mixed)


def test_traces_without_graph_breaks(pair):
    """torch.compile(fullgraph=True) captures the whole model. The "eager" backend checks the capture only: with
    inductor (verified by hand, equal within 3e-7) compilation takes minutes on a 2-core CI box."""
    oc, model = pair
    images, text = _images(oc), _text()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for o, e in zip(compiled(images, text), model(images, text)):
            torch.testing.assert_close(o, e, rtol=0, atol=0)
