"""A recipe: the whole chain in one YAML file, read and checked before anything runs.

    version: 1
    name: my-dataset
    data: /data/corpus              # ${data}; --data overrides
    stages:
      - name: entity_index          # its output folder: ${output}/entity_index
        command: build_entity_index
        flags: {entities: "${data}/wiki6m.jsonl.gz"}
      - name: candidates
        command: select_candidates  # --entity_index: the output of the build_entity_index stage
        flags: {captions: "${data}/laion/*.parquet", k: 50}
      - name: shards
        command: decontaminate      # --input: the candidates stage's candidates-*.parquet
        flags: {eval_images: "${data}/oven_eval"}
        beam_options: {machine_type: g2-standard-8}

A stage runs one of our commands that write an output folder with a manifest (`command:`,
COMMANDS below, with `flags:`) or any other program (`run:`,
an argument list, with the files it makes declared in `outputs:`). The input flags of our
commands default to the outputs of the stages that make them (INPUTS below); `inputs:`
names another stage for a flag. `${output}`, `${data}`, `${recipe_dir}`, `${stage}` (this
stage's output folder), `${python}` (the interpreter running the chain) and environment
variables are substituted in every string. An
unknown key, stage, command, flag or variable is an error naming its line in the file and
the likely intent. Beam-free: parsing a recipe needs only PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Optional

from transforms.errors import UsageError

FORMAT_VERSION = 1
TOP_KEYS = ("version", "name", "description", "data", "stages")
STAGE_KEYS = ("name", "command", "flags", "inputs", "beam_options", "run", "outputs", "after", "output")


@dataclasses.dataclass(frozen=True)
class Command:
    """One of our commands as a recipe knows it."""

    module: str
    beam: bool = True
    # flag -> (command whose stage makes it, what of that stage: "" its output folder,
    # "/glob" files in it, "flag:NAME" the value of that stage's flag NAME).
    inputs: tuple[tuple[str, str, str], ...] = ()


COMMANDS: dict[str, Command] = {
    "build_entity_index": Command("pipelines.build_entity_index"),
    "select_candidates": Command("pipelines.select_candidates", inputs=(("entity_index", "build_entity_index", ""),)),
    "decontaminate": Command("pipelines.decontaminate", inputs=(("input", "select_candidates", "/candidates-*.parquet"),)),
    "refine": Command("pipelines.refine", inputs=(
        ("input", "decontaminate", "/samples-*.parquet"),
        ("entity_index", "build_entity_index", ""),
        ("entities", "build_entity_index", "flag:entities"),
    )),
    "build_codes": Command("pipelines.build_codes", inputs=(("entity_index", "build_entity_index", ""),)),
    "oven_to_shards": Command("pipelines.oven_to_shards"),
    "trainer.train": Command("trainer.train", beam=False, inputs=(
        ("train", "refine", ""),
        ("codes", "build_codes", ""),
    )),
}


@dataclasses.dataclass
class Stage:
    name: str
    line: int
    command: Optional[str] = None  # one of COMMANDS
    run: Optional[list[str]] = None  # another program's argv
    flags: dict = dataclasses.field(default_factory=dict)
    inputs: dict = dataclasses.field(default_factory=dict)  # flag -> stage name
    beam_options: dict = dataclasses.field(default_factory=dict)
    outputs: list = dataclasses.field(default_factory=list)
    after: list = dataclasses.field(default_factory=list)
    output: str = ""
    depends: list = dataclasses.field(default_factory=list)  # stage names, resolved
    argv: list = dataclasses.field(default_factory=list)  # our command's flags, resolved

    @property
    def label(self) -> str:
        return self.command or (os.path.basename(self.run[0]) if self.run else "?")

    def command_line(self, beam_args: list[str] = ()) -> list[str]:
        """The full command as a person would type it."""
        if self.run:
            return list(self.run)
        extra = list(beam_args) + [f"--{k}={v}" for k, v in self.beam_options.items()] if COMMANDS[self.command].beam else []
        return ["python", "-m", COMMANDS[self.command].module, *self.argv, *extra]


@dataclasses.dataclass
class Recipe:
    path: str
    name: str
    text: str
    output: str
    data: Optional[str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------

class _Map(dict):
    line = 0
    key_lines: dict = {}


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise UsageError(f"line {key_node.start_mark.line + 1}: {key!r} given twice in one mapping "
                                 f"(first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        m = _Map(loader.construct_mapping(node, deep=True))
        m.line = node.start_mark.line + 1
        m.key_lines = seen
        return m

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _where(path: str, line: int) -> str:
    return f"{path}:{line}"


def _unknown(path: str, m: _Map, key, allowed, what: str) -> UsageError:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(map(str, allowed))})"
    return UsageError(f"{_where(path, m.key_lines.get(key, m.line))}: unknown {what} {key!r}{hint}")


# --------------------------------------------------------------------------------------
# Substitution
# --------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute(value: Any, variables: dict[str, Optional[str]], where: str) -> Any:
    """${name} in every string of `value`: the recipe's variables, then the environment."""
    if isinstance(value, str):
        def one(m):
            name = m.group(1)
            if name in variables:
                if variables[name] is None:
                    raise UsageError(f"{where}: ${{{name}}} is used but not set (give --{name} or `{name}:` in the recipe)")
                return str(variables[name])
            if name in os.environ:
                return os.environ[name]
            known = list(variables) + [k for k in os.environ if k.isupper()]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            hint = f" (did you mean ${{{close[0]}}}?)" if close else ""
            raise UsageError(f"{where}: ${{{name}}} is neither a recipe variable ({', '.join(variables)}) "
                             f"nor set in the environment{hint}")

        return _VAR.sub(one, value)
    if isinstance(value, list):
        return [substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables, where) for k, v in value.items()}
    return value


def flag_value(value: Any) -> str:
    """A YAML value as a command-line value: booleans as true/false, lists comma-joined."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(flag_value(v) for v in value)
    if value is None:
        return ""
    return str(value)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def load(path: str, output: str, data: Optional[str] = None, overrides: Optional[dict] = None) -> Recipe:
    """Read and check a recipe: every key, stage name, command, flag and variable.
    `overrides` ({stage: {flag: value}}, `pipelines.run --set STAGE.FLAG=VALUE`) replace
    or add flags of the recipe's stages before they are checked."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the recipe ({e.strerror or e}); give a recipe YAML file, e.g. recipes/demo.yaml") from e
    try:
        doc = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(doc, _Map):
        raise UsageError(f"{path}: a recipe is a mapping with `version` and `stages` (see recipes/demo.yaml)")
    for key in doc:
        if key not in TOP_KEYS:
            raise _unknown(path, doc, key, TOP_KEYS, "recipe key")
    if doc.get("version") != FORMAT_VERSION:
        raise UsageError(f"{_where(path, doc.key_lines.get('version', 1))}: `version: {FORMAT_VERSION}` expected "
                         f"(this entityforge reads recipe format {FORMAT_VERSION}), got {doc.get('version')!r}")
    stages_raw = doc.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UsageError(f"{_where(path, doc.key_lines.get('stages', doc.line))}: `stages` must be a non-empty list of stages")
    recipe_dir = os.path.dirname(os.path.abspath(path))
    output = output.rstrip("/") or output
    if data is None and doc.get("data") is not None:
        data = substitute(str(doc["data"]), {"recipe_dir": recipe_dir, "output": output}, _where(path, doc.key_lines["data"]))
    import sys

    variables = {"output": output, "data": data, "recipe_dir": recipe_dir, "python": sys.executable}

    stages: list[Stage] = []
    for raw in stages_raw:
        if not isinstance(raw, _Map):
            raise UsageError(f"{path}: each stage is a mapping with `name` and `command` (or `run`), got {raw!r:.80}")
        for key in raw:
            if key not in STAGE_KEYS:
                raise _unknown(path, raw, key, STAGE_KEYS, "stage key")
        name = raw.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise UsageError(f"{_where(path, raw.line)}: a stage needs a `name` of letters, digits, `_`, `.` or `-` "
                             f"(its output folder), got {name!r}")
        if any(s.name == name for s in stages):
            raise UsageError(f"{_where(path, raw.key_lines['name'])}: two stages are named {name!r}")
        where = _where(path, raw.line)
        if ("command" in raw) == ("run" in raw):
            raise UsageError(f"{where}: stage {name!r} needs either `command` (one of ours) or `run` (another program)")
        stage_out = substitute(str(raw.get("output") or f"{output}/{name}"), variables, where)
        local = dict(variables, stage=stage_out)
        stage = Stage(name=name, line=raw.line, output=stage_out)
        if "command" in raw:
            cmd = raw["command"]
            if cmd not in COMMANDS:
                raise UsageError(f"{_where(path, raw.key_lines['command'])}: unknown command {cmd!r}"
                                 + _did_you_mean(str(cmd), list(COMMANDS)))
            stage.command = cmd
        else:
            run = raw["run"]
            if isinstance(run, str):
                import shlex

                run = shlex.split(run)
            if not isinstance(run, list) or not run:
                raise UsageError(f"{_where(path, raw.key_lines['run'])}: `run` is the program and its arguments, a list")
            stage.run = [str(a) for a in substitute(run, local, where)]
            outs = raw.get("outputs") or []
            if not isinstance(outs, list) or not outs:
                raise UsageError(f"{where}: stage {name!r} runs another program: declare what it makes in `outputs` "
                                 "(paths or globs), so a re-run can tell whether it finished")
            stage.outputs = [str(o) for o in substitute(outs, local, where)]
        for key, kind in (("flags", dict), ("inputs", dict), ("beam_options", dict), ("after", list)):
            value = raw.get(key)
            if value is None:
                continue
            if not isinstance(value, kind):
                raise UsageError(f"{_where(path, raw.key_lines[key])}: `{key}` must be a {'mapping' if kind is dict else 'list'}")
            if key in ("flags", "beam_options"):
                lines = getattr(value, "key_lines", {})
                value = {k: substitute(v, local, _where(path, lines.get(k, raw.line))) for k, v in value.items()}
            elif key == "after":
                value = substitute(value, local, _where(path, raw.key_lines[key]))
            setattr(stage, key, dict(value) if isinstance(value, dict) else value)
        if stage.run and (stage.flags or stage.inputs):
            raise UsageError(f"{where}: stage {name!r} runs another program: give its arguments in `run`, not `flags`/`inputs`")
        stage._raw = raw  # noqa: SLF001 - line numbers for the checks below
        stages.append(stage)
    recipe = Recipe(path=path, name=str(doc.get("name") or os.path.splitext(os.path.basename(path))[0]), text=text,
                    output=output, data=data, stages=stages)
    _override(recipe, overrides or {})
    _resolve(recipe)
    return recipe


def _override(recipe: Recipe, overrides: dict) -> None:
    names = [s.name for s in recipe.stages]
    for name, flags in overrides.items():
        if name not in names:
            raise UsageError(f"--set {name}.: no stage {name!r} in {recipe.path}" + _did_you_mean(str(name), names))
        stage = recipe.stage(name)
        if stage.run:
            raise UsageError(f"--set {name}.: stage {name!r} runs another program ({stage.run[0]}); "
                             "change its `run:` arguments in the recipe")
        stage.flags.update(flags)


def parse_set(values: list[str]) -> dict:
    """`--set STAGE.FLAG=VALUE` (repeatable) -> {stage: {flag: value}}."""
    out: dict = {}
    for item in values:
        key, eq, value = item.partition("=")
        stage, dot, flag = key.partition(".")
        if not (eq and dot and stage and flag):
            raise UsageError(f"--set {item!r}: expected STAGE.FLAG=VALUE, e.g. --set candidates.k=20")
        out.setdefault(stage, {})[flag.lstrip("-")] = value
    return out


def _did_you_mean(value: str, known: list[str]) -> str:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def _resolve(recipe: Recipe) -> None:
    """Input flags from the stages that make them, dependencies, and each command's flags
    checked against its own parser."""
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        raw = stage._raw  # noqa: SLF001
        earlier = recipe.stages[:i]
        for dep in stage.after:
            if dep not in names[:i]:
                raise UsageError(f"{_where(recipe.path, raw.key_lines['after'])}: `after: {dep}` names no earlier stage"
                                 + _did_you_mean(str(dep), names[:i]))
            stage.depends.append(dep)
        if stage.run:
            continue
        cmd = COMMANDS[stage.command]
        flags = dict(stage.flags)
        for flag, dep in stage.inputs.items():
            if dep not in names[:i]:
                raise UsageError(f"{_where(recipe.path, raw.key_lines['inputs'])}: `inputs: {{{flag}: {dep}}}` names no "
                                 "earlier stage" + _did_you_mean(str(dep), names[:i]))
        for flag, maker, what in cmd.inputs:
            if flag in flags and flag not in stage.inputs:
                continue
            source = None
            if flag in stage.inputs:
                source = recipe.stage(stage.inputs[flag])
            else:
                made = [s for s in earlier if s.command == maker]
                if made:
                    source = made[-1]
            if source is None:
                continue
            if what.startswith("flag:"):
                value = source.flags.get(what[5:])
                if value is None:
                    continue
                flags[flag] = value
            else:
                suffix = what if source.command == maker else ""
                flags[flag] = source.output + suffix
            if source.name not in stage.depends:
                stage.depends.append(source.name)
        flags.setdefault("output", stage.output)
        stage.argv = [x for k, v in flags.items() for x in (f"--{k}", flag_value(v))]
        check_flags(recipe, stage, flags)
        # A stage also depends on every earlier stage whose output one of its flags names.
        for other in earlier:
            if other.name not in stage.depends and any(
                    isinstance(v, str) and (v == other.output or v.startswith(other.output + "/")) for v in flags.values()):
                stage.depends.append(other.name)


def parser_of(command: str):
    import importlib

    return importlib.import_module(COMMANDS[command].module).build_parser()


def check_flags(recipe: Recipe, stage: Stage, flags: dict) -> None:
    """Every flag is one the command knows (with the flag it likely meant), and the command's
    own parser accepts the values."""
    raw = stage._raw  # noqa: SLF001
    parser = parser_of(stage.command)
    known = {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}  # noqa: SLF001
    flag_lines = getattr(raw.get("flags"), "key_lines", {}) if raw.get("flags") is not None else {}
    for flag in flags:
        if flag not in known:
            line = flag_lines.get(flag, raw.line)
            close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}?)" if close else f" (python -m {COMMANDS[stage.command].module} --help lists them)"
            raise UsageError(f"{_where(recipe.path, line)}: stage {stage.name!r}: {stage.command} has no flag --{flag}{hint}")
    try:
        parser.parse_args(stage.argv)
    except SystemExit as e:
        raise UsageError(f"{_where(recipe.path, raw.line)}: stage {stage.name!r}: {stage.command} refuses its flags "
                         f"(the message above); the command was: {' '.join(stage.command_line())}") from e


def parsed_options(stage: Stage) -> dict:
    """The options the stage's command will record (`vars(args)`), from the recipe."""
    return dict(vars(parser_of(stage.command).parse_args(stage.argv)))
