"""pipelines.run: a recipe run like make. A chain killed in its third stage and run again
skips the finished stages (their files untouched) and ends as an uninterrupted run; a
changed option re-runs that stage and what reads it; an input made again re-runs what
reads it; --dry_run prints the exact commands and why; a typo names its line."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from pipelines import run as chain_cmd
from tests.helpers import write_title_vocab
from transforms.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = """\
version: 1
name: test-chain
data: {data}
stages:
  - name: entity_index
    command: build_entity_index
    flags:
      entities: ${{data}}/entities.jsonl
  - name: candidates
    command: select_candidates
    flags:
      captions: ${{data}}/laion
      caption_format: laion_parquet
      k: {k}
  - name: codes
    command: build_codes
    flags:
      tokenizer: ${{data}}/vocab.txt
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pipelines.demo_data.make_corpus import write_corpus

    folder = tmp_path_factory.mktemp("chain_data")
    write_corpus(str(folder))
    write_title_vocab(folder / "entities.jsonl", folder / "vocab.txt")
    return folder


def _recipe(tmp_path, data, k=5, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(RECIPE.format(data=data, k=k))
    return str(path)


def _mtimes(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


def _result(out) -> dict:
    """What a chain made, without times: candidates (key, qid), codes, and each manifest's counters."""
    cands = pq.read_table(sorted(str(p) for p in (out / "candidates").glob("candidates-*.parquet")), columns=["key", "qid"]).to_pylist()
    codes = pq.read_table(out / "codes" / "codes.parquet").to_pylist()
    counters = {s: json.load(open(out / s / "manifest.json"))["counters"] for s in ("entity_index", "candidates", "codes")}
    for c in counters.values():
        for k in [k for k in c if k.startswith("shuffle_")]:
            c.pop(k)
    return {"candidates": sorted((r["key"], r["qid"]) for r in cands), "codes": codes, "counters": counters}


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT)


@pytest.mark.slow
def test_a_chain_killed_in_its_third_stage_finishes_without_redoing_the_first_two(tmp_path, data):
    recipe = _recipe(tmp_path, data)
    clean = tmp_path / "clean"
    assert chain_cmd.main([recipe, "--output", str(clean)]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run", recipe, "--output", str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=ROOT,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[3/3] codes: runs"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert not (killed / "codes" / "manifest.json").exists()
    before = {s: _mtimes(killed / s) for s in ("entity_index", "candidates")}
    time.sleep(0.05)
    summary = chain_cmd.run([recipe, "--output", str(killed)])
    assert [s["status"] for s in summary["stages"]] == ["skipped", "skipped", "ran"]
    assert {s: _mtimes(killed / s) for s in ("entity_index", "candidates")} == before
    assert _result(killed) == _result(clean)
    # The chain's own files: the recipe it ran, its state, its summary.
    assert (killed / "recipe.yaml").read_text() == open(recipe).read()
    state = json.load(open(killed / "chain.json"))
    assert [s["name"] for s in state["stages"]] == ["entity_index", "candidates", "codes"]
    readme = (killed / "README.md").read_text()
    assert "[card](candidates/README.md)" in readme and "[viewer](candidates/viewer.html)" in readme
    # The same recipe on Dataflow: every Beam stage's job built offline, nothing submitted.
    from tests.test_distributed import DATAFLOW

    res = chain_cmd.run([recipe, "--output", str(killed), "--dry_run=True", *[a for a in DATAFLOW if a != "--dry_run=True"]])
    assert set(res["jobs"]) == {"entity_index", "candidates", "codes"}
    assert all(j["dry_run"] and j["runner"] == "DataflowRunner" and j["pipeline_proto_bytes"] > 0 for j in res["jobs"].values())
    assert _result(killed) == _result(clean)  # building the jobs changed nothing


@pytest.mark.slow
def test_changes_rerun_what_they_touch_and_nothing_else(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert chain_cmd.main([_recipe(tmp_path, data, k=5), "--output", str(out)]) == 0
    again = chain_cmd.run([_recipe(tmp_path, data, k=5), "--output", str(out)])
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped", "skipped"]
    # One option of stage 2: stage 2 runs; stage 3 does not read it and stays.
    index_times, codes_times = _mtimes(out / "entity_index"), _mtimes(out / "codes")
    capsys.readouterr()
    changed = chain_cmd.run([_recipe(tmp_path, data, k=7), "--output", str(out)])
    assert [s["status"] for s in changed["stages"]] == ["skipped", "ran", "skipped"]
    assert "options changed: --k 5 -> 7" in capsys.readouterr().out
    assert _mtimes(out / "entity_index") == index_times and _mtimes(out / "codes") == codes_times
    assert json.load(open(out / "candidates" / "manifest.json"))["options"]["k"] == 7
    # The entity index made again outside the chain: both stages that read it run again.
    from pipelines import build_entity_index

    build_entity_index.run(["--entities", str(data / "entities.jsonl"), "--output", str(out / "entity_index")])
    dry = chain_cmd.run([_recipe(tmp_path, data, k=7), "--output", str(out), "--dry_run"])
    assert [(s["run"], s["reason"]) for s in dry["stages"]] == [
        (False, "up to date (manifest ok, same options, same inputs)"),
        (True, f"its input {out}/entity_index was made again since it ran"),
        (True, f"its input {out}/entity_index was made again since it ran"),
    ]
    # --force: that stage and what reads it.
    forced = chain_cmd.run([_recipe(tmp_path, data, k=7), "--output", str(out), "--force", "entity_index", "--dry_run"])
    assert [s["reason"] for s in forced["stages"]] == ["forced (--force)", "it reads entity_index, which runs", "it reads entity_index, which runs"]


def test_dry_run_prints_the_exact_commands_and_why(tmp_path, data, capsys):
    out = tmp_path / "out"
    res = chain_cmd.run([_recipe(tmp_path, data), "--output", str(out), "--dry_run", "--direct_num_workers", "2"])
    printed = capsys.readouterr().out
    assert not out.exists() or not any(out.iterdir())  # nothing ran, nothing written
    cmds = [s["command"] for s in res["stages"]]
    assert cmds[0] == ["python", "-m", "pipelines.build_entity_index", "--entities", f"{data}/entities.jsonl",
                       "--output", f"{out}/entity_index", "--direct_num_workers", "2"]
    # Inputs default to the outputs of the stages that make them.
    assert cmds[1][cmds[1].index("--entity_index") + 1] == f"{out}/entity_index"
    assert cmds[2][cmds[2].index("--entity_index") + 1] == f"{out}/entity_index"
    assert f"[1/3] entity_index (build_entity_index): would run: no manifest.json in {out}/entity_index" in printed
    assert "[2/3] candidates (select_candidates): would run: it reads entity_index, which runs" in printed
    assert " ".join(cmds[1]) in printed


def test_set_changes_one_flag_of_one_stage(tmp_path, data, capsys):
    """--set STAGE.FLAG=VALUE: that stage's command changes, the others do not; a wrong
    stage or flag is named like a typo in the recipe."""
    recipe, out = _recipe(tmp_path, data), str(tmp_path / "out")
    res = chain_cmd.run([recipe, "--output", out, "--set", "candidates.k=7", "--set", "candidates.threads=2", "--dry_run"])
    cmds = [s["command"] for s in res["stages"]]
    assert cmds[1][cmds[1].index("--k") + 1] == "7" and cmds[1][cmds[1].index("--threads") + 1] == "2"
    plain = chain_cmd.run([recipe, "--output", out, "--dry_run"])
    assert [s["command"] for s in plain["stages"]][::2] == cmds[::2]
    with pytest.raises(UsageError, match=r"--set candidate\.: no stage 'candidate' .*did you mean 'candidates'"):
        chain_cmd.run([recipe, "--output", out, "--set", "candidate.k=7", "--dry_run"])
    with pytest.raises(UsageError, match=r"stage 'candidates': select_candidates has no flag --kk \(did you mean --k\?\)"):
        chain_cmd.run([recipe, "--output", out, "--set", "candidates.kk=7", "--dry_run"])
    with pytest.raises(UsageError, match=r"expected STAGE\.FLAG=VALUE"):
        chain_cmd.run([recipe, "--output", out, "--set", "k=7", "--dry_run"])


@pytest.mark.parametrize("old, new, message", [
    ("      k: 5\n", "      kk: 5\n", "{path}:14: stage 'candidates': select_candidates has no flag --kk (did you mean --k?)"),
    ("    command: build_codes\n", "    comand: build_codes\n", "{path}:16: unknown stage key 'comand' (did you mean 'command'?)"),
    ("    command: build_codes\n", "    command: build_code\n", "{path}:16: unknown command 'build_code' (did you mean 'build_codes'?)"),
    ("      k: 5\n", "      k: ${dta}\n", "{path}:14: ${dta} is neither a recipe variable"),
    ("name: test-chain\n", "name: test-chain\nstage: []\n", "{path}:3: unknown recipe key 'stage' (did you mean 'stages'?)"),
])
def test_a_typo_is_named_with_its_line(tmp_path, data, old, new, message):
    text = RECIPE.format(data=data, k=5)
    assert old in text
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(UsageError) as e:
        chain_cmd.run([str(path), "--output", str(tmp_path / "out"), "--dry_run"])
    assert message.replace("{path}", str(path)) in str(e.value)


def test_unknown_beam_option_and_stage_names_fail_before_anything_runs(tmp_path, data):
    recipe = _recipe(tmp_path, data)
    with pytest.raises(SystemExit):
        chain_cmd.run([recipe, "--output", str(tmp_path / "o"), "--runer", "DataflowRunner"])
    with pytest.raises(UsageError, match=r"--force candidate: no such stage .* \(stages: entity_index, candidates, codes\)"):
        chain_cmd.run([recipe, "--output", str(tmp_path / "o"), "--force", "candidate", "--dry_run"])


@pytest.mark.parametrize("name", ["demo.yaml", "entity_laion.yaml", "rew.yaml", "dataflow.yaml"])
def test_the_shipped_recipes_resolve(tmp_path, name, monkeypatch):
    """Every stage of a shipped recipe resolves: its flags pass its command's parser and
    its inputs come from the stages that make them."""
    monkeypatch.setenv("GPU_IMAGE", "gcr.io/p/gpu:1")
    monkeypatch.setenv("VLLM_IMAGE", "gcr.io/p/vllm:1")
    res = chain_cmd.run([os.path.join(ROOT, "recipes", name), "--output", str(tmp_path / "out"), "--data", str(tmp_path), "--dry_run"])
    assert res["stages"] and all(s["run"] for s in res["stages"])
    cmds = {s["name"]: s["command"] for s in res["stages"]}
    if name == "entity_laion.yaml":
        cand = cmds["candidates"]
        assert cand[cand.index("--entity_index") + 1] == f"{tmp_path}/out/entity_index"
        shards = cmds["shards"]
        assert shards[shards.index("--threshold") + 1] == "0.95" and "ViT-L-14" in shards
    elif name == "demo.yaml":
        assert list(cmds) == ["corpus", "entity_index", "candidates", "eval_set", "shards", "rew_input", "rew", "wordpiece",
                              "codes", "model", "evaluation"]
        model = cmds["model"]
        assert model[:3] == ["python", "-m", "trainer.train"] and model[model.index("--codes") + 1] == f"{tmp_path}/out/codes"
        assert cmds["corpus"][0] == sys.executable and "--data" not in " ".join(cmds["corpus"])
    elif name == "dataflow.yaml":
        shards = cmds["shards"]
        assert "--sdk_container_image=gcr.io/p/gpu:1" in shards and "--machine_type=g2-standard-8" in shards
        assert shards[shards.index("--input") + 1] == f"{tmp_path}/out/candidates/candidates-*.parquet"
        rew = cmds["rew"]
        assert "--experiments=no_use_multiple_sdk_containers" in rew and "--sdk_container_image=gcr.io/p/vllm:1" in rew
        assert rew[rew.index("--input") + 1] == f"{tmp_path}/out/shards/samples-*.parquet"
    else:
        rew = cmds["rew"]
        assert rew[rew.index("--entities") + 1] == f"{tmp_path}/wiki6m.jsonl"
        assert rew[rew.index("--entity_index") + 1] == f"{tmp_path}/out/entity_index"


def test_estimate_only_prices_the_recipe(capsys):
    plan = chain_cmd.run([os.path.join(ROOT, "recipes", "entity_laion.yaml"), "--output", "unused", "--estimate_only",
                          "--entities", "6063945", "--captions", "2.3e9"])
    names = [s["stage"] if isinstance(s, dict) and "stage" in s else s for s in plan.get("stages", [])]
    printed = capsys.readouterr().out
    assert "select_candidates" in printed and "decontaminate" in printed and "refine" not in printed.split("rates used")[0]
    assert names
    with pytest.raises(UsageError, match="--estimate_only needs the input sizes"):
        chain_cmd.run([os.path.join(ROOT, "recipes", "entity_laion.yaml"), "--output", "unused", "--estimate_only"])


def test_a_run_stage_is_stamped_and_a_missing_program_is_named(tmp_path):
    """A `run:` stage: its declared outputs checked, a stamp written, skipped when up to
    date, run again when its arguments change; a program that is not there stops the chain
    with one line naming it."""
    recipe = tmp_path / "r.yaml"

    def write(word, program="${python}"):
        recipe.write_text(
            "version: 1\nname: ext\nstages:\n  - name: made\n"
            f"    run: [\"{program}\", -c, \"import pathlib; pathlib.Path('${{stage}}/out.txt').write_text('{word}')\"]\n"
            "    outputs: [\"${stage}/out.txt\"]\n")

    out = tmp_path / "out"
    write("one")
    first = chain_cmd.run([str(recipe), "--output", str(out)])
    assert [s["status"] for s in first["stages"]] == ["ran"] and (out / "made" / "out.txt").read_text() == "one"
    assert json.load(open(out / "made" / "_stage.json"))["outputs"] == {f"{out}/made/out.txt": 1}
    assert [s["status"] for s in chain_cmd.run([str(recipe), "--output", str(out)])["stages"]] == ["skipped"]
    write("two")
    dry = chain_cmd.run([str(recipe), "--output", str(out), "--dry_run"])
    assert dry["stages"][0]["reason"] == "its command changed"
    write("x", program="/nonexistent/tool")
    assert chain_cmd.main([str(recipe), "--output", str(out)]) == 1
