"""WikiCLIP's pieces (Vision-Guided Knowledge Adaptor, InfoNCE with synthesized hard
negatives, visually clustered batches) and the frozen encoders around them.

* Query side: a frozen open_clip image tower; h = its pooled embedding, L2-normalised.
* Entity side: the frozen text encoder's token embeddings of the entity's Wikipedia text
  (any Hugging Face model `AutoModel` loads: a causal LM such as LLaMA or a sentence
  encoder), projected to the CLIP embedding width by a learned matrix; a small trainable
  transformer decoder whose queries are the CLIP patch features of an image of the
  entity (patch tokens through the tower's own frozen projection) and whose keys/values are
  the projected text tokens (padding masked); mean-pooled over the queries and
  L2-normalised: v. An entity without an image is read by a learned set of queries
  instead, so every catalog entity gets a vector.
* Loss: InfoNCE over cosine similarities with a learnable temperature; for each query i,
  `n_sync` synthetic entities (i's own entity image with another batch member's text)
  replace the in-batch negatives v_j they beat in similarity to h_i (WikiCLIP, eq. 6-8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Adaptor(nn.Module):
    """Vision-Guided Knowledge Adaptor: text tokens (B, T, Dt) + their mask (B, T) and
    entity-image patch features (B, P, D) or None -> entity embeddings (B, D), unit norm."""

    def __init__(self, text_dim: int, dim: int, layers: int = 2, heads: int = 8, learned_queries: int = 16,
                 temperature: float = 0.07):
        super().__init__()
        if dim % heads:
            heads = math.gcd(dim, heads) or 1
        self.proj = nn.Linear(text_dim, dim, bias=False)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.queries = nn.Parameter(torch.randn(learned_queries, dim) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.dim = dim

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, patches: Optional[torch.Tensor] = None,
                has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        memory = self.proj(text)
        pad = ~text_mask.bool()
        if patches is None or (has_image is not None and not bool(has_image.any())):
            return self._read(self.queries.unsqueeze(0).expand(len(text), -1, -1), memory, pad)
        if has_image is None or bool(has_image.all()):
            return self._read(patches, memory, pad)
        # Rows with an image are read by its patches, the others by the learned queries.
        out = memory.new_zeros(len(text), self.dim)
        with_img, without = has_image.nonzero().squeeze(1), (~has_image).nonzero().squeeze(1)
        out = out.index_copy(0, with_img, self._read(patches[with_img], memory[with_img], pad[with_img]))
        learned = self.queries.unsqueeze(0).expand(len(without), -1, -1)
        return out.index_copy(0, without, self._read(learned, memory[without], pad[without]))

    def _read(self, queries: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        out = self.decoder(queries, memory, memory_key_padding_mask=pad)
        return F.normalize(out.mean(1), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def info_nce(h: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, synthetic: Optional[torch.Tensor] = None,
             synthetic_index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries h (B, D) against entities v (B, D), positives on the diagonal.

    `synthetic` (B, S, D) are query i's synthetic entities, `synthetic_index` (B, S) the
    batch member j whose text each one carries: ṽ_ij replaces the negative v_j when
    cos(h_i, ṽ_ij) > cos(h_i, v_j). Returns (loss, replaced share)."""
    sims = h @ v.T  # (B, B) cosine: both sides are unit vectors
    replaced = torch.zeros((), device=h.device)
    if synthetic is not None and synthetic.shape[1]:
        s_syn = torch.einsum("bd,bsd->bs", h, synthetic)  # (B, S)
        s_cur = sims.gather(1, synthetic_index)
        better = (s_syn > s_cur) & (synthetic_index != torch.arange(len(h), device=h.device)[:, None])
        sims = sims.scatter(1, synthetic_index, torch.where(better, s_syn, s_cur))
        replaced = better.float().mean()
    logits = scale * sims
    loss = F.cross_entropy(logits, torch.arange(len(h), device=h.device))
    return loss, replaced


def synthetic_partners(qids: Sequence[str], n_sync: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n_sync) indices j != i of another entity in the batch, for each i."""
    b = len(qids)
    out = np.zeros((b, max(0, n_sync)), dtype=np.int64)
    for i in range(b):
        others = [j for j in range(b) if qids[j] != qids[i]]
        if not others or n_sync <= 0:
            out[i] = i
            continue
        out[i] = rng.choice(others, size=n_sync, replace=len(others) < n_sync)
    return out


def cluster_batches(h: np.ndarray, qids: Sequence[str], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Split a pool of queries into batches of visually similar ones (WikiCLIP builds its
    minibatches from CLIP-similar query images): take an unassigned query at random, add
    its nearest unassigned neighbours by cosine, never two of the same entity (they would
    be false negatives of each other). Leftovers that cannot fill a batch form smaller ones."""
    n = len(qids)
    free = np.ones(n, dtype=bool)
    sims = h @ h.T
    batches = []
    for seed in rng.permutation(n):
        if not free[seed]:
            continue
        batch, taken = [int(seed)], {qids[seed]}
        free[seed] = False
        for j in np.argsort(-sims[seed], kind="stable"):
            if len(batch) >= batch_size:
                break
            if free[j] and qids[j] not in taken:
                batch.append(int(j))
                taken.add(qids[j])
                free[j] = False
        batches.append(batch)
    return batches


class FrozenClip:
    """open_clip image tower, frozen: pooled embeddings and projected patch tokens."""

    def __init__(self, model_name: str, pretrained: Optional[str], device):
        from transforms.models.clip import load_open_clip

        model, preprocess = load_open_clip(model_name, pretrained, device=str(device))[:2]
        self.visual = model.visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.output_tokens = True
        size = self.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.dim = int(model.visual.output_dim)
        self.device = device

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.visual(pixels)
        proj = getattr(self.visual, "proj", None)
        if proj is not None and tokens.shape[-1] == proj.shape[0]:
            tokens = tokens @ proj  # patch tokens into the embedding space, as the pooled token
        return F.normalize(pooled.float(), dim=-1), tokens.float()


class FrozenText:
    """A Hugging Face encoder's last hidden states for entity texts (frozen)."""

    def __init__(self, name: str, device, max_tokens: int = 64):
        from transformers import AutoModel, AutoTokenizer

        from transforms.models.embedding import resolve_text_model

        path = resolve_text_model(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = max_tokens
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state.float()
        lengths = enc["attention_mask"].sum(1).tolist()
        return [hidden[i, : int(n)].cpu().numpy().astype(np.float16) for i, n in enumerate(lengths)]


def pad_tokens(arrays: Sequence[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length (T_i, Dt) arrays -> (B, T, Dt) float tensor and (B, T) mask."""
    t = max(1, max(len(a) for a in arrays))
    d = arrays[0].shape[1]
    out = np.zeros((len(arrays), t, d), dtype=np.float32)
    mask = np.zeros((len(arrays), t), dtype=bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
        mask[i, : len(a)] = True
    mask[:, 0] |= ~mask.any(1)  # an empty text keeps one (zero) token so attention is defined
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)
