"""The GIT model (transformers `GitForCausalLM`), its size presets, and the loss.

Presets (`--model_config`):
  tiny   random weights, 64-px images, 2+2 layers of width 64: trains on a CPU in seconds
         (demos, tests). Not a model anyone should evaluate.
  base   the GIT-base shape: ViT-B/16 at 224 px, 6-layer text decoder of width 768.
  large  the GIT-large shape (REW's GiT-Large, 0.4B): ViT-L/14 at 224 px, 6-layer decoder.
`--init microsoft/git-large` (or a local folder) starts from pre-trained weights instead;
the preset is then ignored and the checkpoint's own config is used.

The loss is computed only where there is a target: the decoder's hidden states at the
target positions are gathered first and only those go through the vocabulary projection,
so a batch never materialises (batch x (image tokens + text) x vocab) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    "tiny": {
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 128},
    },
    "base": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 6, "num_attention_heads": 12, "max_position_embeddings": 1024},
    },
    "large": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 6, "num_attention_heads": 12, "max_position_embeddings": 1024},
    },
}


def build_config(preset: str, vocab_size: int, pad: int, bos: int, eos: int):
    from transformers import GitConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown --model_config {preset!r}: one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    return GitConfig(
        vision_config=dict(p["vision"]),
        vocab_size=vocab_size,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        **p["text"],
    )


def build_model(preset: str, init: str | None, vocab_size: int, pad: int, bos: int, eos: int, seed: int = 0):
    """A GitForCausalLM: pre-trained from `init` (a hub id or a folder), else a preset with
    random weights (seeded)."""
    from transformers import GitForCausalLM

    if init:
        model = GitForCausalLM.from_pretrained(init)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"--init {init!r} has a vocabulary of {model.config.vocab_size} tokens but the codes' tokenizer has "
                f"{vocab_size}: build the codes with the model's tokenizer (bert-base-uncased for GIT)"
            )
        return model
    torch.manual_seed(seed)
    return GitForCausalLM(build_config(preset, vocab_size, pad, bos, eos))


def image_tokens(model) -> int:
    return int(model.git.encoder.layer[0].attention.self.image_patch_tokens)


def image_size(model) -> int:
    size = model.config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


class TargetLogits(nn.Module):
    """GIT forward that returns logits only at the target positions (what DDP wraps)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask, label_rows, label_cols):
        out = self.model.git(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False)
        hidden = out.last_hidden_state
        picked = hidden[label_rows, image_tokens(self.model) + label_cols]
        return self.model.output(picked)


def target_loss(logits, labels, label_rows, batch_size: int, label_smoothing: float):
    """Per-sample mean of label-smoothed cross-entropy over its target tokens (GER: 1/L sum
    over code tokens), averaged over the batch. Also returns the per-sample losses."""
    per_token = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
    sums = torch.zeros(batch_size, device=per_token.device).index_add_(0, label_rows, per_token)
    counts = torch.zeros(batch_size, device=per_token.device).index_add_(0, label_rows, torch.ones_like(per_token))
    per_sample = sums / counts.clamp(min=1)
    return per_sample.mean(), per_sample.detach()


def param_groups(model, lr: float, decoder_lr_multiplier: float, weight_decay: float):
    """AdamW groups: the image encoder at `lr`, everything else (embeddings, text decoder,
    projection, output) at `lr * decoder_lr_multiplier`; no decay on biases and norms."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "image" if ".image_encoder." in f".{name}" else "decoder"
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        key = (part, no_decay)
        groups.setdefault(key, []).append(p)
    out = []
    for (part, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lr * (decoder_lr_multiplier if part == "decoder" else 1.0),
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{part}{'/no_decay' if no_decay else ''}",
            }
        )
    return out


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR factor: linear warmup from 0 over `warmup` steps, then cosine to `min_ratio`."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
