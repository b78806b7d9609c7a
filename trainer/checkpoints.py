"""Checkpoints of a training --output, shared by trainer.train (GIT) and trainer.contrastive
(the WikiCLIP-style adaptor): where they live, which one is the newest complete one, how one
is published atomically, and how a run resumes from one.

Layout (a public interface: predict, inspect and users read it):

    <output>/checkpoints/step-NNNNNNN/    the trainer's own files, optimizer.pt,
                                          train_config.json (the run's flags) and
                                          train_state.json (step, samples, skipped, ...;
                                          written last: a folder with it is complete)
    <output>/checkpoints/latest           the newest one's folder name

A checkpoint is written into `staging_folder(output, step)` (`.step-NNNNNNN.tmp`) and
finished by `publish_checkpoint`, so a kill mid-save leaves the previous one the newest.
At start-up `resume(output, flag, config, model_flags)` turns `--resume auto|never|PATH`
into (the checkpoint to resume from or None, the training state to continue).

Neither torch nor Beam is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from typing import Optional

from transforms.errors import UsageError

log = logging.getLogger("trainer.checkpoints")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "train_state.json"
CONFIG_FILE = "train_config.json"
OPTIMIZER_FILE = "optimizer.pt"


def new_state() -> dict:
    """The training state of a run that starts from step 0."""
    return {"step": 0, "samples": 0, "skipped": {}, "elapsed_s": 0.0, "resumed_from": []}


# --------------------------------------------------------------------------------------
# Finding
# --------------------------------------------------------------------------------------


def _complete_checkpoints(root: str) -> list[str]:
    """Checkpoint folders that were saved to the end (renamed from their temporary name,
    with their state file), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.exists(os.path.join(root, d, STATE_FILE)))
    return [os.path.join(root, d) for d in names]


def latest_checkpoint(output: str) -> Optional[str]:
    """The newest checkpoint of a training --output, or None when it has none.

    `checkpoints/latest` names it. When the pointer is missing but complete checkpoints
    exist (a kill between the rename and the pointer), the newest of them is used. When
    the pointer names a folder that is gone, the newest complete one is used with a
    warning; with none left this is an error, never a silent restart from step 0.
    """
    root = os.path.join(output, CHECKPOINTS)
    pointer = os.path.join(root, LATEST)
    complete = _complete_checkpoints(root)
    if not os.path.exists(pointer):
        return complete[-1] if complete else None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    if complete:
        log.warning("%s names %r, which is missing or incomplete; resuming from %s", pointer, name, complete[-1])
        return complete[-1]
    raise UsageError(
        f"{pointer} names checkpoint {name!r}, which is missing, and no other complete checkpoint is in {root}: "
        "restore it, or pass --resume never (or a new --output) to start from step 0 on purpose"
    )


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a training --output folder (its newest checkpoint)."""
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    found = latest_checkpoint(path)
    if found:
        return found
    raise UsageError(f"--checkpoint {path!r} is neither a checkpoint folder nor a training --output with checkpoints")


def read_config(checkpoint: str) -> dict:
    """The flags of the run that saved `checkpoint` (its train_config.json)."""
    with open(os.path.join(checkpoint, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def read_state(checkpoint: str) -> dict:
    """The training state saved with `checkpoint` (its train_state.json)."""
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------


def _name(step: int) -> str:
    return f"step-{step:07d}"


def staging_folder(output: str, step: int) -> str:
    """An empty temporary folder (`<output>/checkpoints/.step-NNNNNNN.tmp`, left-overs of an
    earlier kill removed) to write the checkpoint of `step` into before `publish_checkpoint`."""
    root = os.path.join(output, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{_name(step)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_checkpoint(output: str, step: int, config: dict, state: dict, keep: int) -> str:
    """Finish the checkpoint written to `staging_folder(output, step)`: config and state
    files (the state last: it marks a complete checkpoint), rename to `step-NNNNNNN`, point
    `latest` at it, keep the newest `keep` (at least 1). Returns its folder."""
    root = os.path.join(output, CHECKPOINTS)
    name = _name(step)
    tmp = os.path.join(root, f".{name}.tmp")
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    final = os.path.join(root, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(root, LATEST + ".tmp"), "w", encoding="utf-8") as f:
        f.write(name)
    os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for old in steps[: max(0, len(steps) - max(1, keep))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------


def resume(output: str, flag: str, config: dict, model_flags: Iterable[str]) -> tuple[Optional[str], dict]:
    """(checkpoint to resume from or None, training state) for `--resume flag`.

    `auto`: the newest checkpoint in `output`, if any (see latest_checkpoint); `never`:
    none; anything else: that checkpoint folder or training --output (resolve_checkpoint).
    A resumed run must agree with the checkpoint on `model_flags` (the flags that change
    what a checkpoint means; `config` holds this run's values): a difference is a
    UsageError naming the flag. The state is the checkpoint's, with the checkpoint appended
    to its `resumed_from`, or `new_state()`. The caller loads its own weights and optimizer.
    """
    if flag == "auto":
        resume_from = latest_checkpoint(output)
    elif flag == "never":
        resume_from = None
    else:
        resume_from = resolve_checkpoint(flag)
    if not resume_from:
        return None, new_state()
    saved = read_config(resume_from)
    for k in model_flags:
        if saved.get(k) != config.get(k):
            raise UsageError(
                f"--{k} {config.get(k)!r} differs from the checkpoint's {saved.get(k)!r} in {resume_from}: "
                "pass the same value, --resume never, or a new --output"
            )
    state = read_state(resume_from)
    state.setdefault("resumed_from", []).append(resume_from)
    return resume_from, state
