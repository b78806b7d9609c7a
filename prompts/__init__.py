"""Versioned prompts of the REW stage and the JSON schema of each answer.

Files: `prompts/<task>/v<N>.txt` (a `str.format` template) and `prompts/<task>/v<N>.schema.json`.
A prompt is identified by `<task>/v<N>` and the sha256 of its template + schema; every
output row carries both. A shipped version is never edited: a change is a new version.

Tasks:
  verify        image + caption + candidate title + Wikipedia summary -> verdict
                (correct / corrected / not_an_entity), entity name, short reason
  rationale_qa  image + final entity + summary + caption -> visual rationale + 3-5 QA pairs
  rew           both in one request (`refine --rew_requests 1`): reason, verdict, entity,
                and the rationale + QA only when the verdict keeps the image

Layout (v2 of verify and rationale_qa, v1 of rew): what is the same for every request of a
run comes first and byte-identical (instructions, schema), then what is the same for every
image of one entity (its name, its summary), then the image (the `<<<IMAGE>>>` line: the
text before it and after it become two text parts around the image), then the caption. A
provider that caches prompt prefixes (OpenAI from 1,024 identical tokens, vLLM's prefix
cache in blocks of 16) then reuses the instructions for every request and the entity's
context for its other images. v1 prompts put the caption first and the image last.

Caption and Wikipedia text are quoted as DATA between markers, and the prompt tells the
model never to follow instructions inside them. Markers inside the data are neutralised so
a caption cannot close its own quote.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

TASKS = ("verify", "rationale_qa", "rew")
# Where the image goes in a prompt laid out for prefix caching (markers in DATA are defused
# by `quote`, so a caption or summary cannot move it).
IMAGE_MARKER = "<<<IMAGE>>>"
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


# The versions refine uses unless told otherwise (`--verify_prompt`, `--rationale_prompt`).
DEFAULT_VERSIONS = {"verify": "v2", "rationale_qa": "v2", "rew": "v1"}


def load_prompt(task: str, version: str | None = None) -> Prompt:
    version = version or DEFAULT_VERSIONS.get(task, "v1")
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


def split_image(text: str) -> tuple[str, str]:
    """A rendered prompt -> (text before the image, text after it); ("text", "") for a
    prompt without the image marker (the image then follows the whole text)."""
    i = text.find(IMAGE_MARKER)
    if i < 0:
        return text, ""
    after = text[i + len(IMAGE_MARKER):]
    return text[:i], after[1:] if after.startswith("\n") else after


def _data_clause(mode: str, with_context: bool) -> str:
    parts = ["the image's web caption"] if with_context else []
    if mode == "correct":
        parts.append("a candidate entity name" + (" and its Wikipedia summary" if with_context else ""))
    return ", ".join(parts) if parts else "none"


def render_verify(prompt: Prompt, *, caption: str, title: str, summary: str | None, mode: str, context: str) -> str:
    """The verify prompt, or the one-request `rew` prompt (the same placeholders)."""
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
        data_clause=_data_clause(mode, with_context),
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
