"""Token and dollar estimates for LLM requests, before they are sent.

Used by the job-wide token budget (a request's tokens are reserved before it goes and
the difference settled when the usage comes back) and by `refine --estimate_only`.

* Text: one token per four characters of the rendered messages (OpenAI's rule of thumb
  for English; tokenizers of other families differ by about 10-20 %).
* Images, after the downscale refine applies before sending (`--max_image_side`), by the
  rule of the serving family (`--image_tokens`):
  - `openai` (GPT-4o / 4.1, detail high): fit in 2048 x 2048, shorter side to 768, then
    170 tokens per 512 px tile + 85;
  - `gemini`: 258 tokens when both sides are at most 384 px, else 258 per 768 px tile;
  - `qwen2_vl` (Qwen2-VL / 2.5-VL, the open models vLLM serves): one token per 28 x 28
    pixels (14 px patches merged 2 x 2), at least 4.
* Output: the request's `max_tokens` is the reserve (what a rate limiter on the server
  also counts); the estimate of what is paid uses `expected_output_tokens`.
"""

from __future__ import annotations

import math
from typing import Optional

IMAGE_TOKEN_RULES = ("openai", "gemini", "qwen2_vl")
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
    if rule == "gemini":
        if width <= 384 and height <= 384:
            return 258
        return 258 * math.ceil(width / 768) * math.ceil(height / 768)
    if rule == "qwen2_vl":
        return max(4, round(width / 28) * round(height / 28))
    raise ValueError(f"unknown image token rule {rule!r}: one of {', '.join(IMAGE_TOKEN_RULES)}")


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


def dollars(input_tokens: float, output_tokens: float, usd_in: Optional[float], usd_out: Optional[float]) -> Optional[float]:
    """Cost at prices per million tokens; None when no price is given."""
    if usd_in is None and usd_out is None:
        return None
    return round(input_tokens * (usd_in or 0.0) / 1e6 + output_tokens * (usd_out or 0.0) / 1e6, 9)
