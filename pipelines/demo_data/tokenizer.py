"""The demo's WordPiece vocabulary, built offline from the demo catalog and the REW texts
(a stand-in for bert-base-uncased, which no hub can give here).

    python -m pipelines.demo_data.tokenizer --rew demo_output/rew --entities demo_output/data/entities.jsonl \\
        --output demo_output/data/wordpiece
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import Counter

import pyarrow.parquet as pq


def write_vocab(rew_dir: str, entities: str, folder: str, size: int = 3000) -> str:
    """A BERT WordPiece vocabulary built from the demo catalog and REW texts (offline
    stand-in for bert-base-uncased): the special tokens, every character alone and as a
    `##` continuation, then whole words by frequency (ties by spelling). Built by counting,
    not by `tokenizers`' trainer, whose tie-breaking changes from run to run; the same
    inputs always give the same vocabulary, hence the same codes and training run."""
    from tokenizers import normalizers, pre_tokenizers

    from trainer.data import GENERIC_QUESTIONS, OVEN_QUESTION, RATIONALE_QUESTION

    texts = [json.loads(line)["wikipedia_title"] for line in open(entities, encoding="utf-8") if line.strip()]
    for r in pq.read_table(sorted(glob.glob(os.path.join(rew_dir, "samples-*.parquet"))), columns=["rationale", "qa_json"]).to_pylist():
        texts.append(r["rationale"] or "")
        for qa in json.loads(r["qa_json"] or "[]"):
            texts += [qa["question"], str(qa["answer"])]
    texts += [*GENERIC_QUESTIONS, OVEN_QUESTION, RATIONALE_QUESTION]
    normalize = normalizers.BertNormalizer(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for t in texts:
        words.update(w for w, _ in split.pre_tokenize_str(normalize.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    known = set(vocab)
    vocab += [w for w, _ in sorted(words.items(), key=lambda wn: (-wn[1], wn[0])) if w not in known][: max(0, size - len(vocab))]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return path


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rew", required=True, help="the refine output folder (its samples-*.parquet)")
    ap.add_argument("--entities", required=True, help="the catalog (JSON lines with wikipedia_title)")
    ap.add_argument("--output", required=True, help="folder for vocab.txt")
    ap.add_argument("--size", type=int, default=3000, help="vocabulary size")
    args = ap.parse_args(argv)
    path = write_vocab(args.rew, args.entities, args.output, args.size)
    print(path)
    return path


if __name__ == "__main__":
    main()
