"""Token and dollar estimates for LLM requests, before they are sent.

Used by the job-wide token budget (a request's tokens are reserved before it goes and
the difference settled when the usage comes back) and by `refine --estimate_only`.

* Text: one token per four characters of the rendered messages (OpenAI's rule of thumb
  for English; tokenizers of other families differ by about 10-20 %).
* Images, after the downscale refine applies before sending (`--max_image_side`), by the
  rule of the serving family (`--image_tokens`):
  - `openai` (GPT-4o / 4.1, detail high): fit in 2048 x 2048, shorter side to 768, then
    170 tokens per 512 px tile + 85;
  - `openai_patch` (gpt-4.1-mini, gpt-5-mini) and `openai_patch_nano` (gpt-4.1-nano,
    gpt-5-nano): 32 x 32 px patches covering the image, at most 1,536 (a larger image is
    scaled down to fit), times 1.62 (mini) or 2.46 (nano); "low detail" does not apply to
    these models, so the lever is the size sent (OpenAI, "Images and vision: calculating
    costs", 2025);
  - `gemini`: 258 tokens when both sides are at most 384 px, else 258 per 768 px tile
    (Gemini API docs, "Image understanding: token calculation");
  - `qwen2_vl` (Qwen2-VL / 2.5-VL, the open models vLLM serves): one token per 28 x 28
    pixels (14 px patches merged 2 x 2), at least 4.
* Output: the request's `max_tokens` is the reserve (what a rate limiter on the server
  also counts); the estimate of what is paid uses `expected_output_tokens`.
"""

from __future__ import annotations

import math
from typing import Optional

IMAGE_TOKEN_RULES = ("openai", "openai_patch", "openai_patch_nano", "gemini", "qwen2_vl")
PATCH_MULTIPLIER = {"openai_patch": 1.62, "openai_patch_nano": 2.46}
MAX_PATCHES = 1536
# The smallest longer side at which a verifier is asked to read an entity (landmark detail,
# a species' markings, a logo): CLIP-class encoders read 224-336 px, VLM towers 336-448.
MIN_READABLE_SIDE = 384
CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 8


def image_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from the image header, without decoding the pixels (through the
    guarded image module, like every read of image bytes)."""
    from transforms.io.images import ImageError, probe_size

    try:
        width, height, _ = probe_size(data)
    except ImageError:  # any unreadable image: no estimate
        return None
    return width, height


def image_tokens(width: int, height: int, rule: str = "openai") -> int:
    if width <= 0 or height <= 0:
        return 0
    if rule == "openai":
        scale = min(1.0, 2048 / max(width, height))
        w, h = width * scale, height * scale
        scale = min(1.0, 768 / min(w, h))
        w, h = w * scale, h * scale
        return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
    if rule in PATCH_MULTIPLIER:
        patches = math.ceil(width / 32) * math.ceil(height / 32)
        if patches > MAX_PATCHES:
            shrink = math.sqrt(MAX_PATCHES * 32 * 32 / (width * height))
            w, h = width * shrink, height * shrink
            # The side that decides is fitted to whole patches, as the provider does.
            shrink *= min(math.floor(w / 32) / (w / 32), math.floor(h / 32) / (h / 32)) if w >= 32 and h >= 32 else 1.0
            patches = min(MAX_PATCHES, math.ceil(width * shrink / 32) * math.ceil(height * shrink / 32))
        return math.ceil(patches * PATCH_MULTIPLIER[rule])
    if rule == "gemini":
        if width <= 384 and height <= 384:
            return 258
        return 258 * math.ceil(width / 768) * math.ceil(height / 768)
    if rule == "qwen2_vl":
        return max(4, round(width / 28) * round(height / 28))
    raise ValueError(f"unknown image token rule {rule!r}: one of {', '.join(IMAGE_TOKEN_RULES)}")


def cheapest_readable_side(rule: str, min_side: int = MIN_READABLE_SIDE, max_side: int = 2048) -> int:
    """The longer side (of a square image) from `min_side` up where `rule` charges least;
    of equally cheap sides the largest, since it shows more for the same price: 384 for
    patch-metered and per-pixel rules, 512 for OpenAI's tiles, 768 for Gemini's."""
    best, side_of_best = None, min_side
    for side in range(min_side, max_side + 1):
        t = image_tokens(side, side, rule)
        if best is None or t < best:
            best, side_of_best = t, side
        elif t == best:
            side_of_best = side
    return side_of_best


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def request_tokens(text: str, image: Optional[bytes], rule: str = "openai") -> tuple[int, int]:
    """(text tokens, image tokens) of one request as sent."""
    t = text_tokens(text) + MESSAGE_OVERHEAD_TOKENS
    i = 0
    if image is not None:
        size = image_size(image)
        if size is not None:
            i = image_tokens(size[0], size[1], rule)
    return t, i


def dollars(input_tokens: float, output_tokens: float, usd_in: Optional[float], usd_out: Optional[float],
            cached_tokens: float = 0, usd_cached: Optional[float] = None) -> Optional[float]:
    """Cost at prices per million tokens; None when no price is given. `cached_tokens` (of
    the input tokens, read from the provider's prefix cache) are priced at `usd_cached`
    (default: the input price)."""
    if usd_in is None and usd_out is None:
        return None
    cached = min(max(cached_tokens, 0), input_tokens)
    rate_cached = usd_in if usd_cached is None else usd_cached
    return round(
        (input_tokens - cached) * (usd_in or 0.0) / 1e6 + cached * (rate_cached or 0.0) / 1e6 + output_tokens * (usd_out or 0.0) / 1e6,
        9,
    )
