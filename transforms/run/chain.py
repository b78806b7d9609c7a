"""Running a recipe like make: each stage runs only when its output is not up to date, and
then everything downstream of it runs too.

A stage of ours is up to date when its output's `manifest.json` exists, its count check
is ok, the options it recorded equal what the recipe asks now (`threads` and
`progress_interval`, which change how and not what, aside) and the inputs it read are the
ones it recorded (`upstream`: the fingerprint of each input's manifest; a re-run of an
input writes a new one). A stage that runs another program (`run:`) is up to date when
the stamp the chain wrote after it finished (`_stage.json` in its output folder) has the
same arguments and every declared output matches a file. Forced stages (`--force`) run.

What a chain writes in its output root: `recipe.yaml` (the recipe it ran, so a dataset
says how it was made), `chain.json` (each stage: its command, ran or skipped and why,
seconds, count check) and `README.md`, the chain's summary linking each stage's card and
viewer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import json
import os
import subprocess
import sys
import time
from typing import Optional

from transforms.errors import UsageError
from transforms.formats.files import is_url, read_json, write_json
from transforms.run.lineage import FINGERPRINT, UPSTREAM, content_hash, upstream_of
from transforms.run.recipe import COMMANDS, Recipe, Stage, parsed_options, parser_of

# Options that change how a stage runs, not what it makes.
HOW_OPTIONS = frozenset({"threads", "progress_interval"})
STAMP = "_stage.json"
CHAIN_FILE = "chain.json"
RECIPE_FILE = "recipe.yaml"


class ChainError(Exception):
    """A stage failed; the chain stopped there (finished stages stay finished)."""


@dataclasses.dataclass
class Decision:
    stage: Stage
    run: bool
    reason: str
    status: str = "pending"  # ran | skipped | failed | pending | dry_run
    seconds: float = 0.0
    error: str = ""


def _exists(path: str) -> bool:
    if is_url(path):
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.exists(path)
    return os.path.exists(path)


def _manifest(folder: str) -> Optional[dict]:
    path = f"{folder.rstrip('/')}/manifest.json"
    if not _exists(path):
        return None
    try:
        m = read_json(path)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _normal(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _show(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def stale_reason(stage: Stage) -> Optional[str]:
    """Why `stage` must run, or None when its output is up to date."""
    if stage.run:
        return _stale_external(stage)
    from transforms.run.secrets import redact_value

    m = _manifest(stage.output)
    if m is None:
        return f"no manifest.json in {stage.output} (never ran, or did not finish)"
    if m.get("count_check") != "ok":
        return f"its last run's count check was not ok ({_show(m.get('count_check'))})"
    wanted = _normal(redact_value(parsed_options(stage)))
    recorded = m.get("options")
    if not isinstance(recorded, dict):
        return "its manifest records no options"
    defaults = _normal(redact_value(dict(vars(parser_of(stage.command).parse_args(_required_only(stage))))))
    changed = []
    for key, value in wanted.items():
        if key in HOW_OPTIONS:
            continue
        if value is None and defaults.get(key) is None:
            continue  # left to the command, which fills it in from the others (refine's --image_tokens)
        before = recorded[key] if key in recorded else defaults.get(key, value)
        if before != value:
            changed.append(f"--{key} {_show(before)} -> {_show(value)}")
    if changed:
        return "options changed: " + "; ".join(changed[:4]) + (f" (and {len(changed) - 4} more)" if len(changed) > 4 else "")
    upstream = m.get(UPSTREAM)
    current = upstream_of(wanted, stage.output)
    if upstream is None:
        return "its manifest records no fingerprints of its inputs (written by an older entityforge)" if current else None
    for folder, fp in current.items():
        if upstream.get(folder) != fp:
            return f"its input {folder} was made again since it ran"
    return None


def _required_only(stage: Stage) -> list[str]:
    """The stage's argv reduced to the flags its parser requires (their defaults are then
    the command's own defaults for everything else)."""
    parser = parser_of(stage.command)
    required = {s for a in parser._actions if a.required for s in a.option_strings}  # noqa: SLF001
    argv, keep = [], False
    for i, a in enumerate(stage.argv):
        if a.startswith("--"):
            keep = a in required
            if keep:
                argv += [a, stage.argv[i + 1]]
    # positionals: none of our recipe commands take them
    return argv


def _matches(pattern: str) -> int:
    if is_url(pattern):
        from apache_beam.io.filesystems import FileSystems

        try:
            return len(FileSystems.match([pattern])[0].metadata_list)
        except Exception:  # noqa: BLE001 - nothing there
            return 0
    return len(glob.glob(pattern))


def _stale_external(stage: Stage) -> Optional[str]:
    path = f"{stage.output.rstrip('/')}/{STAMP}"
    if not _exists(path):
        return f"no {STAMP} in {stage.output} (never ran, or did not finish)"
    try:
        stamp = read_json(path)
    except (OSError, ValueError):
        return f"{path} is unreadable"
    if stamp.get("argv") != stage.run:
        return "its command changed"
    missing = [p for p in stage.outputs if not _matches(p)]
    if missing:
        return f"declared output {missing[0]} matches no file"
    return None


def plan(recipe: Recipe, force: set[str], start: Optional[str] = None, until: Optional[str] = None) -> list[Decision]:
    names = [s.name for s in recipe.stages]
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise UsageError(f"{flag} {value}: no such stage in {recipe.path} (stages: {', '.join(names)})")
    for name in force:
        if name not in names:
            raise UsageError(f"--force {name}: no such stage in {recipe.path} (stages: {', '.join(names)})")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    decisions, runs = [], set()
    for i, stage in enumerate(recipe.stages):
        if i < first:
            decisions.append(Decision(stage, False, f"before --from {start}"))
            continue
        if i > last:
            decisions.append(Decision(stage, False, f"after --until {until}"))
            continue
        upstream_runs = [d for d in stage.depends if d in runs]
        if stage.name in force:
            reason = "forced (--force)"
        elif upstream_runs:
            reason = f"it reads {upstream_runs[0]}, which runs"
        else:
            reason = stale_reason(stage)
        if reason:
            runs.add(stage.name)
            decisions.append(Decision(stage, True, reason))
        else:
            decisions.append(Decision(stage, False, "up to date (same command, its outputs there)" if stage.run else
                                      "up to date (manifest ok, same options, same inputs)"))
    return decisions


def _run_ours(stage: Stage, beam_args: list[str]) -> dict:
    import importlib

    module = importlib.import_module(COMMANDS[stage.command].module)
    argv = list(stage.argv)
    if COMMANDS[stage.command].beam:
        argv += list(beam_args) + [f"--{k}={v}" for k, v in stage.beam_options.items()]
    return module.run(argv)


def _run_external(stage: Stage, log=None) -> None:
    if is_url(stage.output):
        raise UsageError(f"stage {stage.name}: a `run:` stage writes to a local folder, not {stage.output}")
    os.makedirs(stage.output, exist_ok=True)
    stamp = os.path.join(stage.output, STAMP)
    if os.path.exists(stamp):
        os.remove(stamp)  # it runs again: not finished until it says so
    try:
        proc = subprocess.run(stage.run, check=False, stdout=log)
    except OSError as e:
        raise ChainError(f"stage {stage.name}: cannot start {stage.run[0]!r} ({e.strerror or e}); is it installed "
                         "and on PATH?") from e
    if proc.returncode != 0:
        raise ChainError(f"stage {stage.name}: {' '.join(stage.run)} exited with status {proc.returncode}")
    missing = [p for p in stage.outputs if not _matches(p)]
    if missing:
        raise ChainError(f"stage {stage.name}: {stage.run[0]} finished but its declared output {missing[0]} matches no file")
    body = {"argv": stage.run, "outputs": {p: _matches(p) for p in stage.outputs},
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    body[FINGERPRINT] = content_hash(body)
    write_json(stamp, body)


@contextlib.contextmanager
def _stage_log(logs: Optional[str], stage: Stage):
    """The stage's standard output into `<logs>/<stage>.log` (its counter tables, the
    program's own printing), or left where it goes when `logs` is None."""
    if logs is None:
        yield None
        return
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, f"{stage.name}.log"), "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        yield f


def execute(recipe: Recipe, decisions: list[Decision], beam_args: list[str], say=print, logs: Optional[str] = None,
            after_stage=None) -> list[Decision]:
    """Run the stages that must run, in order; stop at the first that fails (ChainError).
    `logs`: a folder for each stage's standard output; `after_stage(decision)` is called
    after each stage that ran or was skipped, in order."""
    from transforms.errors import AccountingError

    root = recipe.output
    if not is_url(root):
        os.makedirs(root, exist_ok=True)
    _write_text(f"{root}/{RECIPE_FILE}", recipe.text)
    n = len(decisions)
    try:
        for i, d in enumerate(decisions, 1):
            if not d.run:
                d.status = "skipped"
                say(f"[{i}/{n}] {d.stage.name}: skipped, {d.reason}")
                if after_stage:
                    after_stage(d)
                continue
            say(f"[{i}/{n}] {d.stage.name}: runs, {d.reason}\n  {' '.join(d.stage.command_line(beam_args))}")
            t0 = time.monotonic()
            try:
                with _stage_log(logs, d.stage) as log:
                    if d.stage.run:
                        _run_external(d.stage, log)
                    else:
                        _run_ours(d.stage, beam_args)
            except (UsageError, AccountingError, ChainError) as e:
                d.status, d.error, d.seconds = "failed", str(e), time.monotonic() - t0
                raise ChainError(f"stage {d.stage.name} ({d.stage.label}) failed: {e}\n"
                                 "Fix it and run the same command again: finished stages are skipped.") from e
            except Exception as e:
                d.status, d.error, d.seconds = "failed", f"{type(e).__name__}: {e}", time.monotonic() - t0
                raise
            d.status, d.seconds = "ran", time.monotonic() - t0
            if after_stage:
                after_stage(d)
    finally:
        write_summary(recipe, decisions, beam_args)
    return decisions


def _write_text(path: str, text: str) -> None:
    if is_url(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path) as f:
            f.write(text.encode("utf-8"))
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _rows_and_rejects(m: dict) -> tuple[Optional[int], int]:
    rows = None
    files = m.get("files") or []
    for entry in files:
        if isinstance(entry, dict) and entry.get("files"):
            rows = sum(int(f.get("rows", 0)) for f in entry["files"])
            break
    if rows is None:
        for key in ("num_entities", "entities", "samples"):
            if isinstance(m.get(key), int):
                rows = m[key]
                break
    counters = m.get("counters") or {}
    rejects = sum(v for k, v in counters.items() if k.startswith("rejected_") and not k.endswith("_files") and isinstance(v, int))
    return rows, rejects


def img2dataset_stats(folder: str) -> Optional[dict]:
    """img2dataset's per-shard `*_stats.json` in `folder`, added up: URLs tried, downloaded,
    and the failures by img2dataset's status message. None when there are none."""
    paths = sorted(glob.glob(os.path.join(folder, "*_stats.json"))) if not is_url(folder) else []
    if not paths:
        return None
    tried = downloaded = 0
    failed: dict[str, int] = {}
    for path in paths:
        try:
            st = read_json(path)
        except (OSError, ValueError):
            continue
        tried += int(st.get("count") or 0)
        downloaded += int(st.get("successes") or 0)
        for status, n in (st.get("status_dict") or {}).items():
            if status != "success":
                failed[status] = failed.get(status, 0) + int(n)
        if not st.get("status_dict"):
            for key in ("failed_to_download", "failed_to_resize"):
                if st.get(key):
                    failed[key] = failed.get(key, 0) + int(st[key])
    return {"shards": len(paths), "tried": tried, "downloaded": downloaded, "failed": dict(sorted(failed.items()))}


def write_summary(recipe: Recipe, decisions: list[Decision], beam_args: list[str]) -> dict:
    """`chain.json` and `README.md` in the chain's output root."""
    root = recipe.output
    stages = []
    for d in decisions:
        entry = {"name": d.stage.name, "command": d.stage.command_line(beam_args), "status": d.status, "reason": d.reason,
                 "seconds": round(d.seconds, 2), "output": d.stage.output}
        if d.error:
            entry["error"] = d.error[:2000]
        m = _manifest(d.stage.output) if not d.stage.run else None
        if m:
            rows, rejects = _rows_and_rejects(m)
            entry.update({"count_check": m.get("count_check"), "rows": rows, "rejects": rejects,
                          "run_seconds": m.get("seconds"), "cost_usd": m.get("cost_usd"), "kind": m.get("kind")})
            entry["card"] = "README.md" if _exists(f"{d.stage.output}/README.md") else None
            entry["viewer"] = "viewer.html" if _exists(f"{d.stage.output}/viewer.html") else None
        elif d.stage.run and _exists(f"{d.stage.output}/{STAMP}"):
            try:
                entry["outputs"] = read_json(f"{d.stage.output}/{STAMP}").get("outputs")
            except (OSError, ValueError):
                pass
            stats = img2dataset_stats(d.stage.output)
            if stats:
                entry.update({"rows": stats["downloaded"], "rejects": sum(stats["failed"].values()), "download": stats})
                selected = [e for e in stages if e["name"] in d.stage.depends and e.get("kind") == "candidates"]
                if selected and selected[-1].get("rows") is not None:
                    n = selected[-1]["rows"]
                    ok = n == stats["tried"]
                    entry["count_check"] = (f"ok: {n:,} selected = {stats['downloaded']:,} downloaded + "
                                            f"{sum(stats['failed'].values()):,} failed" if ok else
                                            f"{n:,} selected but img2dataset tried {stats['tried']:,}")
        stages.append(entry)
    summary = {"recipe": recipe.name, "recipe_file": RECIPE_FILE, "output": root,
               "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "stages": stages}
    write_json(f"{root}/{CHAIN_FILE}", summary)
    _write_text(f"{root}/README.md", _summary_md(summary))
    return summary


def _rel(root: str, path: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path


def _summary_md(summary: dict) -> str:
    from transforms.report.card import md_text

    root = summary["output"]
    lines = [f"# {md_text(summary['recipe'])}: the chain", "",
             f"Made by `python -m pipelines.run` from [{RECIPE_FILE}]({RECIPE_FILE}) (the recipe it ran); "
             f"each stage's figures are in its own `manifest.json`. Written {summary['written']}.", "",
             "| stage | status | rows | rejects | count check | seconds | cost (USD) | card | viewer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        rel = _rel(root, s["output"])
        status = s["status"] + ("" if s["status"] == "ran" else f": {s['reason']}")
        card = f"[card]({rel}/README.md)" if s.get("card") else ""
        viewer = f"[viewer]({rel}/viewer.html)" if s.get("viewer") else ""
        rows = "" if s.get("rows") is None else f"{s['rows']:,}"
        rejects = "" if "rejects" not in s else f"{s['rejects']:,}"
        cost = "" if s.get("cost_usd") is None else f"{s['cost_usd']:,.2f}"
        secs = s.get("run_seconds") if s["status"] == "skipped" else s["seconds"]
        lines.append(f"| `{s['name']}` | {md_text(status)} | {rows} | {rejects} | {md_text(s.get('count_check') or '')} "
                     f"| {'' if secs is None else f'{secs:,.0f}'} | {cost} | {card} | {viewer} |")
    for s in summary["stages"]:
        if s.get("download"):
            dl = s["download"]
            lines += ["", f"`{s['name']}` downloaded {dl['downloaded']:,} of {dl['tried']:,} URLs "
                      f"({dl['shards']} shards); failed by reason:", "",
                      "| reason | URLs |", "|---|---|",
                      *[f"| {md_text(k)} | {v:,} |" for k, v in dl["failed"].items()]]
    lines += ["", "## Commands", "", "```bash"]
    lines += [" ".join(_quote(a) for a in s["command"]) for s in summary["stages"]]
    lines += ["```", ""]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def is_dataflow(beam_args: list[str]) -> bool:
    for i, a in enumerate(beam_args):
        if a.startswith("--runner="):
            return a.split("=", 1)[1].endswith("DataflowRunner")
        if a == "--runner" and i + 1 < len(beam_args):
            return beam_args[i + 1].endswith("DataflowRunner")
    return False


def build_jobs(decisions: list[Decision], beam_args: list[str], say=print) -> dict:
    """With the DataflowRunner: every Beam stage in the chain's window built as a Dataflow
    job without submitting it (Beam's --dry_run=True), whether or not it is up to date. A
    stage's inputs must exist (its command checks them as it would before a real run)."""
    built = {}
    for d in decisions:
        if d.reason.startswith(("before --from", "after --until")) or d.stage.run or not COMMANDS[d.stage.command].beam:
            continue
        summary = _run_ours(d.stage, [*beam_args, "--dry_run=True"])
        built[d.stage.name] = summary
        say(f"  {d.stage.name}: Dataflow job built ({summary.get('pipeline_proto_bytes', 0):,} bytes of pipeline), not submitted")
    return built


def dry_run(decisions: list[Decision], beam_args: list[str], say=print) -> None:
    n = len(decisions)
    for i, d in enumerate(decisions, 1):
        verb = "would run" if d.run else "would skip"
        say(f"[{i}/{n}] {d.stage.name} ({d.stage.label}): {verb}: {d.reason}")
        say("  " + " ".join(_quote(a) for a in d.stage.command_line(beam_args)))
    sys.stdout.flush()
