"""Tier 2: CoOp (pyvl.models.coop): the prompt layout of the official code position by position for the three class
token positions (hypothesis draws n_ctx, position, csc and class names of several tokens), CSC shapes, phrase init,
gradients only to ctx (and gradcheck in float64), CLIP's text tower fed embeddings, the learning-rate schedule
against torch's schedulers, checkpoints (Dassl nesting) and a few-shot run where the learned prompt beats the
hand-written one."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("open_clip.tokenizer")  # CLIP's BPE tokenizer

from pyvl.models.clip import CLIP, TextConfig, VisionConfig, tokenize  # noqa: E402
from pyvl.models.coop import CoOp, PromptLearner, coop_lr, load_coop_checkpoint, train_coop  # noqa: E402

CONTEXT = 24
NAMES = ["cat", "traffic_light", "t-shirt", "aeroplane", "sea lion"]  # one to three BPE tokens each


def _tiny_clip(seed=0, width=32, dtype=torch.float32):
    torch.manual_seed(seed)
    clip = CLIP(16, VisionConfig(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                TextConfig(context_length=CONTEXT, width=width, heads=2, layers=1))
    return clip.to(dtype).eval()


_CLIP = {}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: more threads only add overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_clip():
    if "clip" not in _CLIP:
        _CLIP["clip"] = _tiny_clip()
    return _CLIP["clip"]


def _ids(text):
    """The BPE ids of text, without SOT / EOT."""
    t = tokenize([text], context_length=CONTEXT)[0]
    return t[1:int(t.argmax())].tolist()


@given(n_ctx=st.integers(1, 7), position=st.sampled_from(["end", "middle", "front"]), csc=st.booleans(),
       names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4))
@settings(max_examples=20, deadline=None)
def test_prompt_layout_matches_official_code(n_ctx, position, csc, names):
    clip = _shared_clip()
    learner = PromptLearner(clip, names, n_ctx=n_ctx, csc=csc, class_token_position=position)
    prompts = learner()
    emb = clip.token_embedding.weight.detach()
    assert prompts.shape == (len(names), CONTEXT, 32)
    assert learner.ctx.shape == ((len(names), n_ctx, 32) if csc else (n_ctx, 32))
    sot, eot, dot = 49406, 49407, _ids(".")
    for i, name in enumerate(names):
        ctx = learner.ctx[i] if csc else learner.ctx
        words = _ids(name.replace("_", " "))
        half = n_ctx // 2
        # The official PromptLearner.forward's concatenations, written out row by row: (kind, value) per position.
        ctx_rows = [("ctx", j) for j in range(n_ctx)]
        name_rows = [("tok", t) for t in words]
        if position == "end":
            body = ctx_rows + name_rows
        elif position == "middle":
            body = ctx_rows[:half] + name_rows + ctx_rows[half:]
        else:
            body = name_rows + ctx_rows
        rows = [("tok", sot)] + body + [("tok", t) for t in dot] + [("tok", eot)]
        rows += [("tok", 0)] * (CONTEXT - len(rows))
        for p, (kind, value) in enumerate(rows):
            want = ctx[value] if kind == "ctx" else emb[value]
            assert torch.equal(prompts[i, p], want), (name, position, p, kind, value)
        # Text features are pooled at the EOT, whose position the layouts keep.
        assert int(learner.tokenized_prompts[i].argmax()) == rows.index(("tok", eot))


def test_csc_and_unified_contexts():
    clip = _shared_clip()
    unified = CoOp(clip, NAMES, n_ctx=16)
    csc = CoOp(clip, NAMES, n_ctx=16, csc=True)
    assert unified.prompt_learner.ctx.shape == (16, 32)
    assert csc.prompt_learner.ctx.shape == (len(NAMES), 16, 32)
    # N(0, 0.02) init, as nn.init.normal_(std=0.02) in the code.
    assert abs(float(csc.prompt_learner.ctx.detach().std()) - 0.02) < 0.003
    # A class-specific context only moves its own class's text features.
    before = csc.text_features().detach()
    with torch.no_grad():
        csc.prompt_learner.ctx[2] += 0.5
    changed = (csc.text_features().detach() - before).abs().amax(dim=1) > 0
    assert changed.tolist() == [i == 2 for i in range(len(NAMES))]


def test_phrase_init_is_the_token_embedding_and_the_hand_written_prompt():
    clip = _shared_clip()
    for csc in (False, True):
        model = CoOp(clip, NAMES, ctx_init="a_photo of a", csc=csc)
        learner = model.prompt_learner
        phrase = clip.token_embedding(tokenize(["a photo of a"], context_length=CONTEXT))[0, 1:5].detach()
        assert learner.n_ctx == 4
        assert torch.equal(learner.ctx, phrase.expand(len(NAMES), -1, -1) if csc else phrase)
        # Before training, CoOp's text features are CLIP's for the hand-written "a photo of a {}." prompts.
        hand = clip.encode_text(tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES],
                                         context_length=CONTEXT))
        torch.testing.assert_close(model.text_features(), hand, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_context():
    clip = _shared_clip()
    model = CoOp(clip, NAMES, n_ctx=4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits = model(images)
    assert logits.shape == (3, len(NAMES))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert model.prompt_learner.ctx.grad is not None and model.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n != "prompt_learner.ctx")
    # logits = exp(logit_scale) * cos(image, text), as CLIP's.
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(model.text_features(), dim=-1)
        torch.testing.assert_close(logits, clip.logit_scale.exp() * img @ txt.T, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_context():
    clip = _tiny_clip(1, width=8, dtype=torch.float64)
    model = CoOp(clip, ["cat", "sea lion"], n_ctx=2, csc=True, class_token_position="middle")
    features = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ctx = model.prompt_learner.ctx

    def fn(c):
        # The context as a function argument: swap the parameter for c for one call.
        model.prompt_learner._parameters["ctx"] = c
        try:
            return model.logits_from_features(features)
        finally:
            model.prompt_learner._parameters["ctx"] = ctx

    assert torch.autograd.gradcheck(fn, (ctx.detach().clone().requires_grad_(),))


def test_text_tower_accepts_embeddings():
    clip = _shared_clip()
    text = tokenize(["a photo of a cat.", "sea lion"], context_length=CONTEXT)
    torch.testing.assert_close(clip.encode_text_embeddings(clip.token_embedding(text), text), clip.encode_text(text),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="embeddings must be"):
        clip.encode_text_embeddings(torch.randn(2, CONTEXT, 31), text)
    with pytest.raises(ValueError, match="text must be"):
        clip.encode_text_embeddings(torch.randn(2, CONTEXT, 32), text[:1])
    with pytest.raises(TypeError, match="embeddings"):
        clip.encode_text_embeddings(text, text)


def test_learning_rate_schedule_is_dassl_constant_warmup_then_cosine():
    max_epoch, lr = 10, 0.002
    assert coop_lr(0, max_epoch) == 1e-5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epoch)
    for epoch in range(1, max_epoch):  # the successor starts stepping after the warm-up epoch
        assert coop_lr(epoch, max_epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        cosine.step()


def test_checkpoint_round_trip(tmp_path):
    clip = _shared_clip()
    trained = CoOp(clip, NAMES, n_ctx=4, csc=True)
    opt = torch.optim.SGD([trained.prompt_learner.ctx], lr=0.1, momentum=0.9)
    # Dassl's save_checkpoint: the prompt learner's state_dict nested under "state_dict", with the trainer's state.
    torch.save({"state_dict": trained.prompt_learner.state_dict(), "epoch": 50, "optimizer": opt.state_dict(),
                "val_result": None}, tmp_path / "model.pth.tar-50")
    fresh = CoOp(clip, NAMES, n_ctx=4, csc=True)
    assert not torch.equal(fresh.prompt_learner.ctx, trained.prompt_learner.ctx)
    assert load_coop_checkpoint(fresh, tmp_path / "model.pth.tar-50") is fresh
    assert torch.equal(fresh.prompt_learner.ctx, trained.prompt_learner.ctx)
    # A flat state_dict, and a whole CoOp's (prompt_learner.-prefixed keys, CLIP's too); other class names are fine
    # (token_prefix / token_suffix are dropped, as the official load_model does).
    other = CoOp(clip, ["dog", "cat", "car", "ship", "tree"], n_ctx=4, csc=True)
    load_coop_checkpoint(other.prompt_learner, trained.prompt_learner.state_dict())
    assert torch.equal(other.prompt_learner.ctx, trained.prompt_learner.ctx)
    unified = CoOp(clip, NAMES, n_ctx=4)
    load_coop_checkpoint(unified, CoOp(clip, NAMES, n_ctx=4).state_dict())
    with pytest.raises(ValueError, match="ctx must have the model's shape"):
        load_coop_checkpoint(unified, trained.prompt_learner.state_dict())
    with pytest.raises(ValueError, match="no 'ctx'"):
        load_coop_checkpoint(unified, {"state_dict": {"weight": torch.zeros(1)}})
    bad = dict(trained.prompt_learner.state_dict(), token_prefix=torch.zeros(5, 1, 48))
    with pytest.raises(ValueError, match="token_prefix"):
        load_coop_checkpoint(fresh, bad)
    with pytest.raises(TypeError, match="checkpoint"):
        load_coop_checkpoint(fresh, 3)
    # Dassl pickles its scheduler too (an object weights_only refuses): the path is refused with what to do, and
    # the caller's own torch.load of a trusted file works.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    torch.save({"state_dict": trained.prompt_learner.state_dict(), "scheduler": {"successor": sched}},
               tmp_path / "with-scheduler.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_coop_checkpoint(fresh, tmp_path / "with-scheduler.pth")
    fresh2 = CoOp(clip, NAMES, n_ctx=4, csc=True)
    load_coop_checkpoint(fresh2, torch.load(tmp_path / "with-scheduler.pth", weights_only=False))
    assert torch.equal(fresh2.prompt_learner.ctx, trained.prompt_learner.ctx)


def test_bad_arguments_raise():
    clip = _shared_clip()
    with pytest.raises(ValueError, match="class_token_position"):
        CoOp(clip, NAMES, class_token_position="left")
    with pytest.raises(ValueError, match="n_ctx"):
        CoOp(clip, NAMES, n_ctx=0)
    with pytest.raises(TypeError, match="classnames"):
        CoOp(clip, "cat")
    with pytest.raises(TypeError, match="csc"):
        CoOp(clip, NAMES, csc="yes")
    with pytest.raises(TypeError, match="clip_model"):
        CoOp(torch.nn.Linear(2, 2), NAMES)
    with pytest.raises(ValueError, match="does not fit context_length"):
        CoOp(clip, NAMES, n_ctx=CONTEXT)
    model = CoOp(clip, NAMES, n_ctx=2)
    with pytest.raises(ValueError, match="labels"):
        train_coop(model, torch.randn(4, 16), torch.tensor([0, 1, 2, 9]), 1, features=True)
    with pytest.raises(ValueError, match="max_epoch"):
        train_coop(model, torch.randn(4, 16), torch.tensor([0, 1, 2, 3]), 0, features=True)


def test_few_shot_learned_prompt_beats_hand_written():
    """10 classes separable in image space (a random prototype image each, plus noise), a randomly initialised
    frozen CLIP: the hand-written "a photo of a {}." prompt is at chance (its text features know nothing of the
    prototypes), and CoOp's class-specific context learned from 8 shots per class with the paper's recipe
    (SGD 0.002, momentum 0.9, weight decay 5e-4, cosine, one warm-up epoch) classifies held-out images far better.
    The context starts from the hand-written phrase, so the gain is the learning's alone."""
    names = ["cat", "dog", "car", "tree", "boat", "house", "bird", "fish", "chair", "apple"]
    C = len(names)
    clip = _tiny_clip(2)
    g = torch.Generator().manual_seed(2)
    prototypes = torch.randn(C, 3, 16, 16, generator=g)

    def data(shots):
        labels = torch.arange(C).repeat_interleave(shots)
        return prototypes[labels] + 0.5 * torch.randn(len(labels), 3, 16, 16, generator=g), labels

    (x_train, y_train), (x_test, y_test) = data(8), data(20)
    model = CoOp(clip, names, ctx_init="a photo of a", csc=True)

    def accuracy():
        with torch.no_grad():
            return float((model(x_test).argmax(1) == y_test).float().mean())

    hand = accuracy()
    with torch.no_grad():
        features = clip.encode_image(x_train)  # the frozen image tower's output, computed once
    losses = train_coop(model, features, y_train, 50, features=True, generator=torch.Generator().manual_seed(0))
    learned = accuracy()
    print(f"few-shot accuracy: hand-written prompt {hand:.2f}, learned {learned:.2f}")
    assert hand <= 0.2, hand  # chance is 0.1
    assert learned >= 0.6 and learned >= hand + 0.4, (hand, learned)
    assert losses[-1] < 0.8 * losses[0], losses


def test_bench_step_pyvl_and_plain_agree():
    """The `pyvl bench` coop_step case: pyvl's step and the plain-PyTorch one give the same context gradient."""
    from pyvl._bench_coop import coop_cases

    (case,) = coop_cases("tiny", "cpu", ("coop_step",))
    built = case.build(torch.device("cpu"), torch.float32, None)
    (ours,), (plain,) = built.pyvl(), built.peers["plain PyTorch"]()
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))
