"""What a run moved and what it wrote: per-shuffle counters and the end-of-run summary.

Every shuffle of a pipeline (GroupByKey, CoGroupByKey, a per-key or global combine) is
preceded by `MeasureShuffle(step)`, which counts the elements and the approximate bytes that
enter it as `shuffle_<step>_elements` / `shuffle_<step>_bytes`. A combine is measured on its
input, before Beam lifts the combiner, so its figure is an upper bound of what crosses the
network. `finish_run` turns the counters into the manifest's `shuffles` table, writes
`manifest.json` and prints the summary every pipeline ends with.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any, Optional

import apache_beam as beam

from transforms.errors import AccountingError, UsageError
from transforms.formats.files import read_json, write_json
from transforms.io.writers import REJECTS_EMITTED, REJECTS_WRITTEN, WRITTEN_PREFIX, files_summary
from transforms.report.card import write_card_safely
from transforms.run.lineage import stamp
from transforms.run.shuffles import SHUFFLE_PREFIX, format_shuffles, shuffle_report
from transforms.run.version import code_version

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# What was written: listed in the manifest, checked by the next pipeline
# --------------------------------------------------------------------------------------

WRITTEN_DIR = "_written"
# Beam's default shard names: <name>-SSSSS-of-NNNNN<suffix>.
_SHARD_NAME = re.compile(r"^(?P<name>.+)-\d{5}-of-\d{5}(?P<suffix>\.[A-Za-z0-9.]+)$")


class RecordWritten(beam.PTransform):
    """File summaries (`{"format", "files", "rows", "bytes"}`, as WriteShards returns them)
    -> `<output>/_written/<name>.json`, which `finish_run` moves into the manifest."""

    def __init__(self, output: str, name: str):
        super().__init__()
        self.path = f"{output.rstrip('/')}/{WRITTEN_DIR}/{name}"
        self.name = name

    def expand(self, summaries):
        name = self.name
        return (
            summaries
            | "All" >> beam.combiners.ToList()
            | "Json" >> beam.Map(lambda xs: json.dumps({"name": name, "outputs": sorted(xs, key=lambda x: x["format"])}, sort_keys=True))
            | "Write" >> beam.io.WriteToText(self.path, file_name_suffix=".json", shard_name_template="", num_shards=1)
        )


def format_counters(counters: dict[str, int], title: str = "counters") -> str:
    if not counters:
        return f"{title}: (none reported)"
    width = max(len(k) for k in counters)
    lines = [title, "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12,}" for k, v in counters.items()]
    return "\n".join(lines)


def summarize_files(fmt: str = "parquet") -> beam.PTransform:
    """Counted files (`CountWritten`'s dicts) -> one summary like WriteShards'."""
    return beam.combiners.ToList() | beam.Map(files_summary, fmt)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path


def read_written(output: str) -> list[dict]:
    """The file lists the run recorded under `<output>/_written/`, paths made relative to
    `output` (so a moved folder still checks)."""
    from apache_beam.io.filesystems import FileSystems

    out = output.rstrip("/")
    try:
        found = FileSystems.match([f"{out}/{WRITTEN_DIR}/*.json"])[0].metadata_list
    except Exception:  # noqa: BLE001 - nothing recorded
        return []
    entries = []
    for m in sorted(found, key=lambda m: m.path):
        rec = read_json(m.path)
        for o in rec["outputs"]:
            entries.append(
                {
                    "name": rec["name"],
                    "format": o["format"],
                    "files": [
                        {"path": _relative(p, out), "rows": o["rows"][p], "bytes": o["bytes"][p]} for p in o["files"]
                    ],
                }
            )
    return entries


def written_gaps(counters: dict, stage: str, expected: int, what: str, formats) -> list[str]:
    """One problem per format whose files do not hold exactly `expected` rows of `what`
    (counter `written_<what>_<format>`, counted in the finished files)."""
    problems = []
    for fmt in formats:
        n = counters.get(f"{WRITTEN_PREFIX}{what}_{fmt}", 0)
        if n != expected:
            problems.append(f"{stage}: {expected} {what} to write != {n} rows in the {fmt} files")
    return problems


def prepare_output(output: str, names: tuple[str, ...]) -> list[str]:
    """Make `output` ready for a (re-)run: remove the manifest, the recorded file lists and
    the shard and reject files an earlier, possibly killed run left there (Beam names them
    `<name>-SSSSS-of-NNNNN.*`, and a re-run with another shard count would not overwrite
    them). Other files (caches, a reused eval set) stay. Returns what was removed."""
    from apache_beam.io.filesystems import FileSystems

    out = output.rstrip("/")
    patterns = [f"{out}/manifest.json", f"{out}/{WRITTEN_DIR}/*"]
    patterns += [f"{out}/{n}-*-of-*" for n in names]
    patterns += [f"{out}/rejected/*/rejects-*-of-*"]
    removed = []
    for pat in patterns:
        try:
            matches = FileSystems.match([pat])[0].metadata_list
        except Exception:  # noqa: BLE001 - nothing there
            continue
        paths = [m.path for m in matches if pat.endswith("manifest.json") or _SHARD_NAME.match(m.path.rsplit("/", 1)[-1]) or WRITTEN_DIR in m.path]
        if paths:
            FileSystems.delete(paths)
            removed += paths
    return removed + remove_beam_temp(out)


# Beam's file sinks write each shard into `beam-temp-<prefix>-<uuid1 hex>/` beside the
# output and rename it into place when the job finishes; a failed or killed job leaves that
# folder with partial shards in it.
_BEAM_TEMP = re.compile(r"^beam-temp-.+-[0-9a-f]{32}$")


def remove_beam_temp(output: str) -> list[str]:
    """The temporary folders Beam's sinks left in `output` (and in its `rejected/<stage>/`,
    `_written/`, `eval_set/` folders) when a run did not finish. Only folders named as
    Beam names them are touched; a user's other files stay. Returns what was removed."""
    out = output.rstrip("/")
    removed = []
    if "://" not in out:
        import shutil

        if not os.path.isdir(out):
            return removed
        for folder, dirs, _ in os.walk(out):
            depth = folder[len(out):].count(os.sep)
            for d in list(dirs):
                if _BEAM_TEMP.match(d):
                    path = os.path.join(folder, d)
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
                    dirs.remove(d)
            if depth >= 2:
                dirs[:] = []
        return removed
    from apache_beam.io.filesystems import FileSystems

    try:
        matches = FileSystems.match([f"{out}/**"])[0].metadata_list
    except Exception:  # noqa: BLE001 - nothing there
        return removed
    rel = [(m.path, m.path[len(out) + 1:].split("/")) for m in matches]
    paths = [p for p, parts in rel if any(_BEAM_TEMP.match(x) for x in parts[:-1][:3])]
    if paths:
        FileSystems.delete(paths)
        removed += paths
    return removed


def check_finished_input(files: list[str], flag: str, allow_unfinished: bool = False) -> list[str]:
    """Refuse shards of ours that no finished run vouches for.

    For each folder holding files named like our shards (`<name>-SSSSS-of-NNNNN.<ext>`),
    its `manifest.json` must exist and list them: a folder without one is the output of a
    run that did not finish (killed, failed), and files the manifest does not list are
    left over from an earlier run. Files of other tools (img2dataset's 00000.tar) are not
    checked. Returns warnings (manifests from before file lists were recorded).
    """
    from apache_beam.io.filesystems import FileSystems

    by_dir: dict[str, list[str]] = {}
    for f in files:
        folder, _, base = f.rpartition("/")
        if _SHARD_NAME.match(base):
            by_dir.setdefault(folder, []).append(f)
    warnings = []
    for folder, ours in sorted(by_dir.items()):
        manifest_path = f"{folder}/manifest.json"
        hint = (
            f"re-run the pipeline that writes {folder!r} with the same --output (it starts clean, and refine "
            "re-pays nothing from its cache), or pass --allow_unfinished_input to read it anyway"
        )
        if not FileSystems.exists(manifest_path):
            if allow_unfinished:
                warnings.append(f"{folder}: no manifest.json; reading it anyway (--allow_unfinished_input)")
                continue
            raise UsageError(f"{flag}: {folder!r} has no manifest.json, so the run that writes it did not finish; {hint}")
        manifest = read_json(manifest_path)
        listed = {x["path"] for entry in manifest.get("files", []) for x in entry["files"]}
        if "files" not in manifest:
            warnings.append(f"{folder}: manifest.json lists no files (written by an older version); not checked")
            continue
        extra = sorted(_relative(f, folder) for f in ours if _relative(f, folder) not in listed)
        missing = sorted(p for p in listed if not FileSystems.exists(f"{folder}/{p}"))
        if (extra or missing) and not allow_unfinished:
            what = []
            if extra:
                what.append(f"{len(extra)} file(s) its manifest does not list (left by an earlier run?): {extra[:3]}")
            if missing:
                what.append(f"{len(missing)} listed file(s) missing: {missing[:3]}")
            raise UsageError(f"{flag}: {folder!r} does not match its manifest.json: {'; '.join(what)}; {hint}")
    return warnings


def _prune_empty_reject_dirs(out: str) -> None:
    """A stage that rejected nothing writes no file, but Beam leaves its (empty) folder on a
    local disk; remove those, and `rejected/` itself when nothing was rejected. Object
    stores have no folders."""
    import os

    root = os.path.join(out, "rejected")
    if "://" in out or not os.path.isdir(root):
        return
    for stage in os.listdir(root):
        path = os.path.join(root, stage)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    if not os.listdir(root):
        os.rmdir(root)


def rows_listed(files: list[str]) -> Optional[int]:
    """The rows of these input shards as their runs' manifests list them (None when any
    file is not listed: img2dataset shards, an older manifest): the total a progress ETA
    counts down."""
    from apache_beam.io.filesystems import FileSystems

    by_dir: dict[str, list[str]] = {}
    for f in files:
        folder, _, base = f.rpartition("/")
        by_dir.setdefault(folder, []).append(base)
    total = 0
    for folder, bases in by_dir.items():
        try:
            if not FileSystems.exists(f"{folder}/manifest.json"):
                return None
            manifest = read_json(f"{folder}/manifest.json")
        except Exception:  # noqa: BLE001 - no ETA then
            return None
        rows = {}
        for entry in manifest.get("files") or []:
            if isinstance(entry, dict) and entry.get("format") in ("parquet", None):
                rows.update({x["path"]: int(x.get("rows", 0)) for x in entry.get("files", [])})
        for base in bases:
            if base not in rows:
                return None
            total += rows[base]
    return total


def finish_run(
    *,
    name: str,
    output: str,
    kind: str,
    counters: dict[str, int],
    seconds: float,
    started: dt.datetime,
    check: Callable[[dict], list[str]],
    fields: Optional[dict] = None,
    base: Optional[dict] = None,
    lines: tuple[str, ...] = (),
    fail_on_gap: bool = True,
    runner: Optional[dict] = None,
) -> dict:
    """Write `<output>/manifest.json` and print the run's summary.

    `base` is a manifest a step already wrote (its fields are kept); `fields` are this
    pipeline's own entries; counters, the shuffle table, the count check, timing and code
    version are added here so every manifest carries them the same way, and the file lists
    the run recorded (`RecordWritten`). The manifest is written last. When a count identity
    fails (`check`, and rejects emitted = reject lines written), the manifest says so and
    AccountingError is raised: the command exits non-zero, naming the stage and the gap.
    """
    problems = list(check(counters))
    if REJECTS_EMITTED in counters and counters.get(REJECTS_EMITTED, 0) != counters.get(REJECTS_WRITTEN, 0):
        problems.append(
            f"write_rejects: {counters.get(REJECTS_EMITTED, 0)} rejects emitted != "
            f"{counters.get(REJECTS_WRITTEN, 0)} lines in the reject files"
        )
    from transforms.run.secrets import redact_value

    manifest = dict(base or {})
    # Options and inputs as the user gave them, minus credentials (URL user info and query
    # strings, secret-named values such as a vLLM `api-key=` argument).
    manifest.update({"kind": kind, **redact_value(fields or {})})
    if runner:
        manifest["runner"] = runner  # its name and the size it ran at (a Dask cluster's workers)
    out = output.rstrip("/")
    written = read_written(out)
    # Files that could not be read to their end: their rows after the damage are unknown,
    # so the run is complete only up to them, and says so instead of "ok".
    incomplete = {
        k[len("rejected_") : -len("_files")]: v
        for k, v in sorted(counters.items())
        if k.startswith("rejected_") and k.endswith("_files") and v
    }
    if problems:
        verdict: Any = problems
    elif incomplete:
        verdict = (
            f"incomplete: {sum(incomplete.values())} input file(s) could not be read to the end "
            f"({', '.join(f'{k}: {v}' for k, v in incomplete.items())}); their records after the damage "
            "are not in any count (see rejected/)"
        )
    else:
        verdict = "ok"
    manifest.update(
        {
            "counters": counters,
            "shuffles": shuffle_report(counters),
            "count_check": verdict,
            "incomplete_files": incomplete,
            "seconds": round(seconds, 2),
            "code_version": code_version(),
            "created": started.isoformat(timespec="seconds"),
        }
    )
    if written:
        manifest["files"] = written
    _prune_empty_reject_dirs(out)
    # Which outputs of ours it read (their fingerprints) and its own: what `pipelines.run`
    # compares to tell whether this output is up to date.
    stamp(manifest, manifest.get("options") if isinstance(manifest.get("options"), dict) else {}, out)
    # Written last: a manifest says the run finished, and lists what it wrote.
    write_json(f"{out}/manifest.json", manifest)
    print(format_counters({k: v for k, v in counters.items() if not k.startswith(SHUFFLE_PREFIX)}, f"{name} counters"))
    print(format_shuffles(manifest["shuffles"]))
    print(f"count check: {manifest['count_check']}")
    for line in lines:
        print(line)
    card = write_card_safely(out, manifest)
    if card:
        print(f"card: {card['card']}" + (f"   viewer: {card['viewer']}" if card.get("viewer") else ""))
    if problems and fail_on_gap:
        raise AccountingError(
            f"{name}: the counts do not add up, records were lost or repeated: " + "; ".join(problems)
            + f" (counters in {out}/manifest.json)"
        )
    return manifest


MAX_LISTED_INPUTS = 1000


def input_summary(pattern: str, files: list[str]) -> dict:
    """The inputs as a manifest records them: the pattern, the count, and the files
    themselves up to MAX_LISTED_INPUTS (a web corpus has hundreds of thousands)."""
    return {
        "pattern": pattern,
        "files": len(files),
        "listed": files[:MAX_LISTED_INPUTS],
        "truncated": len(files) > MAX_LISTED_INPUTS,
    }
