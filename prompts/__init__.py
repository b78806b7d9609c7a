"""Versioned prompts of the REW stage and the JSON schema of each answer.

Files: `prompts/<task>/v<N>.txt` (a `str.format` template) and `prompts/<task>/v<N>.schema.json`.
A prompt is identified by `<task>/v<N>` and the sha256 of its template + schema; every
output row carries both. A shipped version is never edited: a change is a new version.

Tasks:
  verify        image + caption + candidate title + Wikipedia summary -> verdict
                (correct / corrected / not_an_entity), entity name, short reason
  rationale_qa  image + final entity + summary + caption -> visual rationale + 3-5 QA pairs

Caption and Wikipedia text are quoted as DATA between markers, and the prompt tells the
model never to follow instructions inside them. Markers inside the data are neutralised so
a caption cannot close its own quote.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

TASKS = ("verify", "rationale_qa")
MODES = ("correct", "direct")
CONTEXTS = ("wiki_caption", "none")


@dataclass(frozen=True)
class Prompt:
    task: str
    version: str
    template: str
    schema: dict

    @property
    def id(self) -> str:
        return f"{self.task}/{self.version}"

    @property
    def sha256(self) -> str:
        blob = self.template + "\n" + json.dumps(self.schema, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_prompt(task: str, version: str = "v1") -> Prompt:
    if task not in TASKS:
        raise ValueError(f"unknown prompt task {task!r}; known: {TASKS}")
    folder = resources.files("prompts").joinpath(task)
    try:
        template = folder.joinpath(f"{version}.txt").read_text(encoding="utf-8")
        schema = json.loads(folder.joinpath(f"{version}.schema.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"prompt {task}/{version} does not exist under prompts/{task}/") from e
    return Prompt(task, version, template, schema)


def quote(text: str | None, limit: int = 4000) -> str:
    """Data for a quoted block: markers that could end the quote are defused, length capped."""
    text = (text or "").replace("<<<", "< < <").replace(">>>", "> > >")
    return text if len(text) <= limit else text[:limit] + " [...]"


def render_verify(prompt: Prompt, *, caption: str, title: str, summary: str | None, mode: str, context: str) -> str:
    if mode not in MODES or context not in CONTEXTS:
        raise ValueError(f"mode must be one of {MODES} and context one of {CONTEXTS}")
    with_context = context == "wiki_caption"
    if mode == "correct":
        clause = ", a candidate entity name" + (" and its Wikipedia summary" if with_context else "")
        block = f"<<<CANDIDATE\n{quote(title, 300)}\nCANDIDATE>>>\n"
        if with_context:
            block += f"<<<SUMMARY\n{quote(summary) if summary else '(no summary available)'}\nSUMMARY>>>\n"
        tasks = (
            '- "correct" if the image shows the candidate entity;\n'
            '- "corrected" if it shows another specific entity: give that entity\'s Wikipedia title;\n'
            '- "not_an_entity" if it shows no specific entity (a generic object, a pattern, text only).'
        )
    else:
        clause, block = "", ""
        tasks = (
            '- "corrected" with the Wikipedia title of the specific entity the image shows;\n'
            '- "not_an_entity" if it shows no specific entity (a generic object, a pattern, text only).'
        )
    return prompt.template.format(
        candidate_clause=clause,
        caption=quote(caption) if with_context else "(not given)",
        candidate_block=block,
        task_lines=tasks,
    )


def render_rationale_qa(prompt: Prompt, *, entity: str, summary: str | None, caption: str, context: str) -> str:
    with_context = context == "wiki_caption"
    summary_block = ""
    if with_context:
        summary_block = f"<<<SUMMARY\n{quote(summary) if summary else '(no summary available)'}\nSUMMARY>>>"
    return prompt.template.format(
        entity=quote(entity, 300).replace('"', "'"),
        summary_block=summary_block,
        caption=quote(caption) if with_context else "(not given)",
    )
