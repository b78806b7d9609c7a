"""Predict OVEN entities with a trained GIT checkpoint: beam search, optionally constrained
to valid entity codes, code -> QID.

    python -m trainer.predict --checkpoint out/model --oven oven_entity_val.jsonl \\
        --images oven_images/ --output predictions.jsonl [--decoding constrained|free] [--num_beams 4]

Images are found as `IMAGE_ID.<ext>` under --images, flat or one level of sub-folders
(OVEN's two-digit folders). `--checkpoint` is a checkpoint folder or a training --output
(its newest checkpoint).

Each output line is an OVEN prediction `{"data_id", "pred_entity_id"}` plus details:
`top_beam_entity_id` (the best beam's entity, null when that beam is not a valid code),
`first_valid_entity_id` and `first_valid_rank`, and `beams` (tokens, text, qid, score).
`pred_entity_id` is the first valid beam's entity (GER reports both top-beam and
first-valid-beam accuracy; score either with `trainer.score --prediction_field`). A line
whose image is missing or does not decode still gets a prediction line, with
`pred_entity_id` null and an `error`, so that every annotation is accounted for; the
summary counts them.

Decoding: `constrained` (default) lets beam search only extend prefixes of valid codes
(`prefix_allowed_tokens_fn` over a sorted code table), so every beam is an entity;
`free` is GER's unconstrained beam search. Question: the checkpoint's training stage
decides: fine-tuned models get each annotation's `question` (OVEN's), pre-trained ones
the first generic question; `--question` overrides both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Optional

import numpy as np

from transforms.errors import UsageError
from transforms.formats.media import IMAGE_SUFFIXES
from transforms.run.cli import Parser

log = logging.getLogger("trainer.predict")



def build_parser() -> argparse.ArgumentParser:
    p = Parser("trainer.predict", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a trainer.train --output")
    p.add_argument("--oven", required=True, help="OVEN annotation JSON lines (data_id, image_id, question, ...)")
    p.add_argument("--images", required=True, help="folder with IMAGE_ID.<ext>, flat or in sub-folders")
    p.add_argument("--output", required=True, help="predictions JSON lines")
    p.add_argument("--decoding", choices=("constrained", "free"), default="constrained", help="constrained: only valid entity codes")
    p.add_argument("--num_beams", type=int, default=4, help="beam search width")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--question", default=None, help="ask this question of every image")
    p.add_argument("--max_name_tokens", type=int, default=24, help="longest generated name (name-target models)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=int, default=0, help="predict only the first N annotations (0 = all)")
    return p


def index_images(root: str) -> dict[str, str]:
    """image id (file stem) -> path, for files directly under root or one level below."""
    if not os.path.isdir(root):
        raise UsageError(f"--images {root!r}: no such folder")
    found: dict[str, str] = {}

    def scan(folder: str, depth: int):
        with os.scandir(folder) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_dir() and depth == 0:
                    scan(e.path, 1)
                elif e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES):
                    found.setdefault(os.path.splitext(e.name)[0], e.path)

    scan(root, 0)
    if not found:
        raise UsageError(f"--images {root!r}: no image file (IMAGE_ID.jpg ...) directly under it or in its sub-folders")
    return found


def read_oven(path: str, limit: int = 0) -> tuple[list[dict], list[dict]]:
    """(annotations, bad lines) of an OVEN JSON-lines file."""
    if not os.path.exists(path):
        raise UsageError(f"--oven {path!r}: no such file")
    rows, bad = [], []
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if "data_id" not in obj or "image_id" not in obj:
                    raise ValueError("needs data_id and image_id")
            except ValueError as e:
                bad.append({"line": n, "reason": "bad_annotation", "error": str(e)[:200], "text": line[:1000]})
                continue
            rows.append(obj)
            if limit and len(rows) >= limit:
                break
    return rows, bad


def error_line(row: dict, reason: str, detail: str) -> dict:
    """The prediction line of an annotation that could not be predicted (kept, with why)."""
    return {"data_id": row["data_id"], "pred_entity_id": None, "error": reason, "detail": detail}


def load_query_image(row: dict, images: dict[str, str], draft: Optional[int] = None):
    """(decoded RGB image, None), or (None, error line) when the image is missing or broken."""
    from transforms.io.images import ImageError, decode_image

    path = images.get(str(row["image_id"]))
    if path is None:
        return None, error_line(row, "image_missing", f"no {row['image_id']}.<ext> under --images")
    try:
        with open(path, "rb") as f:
            return decode_image(f.read(), draft=(draft, draft) if draft else None).image, None
    except (OSError, ImageError) as e:
        return None, error_line(row, f"image_{getattr(e, 'reason', 'unreadable')}", str(e)[:200])


def write_predictions(path: str, lines: list[dict], bad: list[dict]) -> None:
    """Prediction lines (atomically), and annotation lines that were not OVEN JSON to
    PATH.rejected.jsonl with their reason."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    if bad:
        with open(path + ".rejected.jsonl", "w", encoding="utf-8") as f:
            for b in bad:
                f.write(json.dumps(b, ensure_ascii=False) + "\n")
        log.warning("%d annotation lines were not valid OVEN JSON: %s.rejected.jsonl", len(bad), path)


class Decoder:
    """A checkpoint ready to decode: model, tokenizer, valid sequences and their QIDs."""

    def __init__(self, checkpoint: str, device, max_name_tokens: int = 24):
        import torch
        from transformers import GitForCausalLM

        from trainer.checkpoints import read_config
        from trainer.codebook import CodeBook, PrefixIndex, bos_id, eos_id, load_tokenizer, pad_id

        self.path = checkpoint
        self.config = read_config(checkpoint)
        self.tok = load_tokenizer(checkpoint)
        self.bos, self.eos, self.pad = bos_id(self.tok), eos_id(self.tok), pad_id(self.tok)
        self.codebook = CodeBook.load(checkpoint)
        self.target = self.config.get("entity_target", "code")
        if self.target == "code":
            rows = self.codebook.codes
        else:
            if self.codebook.titles is None:
                raise UsageError("a name-target checkpoint needs titles in codes.parquet: rebuild the codes")
            seqs = [self.encode(t)[:max_name_tokens] for t in self.codebook.titles]
            width = max((len(s) for s in seqs), default=0) + 1
            rows = np.full((len(seqs), width), self.eos, dtype=np.int32)
            for i, s in enumerate(seqs):
                rows[i, : len(s)] = s
        self.index = PrefixIndex(rows, self.eos)
        self.max_new_tokens = int(rows.shape[1])
        self.model = GitForCausalLM.from_pretrained(checkpoint).to(device).eval()
        self.device = device
        self.torch = torch

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text.lower(), add_special_tokens=False).ids)

    def resolve(self, tokens: Sequence[int]) -> tuple[Optional[str], list[str]]:
        """(qid or None, other qids with the same sequence)."""
        rows = self.index.lookup(tokens)
        if not rows:
            return None, []
        qids = [str(self.codebook.qids[r]) for r in rows]
        return qids[0], qids[1:]

    def question_ids(self, question: str) -> list[int]:
        return [self.bos, *self.encode(question)]

    def generate(self, pixels, prompt_ids: list[int], num_beams: int, constrained: bool):
        """pixels (B, 3, S, S) float; one prompt shared by the batch -> per image a list of
        (tokens, score) for each beam, best first."""
        torch = self.torch
        b = pixels.shape[0]
        p = len(prompt_ids)
        input_ids = torch.tensor([prompt_ids] * b, dtype=torch.long, device=self.device)
        kwargs = {}
        if constrained:

            def allowed(_batch_id, sent):
                got = self.index.allowed(tuple(int(t) for t in sent[p:].tolist()))
                return list(got) if got else [self.eos]

            kwargs["prefix_allowed_tokens_fn"] = allowed
        with torch.no_grad():
            out = self.model.generate(
                pixel_values=pixels,
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                num_beams=num_beams,
                num_return_sequences=num_beams,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                early_stopping=True,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                bos_token_id=self.bos,
                output_scores=True,
                return_dict_in_generate=True,
                length_penalty=0.0,
                **kwargs,
            )
        seqs = out.sequences[:, p:].tolist()
        scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else [0.0] * len(seqs)
        results = []
        for i in range(b):
            beams = []
            for j in range(num_beams):
                toks = seqs[i * num_beams + j]
                cut = toks.index(self.eos) + 1 if self.eos in toks else len(toks)
                toks = [t for t in toks[:cut] if t != self.pad]
                beams.append((toks, float(scores[i * num_beams + j])))
            results.append(beams)
        return results


def run(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    from trainer.checkpoints import resolve_checkpoint

    if a.num_beams < 1 or a.batch_size < 1:
        raise UsageError("--num_beams and --batch_size must be >= 1")
    checkpoint = resolve_checkpoint(a.checkpoint)
    rows, bad = read_oven(a.oven, a.limit)
    images = index_images(a.images)
    import torch

    from trainer.data import GENERIC_QUESTIONS, OVEN_QUESTION, center_crop, normalize
    from trainer.model import image_size
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    dec = Decoder(checkpoint, device, a.max_name_tokens)
    size = image_size(dec.model)
    finetuned = dec.config.get("stage") == "finetune"
    started = time.perf_counter()
    counts: Counter = Counter()
    out_lines: dict[int, dict] = {}
    # Group by prompt so that a batch shares one prompt length (no padding inside the prompt).
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        q = a.question or (r.get("question") or dec.config.get("question") or OVEN_QUESTION if finetuned else GENERIC_QUESTIONS[0])
        groups[tuple(dec.question_ids(q))].append(i)

    def flush(prompt, batch):
        if not batch:
            return
        pixels = normalize(torch.from_numpy(np.stack([px for _, px in batch])).to(device))
        for (i, _), beams in zip(batch, dec.generate(pixels, list(prompt), a.num_beams, a.decoding == "constrained")):
            out_lines[i] = _line(rows[i], beams, dec)
            counts["predicted"] += 1

    for prompt, members in groups.items():
        batch = []
        for i in members:
            img, err = load_query_image(rows[i], images, size)
            if err is not None:
                out_lines[i] = {**err, "top_beam_entity_id": None, "first_valid_entity_id": None, "first_valid_rank": None, "beams": []}
                counts[err["error"]] += 1
                continue
            batch.append((i, np.asarray(center_crop(img, size), dtype=np.uint8).transpose(2, 0, 1).copy()))
            if len(batch) >= a.batch_size:
                flush(prompt, batch)
                batch = []
        flush(prompt, batch)

    write_predictions(a.output, [out_lines[i] for i in range(len(rows))], bad)
    lines = [out_lines[i] for i in range(len(rows))]
    summary = {
        "annotations": len(rows),
        "bad_annotation_lines": len(bad),
        "predicted": counts["predicted"],
        "errors": {k: v for k, v in counts.items() if k != "predicted"},
        "top_beam_valid": sum(1 for x in lines if x.get("top_beam_entity_id")),
        "first_valid_found": sum(1 for x in lines if x.get("first_valid_entity_id")),
        "decoding": a.decoding,
        "checkpoint": checkpoint,
        "elapsed_s": round(time.perf_counter() - started, 2),
        # Wall time per predicted image, image decoding and beam search included.
        "ms_per_image": round(1000 * (time.perf_counter() - started) / max(counts["predicted"], 1), 2),
    }
    assert summary["predicted"] + sum(summary["errors"].values()) == len(rows)
    log.info("predictions: %s -> %s", json.dumps(summary), a.output)
    return summary


def _line(row: dict, beams, dec: Decoder) -> dict:
    described = []
    for toks, score in beams:
        qid, others = dec.resolve(toks)
        beam = {"tokens": toks, "text": dec.tok.decode(toks, skip_special_tokens=True), "qid": qid, "score": round(score, 5)}
        if others:
            beam["same_sequence_qids"] = others
        described.append(beam)
    first_valid = next((k for k, b in enumerate(described) if b["qid"]), None)
    return {
        "data_id": row["data_id"],
        "pred_entity_id": described[first_valid]["qid"] if first_valid is not None else None,
        "top_beam_entity_id": described[0]["qid"] if described else None,
        "first_valid_entity_id": described[first_valid]["qid"] if first_valid is not None else None,
        "first_valid_rank": first_valid,
        "beams": described,
    }


if __name__ == "__main__":
    from transforms.run.cli import cli_main

    cli_main(run)
