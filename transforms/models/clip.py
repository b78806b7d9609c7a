"""open_clip image tower behind a Beam `ModelHandler`.

The handler calls the library exactly as it is meant to be called:
`model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=...)`, then
`model.encode_image(torch.stack([preprocess(img) ...]))`, L2-normalised. `--clip_pretrained`
is any open_clip pretrained tag (`openai`, `laion2b_s32b_b82k`, ...), a local checkpoint
(state_dict `.pt` / `.bin` / `.safetensors`), or `none` for random weights (offline tests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"


def pretrained_arg(pretrained: Optional[str]) -> Optional[str]:
    if pretrained is None or pretrained.lower() in ("", "none", "random"):
        return None
    return pretrained


def load_open_clip(model_name: str, pretrained: Optional[str], device: str = "cpu", threads=0):
    """(model in eval mode, the validation preprocess transform open_clip returns)."""
    import open_clip
    import torch

    from transforms.run.job import resolve_threads

    threads = resolve_threads(threads)
    if threads > 0:
        torch.set_num_threads(threads)
    pre = pretrained_arg(pretrained)
    if pre is None:
        # Random weights must still be the same on every worker and every run.
        torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pre, device=device)
    model.eval()
    return model, preprocess


def clip_input_side(model_name: str) -> Optional[int]:
    """The shorter side open_clip's preprocess resizes an image to (224 for ViT-L/14), read
    from the architecture's config without loading weights; None when the config is not
    local (hf-hub:, local-dir:)."""
    import open_clip

    config = open_clip.get_model_config(model_name) or {}
    size = config.get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = max(size)
    return int(size) if size else None


def validate_clip_args(model_name: str, pretrained: Optional[str]) -> None:
    """Fail before the run on an unknown architecture or a missing checkpoint file."""
    import open_clip

    from transforms.errors import UsageError

    known = set(open_clip.list_models())
    if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = sorted(m for m in known if model_name.lower().replace("/", "-") in m.lower())[:8]
        raise UsageError(
            f"--clip_model {model_name!r} is not an open_clip architecture"
            + (f"; did you mean one of {close}?" if close else "; see open_clip.list_models()")
        )
    pre = pretrained_arg(pretrained)
    if pre is None or "://" in pre:
        return
    looks_like_path = os.sep in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not os.path.exists(pre):
        raise UsageError(f"--clip_pretrained {pre!r}: no such checkpoint file")
    if not looks_like_path:
        tags = set(open_clip.list_pretrained_tags_by_model(model_name))
        if tags and pre not in tags:
            raise UsageError(
                f"--clip_pretrained {pre!r} is not a pretrained tag of {model_name} "
                f"(known: {sorted(tags)}); or give a local checkpoint path, or 'none'"
            )


class LoadedClip:
    """The model and its preprocess transform behind a method call: Beam's cross-process
    proxy (a model shared per machine) forwards method calls, not attribute reads."""

    def __init__(self, model, preprocess, device: str = "cpu"):
        self.model = model
        self.preprocess = preprocess
        self.device = device

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """RGB PIL images -> L2-normalised float32 embeddings [n, dim]."""
        import torch

        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        with torch.no_grad():
            features = self.model.encode_image(pixels)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


class OpenClipImageHandler(ModelHandler[Any, np.ndarray, Any]):
    """RGB PIL image -> L2-normalised float32 CLIP image embedding."""

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        threads=0,
        share_across_processes: bool = False,
    ):
        # Shared: one copy of the model per machine (ViT-L-14 is 1.7 GB in float32), which
        # every SDK process sends its batches to.
        super().__init__(min_batch_size=1, max_batch_size=batch_size, large_model=share_across_processes)
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.threads = threads

    def load_model(self) -> LoadedClip:
        return LoadedClip(*load_open_clip(self.model_name, self.pretrained, self.device, self.threads), device=self.device)

    def run_inference(
        self, batch: Sequence[Any], model, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        vectors = model.embed(list(batch))
        for vec in vectors:
            # The example (a PIL image) is not echoed back: it would keep pixels alive.
            yield PredictionResult(None, vec, self.model_id)

    @property
    def model_id(self) -> str:
        return f"{self.model_name}/{self.pretrained or 'none'}"

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(getattr(img, "width", 1) * getattr(img, "height", 1) * 3 for img in batch)

    def get_metrics_namespace(self) -> str:
        return "open_clip"
