"""CoOp: context optimization, learned prompts for a frozen CLIP.

Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022 (arXiv 2109.01134); official code
KaiyangZhou/CoOp, trainers/coop.py (PromptLearner, TextEncoder, CustomCLIP) on the Dassl trainer.

- PromptLearner (paper section 3.2): M = n_ctx learnable context vectors [V]_1 ... [V]_M of the text tower's token
  width, shared by all classes ("unified context", ctx [n_ctx, width]) or one set per class ("class-specific
  context", csc=True, ctx [n_cls, n_ctx, width]). Random init N(0, 0.02) (the code's nn.init.normal_(std=0.02)), or
  from a phrase such as "a photo of a" through CLIP's token embedding, n_ctx then being the phrase's token count.
  The prompt of class i is fed to the text encoder as embeddings, laid out as the official code does:
      end:    [SOS] [V]_1 .. [V]_M [CLASS] . [EOT] [pad] ...
      middle: [SOS] [V]_1 .. [V]_{M//2} [CLASS] [V]_{M//2+1} .. [V]_M . [EOT] ...
      front:  [SOS] [CLASS] [V]_1 .. [V]_M . [EOT] ...
  [SOS], [CLASS], ".", [EOT] and padding are token embeddings of the tokenized "X X .. X classname." (the frozen
  buffers token_prefix = [SOS], token_suffix = the rest). Text features are pooled at the EOT position, the argmax of
  that tokenized prompt's ids, as CLIP does (pyvl.models.clip.CLIP.encode_text_embeddings).
- CoOp: logits = exp(logit_scale) * cos(image features, text features) (pyvl.ops.similarity_logits), CLIP frozen,
  only ctx trained, cross-entropy over the classes.
- Training recipe (section 4.1 and the code's configs/trainers/CoOp/*.yaml): SGD lr 0.002, momentum 0.9, weight
  decay 5e-4, batch 32, cosine annealing over max_epoch, one warm-up epoch at a constant lr 1e-5 (Dassl's
  ConstantWarmupScheduler: epoch 0 at 1e-5, epoch e >= 1 at 0.5 * lr * (1 + cos(pi * (e - 1) / max_epoch))).
  The paper trains 200 / 100 / 50 epochs for 16 / 4-8 / 1-2 shots (the code's configs); train_coop takes max_epoch.

Where pyvl follows the code rather than the paper, or goes beyond it:
- The class-token positions and the "." after the class name are the code's (the paper's figure shows only "end").
- n_ctx with a phrase init: the code counts the phrase's words (len(ctx_init.split(" "))) and takes that many
  embedding rows after [SOS]; pyvl counts its BPE tokens, which is the same for phrases of one-token words like
  "a photo of a" and stays correct for the others.
- csc with a phrase init: the code ignores csc there (one shared context); pyvl starts every class from the phrase.
- Checkpoints: the code saves the prompt learner's state_dict (ctx, token_prefix, token_suffix) nested under
  "state_dict" by Dassl, and its load_model drops token_prefix / token_suffix (they depend on the class names);
  load_coop_checkpoint does the same after checking they were made with the same token width.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, tokenize

__all__ = ["PromptLearner", "CoOp", "CLASS_TOKEN_POSITIONS", "coop_lr", "train_coop", "load_coop_checkpoint"]

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


def _token_count(tokens: torch.Tensor) -> int:
    """The number of tokens between SOT and EOT of one tokenized text (ids after EOT are 0 padding)."""
    return int(tokens.argmax()) - 1


class PromptLearner(nn.Module):
    """The learnable context and the frozen token embeddings of every class's prompt; forward() -> [n_cls, L, width]
    prompt embeddings, `tokenized_prompts` [n_cls, L] the ids whose argmax marks each EOT.

    Args:
        clip_model: a pyvl CLIP (its token_embedding, context_length and ln_final width are read; nothing is kept).
        classnames: the class names ("_" becomes " " as in the code).
        n_ctx: the number of context vectors M (ignored with ctx_init: the phrase's token count).
        ctx_init: None for N(0, 0.02) context, or a phrase ("a photo of a") whose token embeddings start it.
        csc: class-specific context (one set of M vectors per class) instead of one shared set.
        class_token_position: "end", "middle" or "front".
        tokenizer: tokenizer(texts, context_length=L) -> [n, L] ids with EOT the largest id of each row; CLIP's BPE
            tokenizer by default (pyvl.models.clip.tokenize).
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str | None = None,
                 csc: bool = False, class_token_position: str = "end",
                 tokenizer: Callable[..., torch.Tensor] | None = None):
        super().__init__()
        if not isinstance(clip_model, CLIP):
            raise TypeError(f"clip_model must be a pyvl.models.CLIP, got {type(clip_model).__name__}")
        if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames or \
                not all(isinstance(c, str) and c.strip() for c in classnames):
            raise TypeError("classnames must be a non-empty sequence of non-empty str")
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got "
                             f"{class_token_position!r}")
        if not isinstance(csc, bool):
            raise TypeError(f"csc must be a bool, got {csc!r}")
        if ctx_init is not None and (not isinstance(ctx_init, str) or not ctx_init.strip()):
            raise TypeError(f"ctx_init must be None or a non-empty str, got {ctx_init!r}")
        if ctx_init is None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        context_length = clip_model.context_length
        tokenizer = tokenizer or tokenize
        embedding = clip_model.token_embedding
        width = embedding.weight.shape[1]
        n_cls = len(classnames)
        classnames = [c.replace("_", " ") for c in classnames]

        with torch.no_grad():
            if ctx_init is not None:
                ctx_init = ctx_init.replace("_", " ").strip()
                phrase = tokenizer([ctx_init], context_length=context_length)
                n_ctx = _token_count(phrase[0])
                ctx = embedding(phrase.to(embedding.weight.device))[0, 1:1 + n_ctx].clone()
                if csc:
                    ctx = ctx.expand(n_cls, -1, -1).clone()
                prefix_text = ctx_init
            else:
                ctx = torch.empty((n_cls, n_ctx, width) if csc else (n_ctx, width), dtype=embedding.weight.dtype,
                                  device=embedding.weight.device)
                nn.init.normal_(ctx, std=0.02)
                prefix_text = " ".join(["X"] * n_ctx)
            prompts = [f"{prefix_text} {name}." for name in classnames]
            tokenized = tokenizer(prompts, context_length=context_length)
            name_lens = [_token_count(tokenizer([name], context_length=context_length)[0]) for name in classnames]
            for i, (prompt, tokens) in enumerate(zip(prompts, tokenized)):
                # SOT + context + name + "." + EOT must fit: a truncated prompt would lose its class or its EOT.
                if _token_count(tokens) != n_ctx + name_lens[i] + 1:
                    raise ValueError(f"classnames[{i}]: the prompt {prompt!r} does not fit context_length "
                                     f"{context_length} (or its tokens do not split as context + name + '.')")
            token_embeddings = embedding(tokenized.to(embedding.weight.device))
        self.ctx = nn.Parameter(ctx)
        # Frozen and rebuilt from the class names, as in the code (load_coop_checkpoint ignores them).
        self.register_buffer("token_prefix", token_embeddings[:, :1].clone())  # SOS
        self.register_buffer("token_suffix", token_embeddings[:, 1 + n_ctx:].clone())  # CLASS, ".", EOT, padding
        self.register_buffer("tokenized_prompts", tokenized.to(embedding.weight.device), persistent=False)
        self.n_cls, self.n_ctx, self.csc = n_cls, n_ctx, csc
        self.name_lens = name_lens
        self.class_token_position = class_token_position
        self.classnames = classnames

    def forward(self) -> torch.Tensor:
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        prompts = []
        for i, name_len in enumerate(self.name_lens):
            name, rest = suffix[i:i + 1, :name_len], suffix[i:i + 1, name_len:]
            if self.class_token_position == "middle":
                parts = [prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest]
            else:  # front
                parts = [prefix[i:i + 1], name, ctx[i:i + 1], rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0)


class CoOp(nn.Module):
    """A frozen pyvl CLIP with a PromptLearner: forward(image) -> [B, n_cls] logits
    exp(logit_scale) * cos(image features, class text features). Only `prompt_learner.ctx` requires a gradient.

    The arguments after classnames are PromptLearner's; the CLIP's parameters are frozen (requires_grad False) and
    the CLIP is held as the submodule `clip` (its state_dict keys under "clip.").
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str | None = None,
                 csc: bool = False, class_token_position: str = "end",
                 tokenizer: Callable[..., torch.Tensor] | None = None):
        super().__init__()
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, ctx_init, csc, class_token_position,
                                            tokenizer)
        self.clip = clip_model.requires_grad_(False)

    def text_features(self) -> torch.Tensor:
        """[n_cls, embed_dim] text features of the learned prompts (not normalized)."""
        pl = self.prompt_learner
        return self.clip.encode_text_embeddings(pl(), pl.tokenized_prompts)

    def logits_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, n_cls] logits from [B, embed_dim] image features (the frozen image tower's output, e.g. cached)."""
        from ..ops import similarity_logits

        return similarity_logits(image_features, self.text_features(), scale=self.clip.logit_scale.exp())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the image tower is frozen: no graph through it
            image_features = self.clip.encode_image(image)
        return self.logits_from_features(image_features)


# --------------------------------------------------------------------------------------------------------------
# Training and checkpoints


def coop_lr(epoch: int, max_epoch: int, lr: float = 0.002, warmup_epochs: int = 1,
            warmup_lr: float = 1e-5) -> float:
    """The learning rate of `epoch` (0-based) under CoOp's schedule: Dassl's ConstantWarmupScheduler (warmup_lr
    for the first warmup_epochs) over CosineAnnealingLR(T_max=max_epoch), stepped once per epoch."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max_epoch))


def train_coop(model: CoOp, inputs: torch.Tensor, labels: torch.Tensor, max_epoch: int, *, batch_size: int = 32,
               lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
               warmup_lr: float = 1e-5, features: bool = False, generator: torch.Generator | None = None) -> list:
    """Train model's context with CoOp's recipe (SGD with momentum and weight decay, cross-entropy, the coop_lr
    schedule, shuffled batches of batch_size, the last partial batch kept) and return the mean loss of every
    epoch. `inputs` are images, or the frozen image tower's features if `features` (the same training: the tower is
    frozen, so caching its output changes nothing but the time)."""
    if not isinstance(model, CoOp):
        raise TypeError(f"model must be a CoOp, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("inputs and labels must be tensors")
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be [{inputs.shape[0]}] integer class indices, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < model.prompt_learner.n_cls:
        raise ValueError(f"labels must lie in [0, {model.prompt_learner.n_cls})")
    if isinstance(max_epoch, bool) or not isinstance(max_epoch, int) or max_epoch < 1:
        raise ValueError(f"max_epoch must be a positive int, got {max_epoch!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    forward = model.logits_from_features if features else model
    history = []
    model.train()
    for epoch in range(max_epoch):
        for group in optimizer.param_groups:
            group["lr"] = coop_lr(epoch, max_epoch, lr, warmup_epochs, warmup_lr)
        order = torch.randperm(inputs.shape[0], generator=generator)
        total = 0.0
        for start in range(0, inputs.shape[0], batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(forward(inputs[idx]), labels[idx].to(inputs.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / max(inputs.shape[0], 1))
    return history


def load_coop_checkpoint(model: CoOp | PromptLearner, checkpoint) -> CoOp | PromptLearner:
    """Load a CoOp checkpoint's context into model (in place) and return model.

    checkpoint: a path (torch.load on the CPU with weights_only=True) or what it holds: the prompt learner's state_dict with key "ctx",
    possibly nested under "state_dict" as Dassl's save_checkpoint writes it (with "epoch", "optimizer", ...);
    "prompt_learner."-prefixed keys (a whole CoOp's state_dict) are accepted. token_prefix / token_suffix are
    dropped as the official load_model does (they come from the class names, which may differ), after checking that
    their token width is the model's. Raises ValueError naming what does not fit.
    """
    learner = model.prompt_learner if isinstance(model, CoOp) else model
    if not isinstance(learner, PromptLearner):
        raise TypeError(f"model must be a CoOp or a PromptLearner, got {type(model).__name__}")
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError (weights_only refuses arbitrary objects), and others
            # Dassl also pickles its scheduler, whose state holds a scheduler object: weights_only refuses it.
            # Unpickling arbitrary objects runs code, so that is the caller's decision for a file they trust.
            raise ValueError(f"checkpoint {checkpoint!s} does not load with torch.load(weights_only=True) ({e}); for "
                             "a file you trust, pass load_coop_checkpoint(model, torch.load(path, "
                             "weights_only=False))") from e
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint['state_dict'] must be a dict, got {type(state).__name__}")
    state = {(k[len("prompt_learner."):] if k.startswith("prompt_learner.") else k): v for k, v in state.items()}
    if "ctx" not in state:
        raise ValueError(f"checkpoint holds no 'ctx' (a CoOp prompt learner's context); its keys: "
                         f"{sorted(state)[:10]}")
    width = learner.ctx.shape[-1]
    for name in ("token_prefix", "token_suffix"):
        buf = state.get(name)
        if buf is not None and (not isinstance(buf, torch.Tensor) or buf.dim() != 3 or buf.shape[-1] != width):
            raise ValueError(f"checkpoint's {name} must be [n_cls, tokens, {width}] (the model's token width), got "
                             f"{tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__}")
    ctx = state["ctx"]
    if not isinstance(ctx, torch.Tensor) or tuple(ctx.shape) != tuple(learner.ctx.shape):
        raise ValueError(f"checkpoint's ctx must have the model's shape {tuple(learner.ctx.shape)} "
                         f"({'class-specific' if learner.csc else 'unified'}, n_ctx {learner.n_ctx}, width {width}), "
                         f"got {tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__}")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return model
