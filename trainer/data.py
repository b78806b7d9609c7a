"""Streaming training data over the project's shards: Parquet, TFRecord, webdataset.

Shards are cut into *units* (a Parquet row group, a whole TFRecord or tar file). Every
(rank, data-loader worker) pair reads a disjoint set of units, reshuffled each epoch with
the same seed everywhere, so no sample is read twice per epoch across the whole job; when
there are fewer units than readers, every reader scans all units and keeps every n-th
record instead. A shuffle buffer mixes records across units. The stream repeats until the
trainer stops it (`--max_steps`).

Corrupt input never stops training: an unreadable file, a TFRecord frame with a bad CRC,
a record that does not parse, an image that does not decode, a QID without a code, an
empty target — each is skipped and counted by reason. Counts ride along with the next
item to the main process (data-loader workers are separate processes) and the trainer
sums them over ranks. A reader that finds no usable sample in a whole epoch stops (with a
warning and its counts); when every reader of a rank has stopped, training fails with an
error that names the likely causes.

Tasks (REW multi-task training, GER's entity task):
  entity     question -> the entity's code tokens (ALD) or its name (`--entity_target name`)
  rationale  "why ..." question -> the REW rationale
  qa         one of the REW question-answer pairs
mixed per sample by `--task_weights` among the tasks the sample has targets for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from transforms.errors import UsageError
from transforms.formats.files import Skip, match_files
from transforms.formats.shards import iter_shard_records, shard_kind
from transforms.formats.shards import units as shard_units
from transforms.formats.tfrecord import iter_tfrecord, masked_crc  # noqa: F401 - part of this module's API
from transforms.io.images import ImageError, decode_image

_masked_crc = masked_crc

log = logging.getLogger("trainer.data")

TASKS = ("entity", "rationale", "qa")

# GER pre-trains with generic questions; the paper names "what is the main object?" and
# "what is shown in the photo?" among six. The other four are ours, in the same spirit.
GENERIC_QUESTIONS = (
    "what is the main object?",
    "what is shown in the photo?",
    "what is in this image?",
    "what is this?",
    "what does this picture show?",
    "what is the subject of this photo?",
)
# OVEN's entity-split question (used when the record carries no question of its own).
OVEN_QUESTION = "what is this?"
RATIONALE_QUESTION = "why is this image showing this entity?"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

COLUMNS = ("key", "image", "qid", "title", "rationale", "qa_json", "question", "meta_json", "candidate_qid")


# --------------------------------------------------------------------------------------
# Units and record readers
# --------------------------------------------------------------------------------------


def list_units(pattern: str, flag: str = "--train") -> list[tuple[str, int]]:
    """(path, row group) for Parquet, (path, -1) for TFRecord and tar shards."""
    files = match_files(pattern, flag)
    kinds = {p: shard_kind(p) for p in files}
    unknown = [p for p, k in kinds.items() if not k]
    files = [p for p in files if kinds[p]]
    if not files:
        raise UsageError(
            f"{flag} {pattern!r}: no shard (.parquet, .tfrecord[.gz], .tar) among {len(unknown)} files; "
            "point it at the output of decontaminate or refine"
        )
    units = []
    for p in files:
        try:
            units += shard_units(p)
        except Exception:  # noqa: BLE001 - a broken file: the worker reads it again and counts it
            units.append((p, 0))
    return units


def iter_unit(unit: tuple[str, int]) -> Iterator[dict | Skip]:
    """Rows (dicts with COLUMNS) of one unit, or Skip markers; never raises."""
    path = unit[0]
    try:
        for item in iter_shard_records(unit, required=("image", "qid")):
            if isinstance(item, Skip):
                yield item
                continue
            yield {c: item.row.get(c) for c in COLUMNS}
    except Exception as e:  # noqa: BLE001 - a broken file is skipped, the stream goes on
        yield Skip("unreadable_file", f"{path}: {type(e).__name__}: {e}"[:300])


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def inception_crop(img, size: int, rng: random.Random, min_scale: float):
    """Random area fraction in [min_scale, 1] and aspect ratio in [3/4, 4/3], resized to
    size x size (the Inception / RandomResizedCrop augmentation); centre crop fallback."""
    from PIL import Image

    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    return center_crop(img, size)


def center_crop(img, size: int):
    """Shorter side to `size`, then the central square (CLIP / GIT evaluation transform)."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    x, y = (w - s) // 2, (h - s) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x, y, x + s, y + s))


def image_to_uint8(data: bytes, size: int, crop: str, rng: Optional[random.Random], min_scale: float = 0.08) -> np.ndarray:
    """Encoded bytes -> (3, size, size) uint8, or ImageError. Normalisation happens on the
    device, so workers ship a quarter of the bytes of float32."""
    decoded = decode_image(data, draft=(size, size))
    img = decoded.image
    if crop == "inception" and rng is not None:
        img = inception_crop(img, size, rng, min_scale)
    else:
        img = center_crop(img, size)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize(pixels_uint8, mean=CLIP_MEAN, std=CLIP_STD):
    """(B, 3, S, S) uint8 tensor -> float32 CLIP-normalised, on the tensor's device."""
    import torch

    x = pixels_uint8.float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------


def parse_task_weights(value: str) -> dict[str, float]:
    """'entity=1,rationale=0.5,qa=0.5' -> weights; unknown task or bad number: UsageError."""
    weights = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, sep, w = part.partition("=")
        name = name.strip()
        if name not in TASKS or not sep:
            raise UsageError(f"--task_weights: {part!r} is not TASK=WEIGHT with TASK in {', '.join(TASKS)}")
        try:
            weights[name] = float(w)
        except ValueError:
            raise UsageError(f"--task_weights: weight {w!r} of {name} is not a number") from None
        if weights[name] < 0:
            raise UsageError(f"--task_weights: weight of {name} is negative")
    if not any(v > 0 for v in weights.values()):
        raise UsageError("--task_weights: give at least one task a positive weight, e.g. entity=1")
    return weights


@dataclass
class ItemBuilder:
    """Turns a shard row into a training item in a data-loader worker. Picklable."""

    tokenizer_json: str
    codebook: object  # trainer.codebook.CodeBook
    image_size: int
    task_weights: dict[str, float]
    entity_target: str = "code"  # code | name
    stage: str = "pretrain"  # pretrain: generic questions; finetune: the OVEN question
    question: str = OVEN_QUESTION
    crop: str = "inception"
    crop_min_scale: float = 0.08
    max_text_tokens: int = 64
    _tok: Optional[object] = field(default=None, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tok"] = None  # rebuilt in each worker
        return state

    @property
    def tok(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.tokenizer_json)
            from trainer.codebook import bos_id, eos_id

            self._bos, self._eos = bos_id(self._tok), eos_id(self._tok)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text.lower(), add_special_tokens=False).ids)

    def question_for(self, row: dict, rng: random.Random) -> str:
        if self.stage == "pretrain":
            return rng.choice(GENERIC_QUESTIONS)
        q = row.get("question")
        if not q and row.get("meta_json"):
            try:
                q = json.loads(row["meta_json"]).get("question")
            except (ValueError, AttributeError):
                q = None
        return q or self.question

    def targets(self, row: dict) -> dict[str, tuple[str, list[int]]]:
        """task -> (question text or None for the entity task, target token ids with EOS)."""
        out = {}
        eos = self._eos
        if self.task_weights.get("entity", 0) > 0:
            if self.entity_target == "code":
                code = self.codebook.code_of(row.get("qid") or "")
                if code is not None:
                    out["entity"] = (None, code)
            elif row.get("title"):
                out["entity"] = (None, self.encode(row["title"])[: self.max_text_tokens - 1] + [eos])
        if self.task_weights.get("rationale", 0) > 0 and (row.get("rationale") or "").strip():
            out["rationale"] = (RATIONALE_QUESTION, self.encode(row["rationale"]) + [eos])
        if self.task_weights.get("qa", 0) > 0 and row.get("qa_json"):
            try:
                pairs = [p for p in json.loads(row["qa_json"]) if p.get("question") and p.get("answer")]
            except (ValueError, AttributeError, TypeError):
                pairs = []
            if pairs:
                out["qa"] = pairs  # chosen per draw
        return out

    def build(self, row: dict, rng: random.Random) -> dict:
        """-> item dict, or raises Skip."""
        tok = self.tok  # noqa: F841 - loads the tokenizer, sets _bos/_eos
        qid = row.get("qid") or ""
        if not qid:
            raise Skip("missing_qid")
        available = self.targets(row)
        if not available:
            if self.entity_target == "code" and self.codebook.row_of(qid) < 0:
                raise Skip("qid_not_in_codes", qid)
            raise Skip("no_target", "no task of --task_weights has a target in this record")
        names = sorted(available)
        task = rng.choices(names, weights=[self.task_weights[n] for n in names])[0]
        if task == "qa":
            pair = rng.choice(available["qa"])
            question, target = pair["question"], self.encode(str(pair["answer"])) + [self._eos]
        else:
            question, target = available[task]
            if question is None:
                question = self.question_for(row, rng)
        q_ids = self.encode(str(question))
        budget = self.max_text_tokens - 1  # BOS
        if len(q_ids) + len(target) > budget:
            q_ids = q_ids[: max(budget // 2, budget - len(target))]
            target = target[: budget - len(q_ids)]
        if len(target) < 2 and task != "entity":
            raise Skip("no_target", f"empty {task} text")
        try:
            pixels = image_to_uint8(row.get("image") or b"", self.image_size, self.crop, rng, self.crop_min_scale)
        except ImageError as e:
            raise Skip(f"image_{e.reason}", str(e)[:200]) from None
        return {
            "pixels": pixels,
            "input_ids": [self._bos, *q_ids, *target],
            "n_prompt": 1 + len(q_ids),
            "task": TASKS.index(task),
            "qid": qid,
            "key": row.get("key"),
        }


# --------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


try:  # torch is a dependency of the trainer, not of the pipelines that import this module
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover
    _Base = object


class ShardStream(_Base):
    """An endless, sharded, shuffled stream of training items (see the module docstring)."""

    def __init__(
        self,
        units: Sequence[tuple[str, int]],
        builder: ItemBuilder,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: Optional[int] = None,
        world: Optional[int] = None,
        start_step: int = 0,
        max_epochs: Optional[int] = None,
    ):
        self.units = list(units)
        self.builder = builder
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world = rank, world
        self.start_step = start_step
        self.max_epochs = max_epochs

    def reader_slot(self) -> tuple[int, int]:
        import torch.utils.data as tud

        info = tud.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = (self.rank, self.world) if self.rank is not None else _dist_rank_world()
        return rank * nw + wid, world * nw

    def _records(self, slot: int, total: int, epoch: int, skipped: Counter) -> Iterator[dict]:
        order = list(self.units)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_unit = len(order) >= total
        mine = order[slot::total] if by_unit else order
        n = 0
        for unit in mine:
            for rec in iter_unit(unit):
                if not by_unit:
                    n += 1
                    if (n - 1) % total != slot:
                        continue
                if isinstance(rec, Skip):
                    skipped[rec.reason] += 1
                    continue
                yield rec

    def _items(self, slot: int, total: int, rng: random.Random, skipped: Counter) -> Iterator[dict]:
        epoch = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            produced = 0
            for row in self._records(slot, total, epoch + 1000 * self.start_step, skipped):
                try:
                    item = self.builder.build(row, rng)
                except Skip as s:
                    skipped[s.reason] += 1
                    continue
                produced += 1
                yield item
            if produced == 0:
                # Nothing usable for this reader (too few records for this many readers, or
                # only bad ones): it ends, the others go on. If every reader of a rank ends,
                # the trainer stops with an error that says so.
                log.warning(
                    "data reader %d of %d has no usable training sample in %d shard units (skipped: %s); it stops",
                    slot, total, len(self.units), dict(skipped) or "none",
                )
                return
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        slot, total = self.reader_slot()
        # A resumed run draws a different order than the first run did from step 0.
        rng = random.Random(f"{self.seed}:{slot}:{self.start_step}")
        skipped: Counter = Counter()
        items = self._items(slot, total, rng, skipped)
        # Shuffle buffer: starts yielding at `initial` items and grows to its capacity by
        # taking two items per item given out, so the first batch comes quickly.
        capacity = self.shuffle_buffer
        initial = min(capacity, 64)
        buffer: list[dict] = []

        def give():
            out = buffer.pop(rng.randrange(len(buffer)))
            out["skipped"] = dict(skipped)
            skipped.clear()
            return out

        for item in items:
            buffer.append(item)
            if len(buffer) < capacity:
                nxt = next(items, None)
                if nxt is not None:
                    buffer.append(nxt)
            if len(buffer) >= initial:
                yield give()
        while buffer:
            yield give()


def collate(items: list[dict]) -> dict:
    """Pad a list of items into a batch (right padding; PAD = 0)."""
    import torch

    b = len(items)
    t = max(len(it["input_ids"]) for it in items)
    input_ids = torch.zeros((b, t), dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    rows, cols, labels, owner = [], [], [], []
    for i, it in enumerate(items):
        ids = it["input_ids"]
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        # The hidden state at text position p predicts token p + 1.
        for p in range(it["n_prompt"], len(ids)):
            rows.append(i)
            cols.append(p - 1)
            labels.append(ids[p])
            owner.append(i)
    skipped: Counter = Counter()
    for it in items:
        skipped.update(it.get("skipped") or {})
    return {
        "pixels": torch.from_numpy(np.stack([it["pixels"] for it in items])),
        "input_ids": input_ids,
        "attention_mask": attention,
        "label_rows": torch.tensor(rows, dtype=torch.long),
        "label_cols": torch.tensor(cols, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "tasks": torch.tensor([it["task"] for it in items], dtype=torch.long),
        "skipped": dict(skipped),
    }
