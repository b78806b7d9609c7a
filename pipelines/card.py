"""Write (or redraw) the dataset card and viewer of an output directory.

    python -m pipelines.card DIR [--max_rows 200000] [--viewer_records 300] [--viewer_rejects 2000]

Every pipeline and trainer.train write these when they finish; this redraws them, for
example after a Dataflow run whose launcher was stopped before the card, or with a larger
sample. DIR is any output directory with a `manifest.json` (local or gs://). Writes
`DIR/README.md` (Hugging Face dataset-card style: YAML front matter, tables of the
manifest's counts, plots), `DIR/plots/*.png` and `DIR/viewer.html`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from transforms.run.cli import Parser


def build_parser() -> Parser:
    p = Parser("pipelines.card", __doc__.split("\n\n")[0])
    p.add_argument("dir", help="an output directory with a manifest.json (local or gs://)")
    p.add_argument("--max_rows", type=int, default=200_000, help="rows read at most for the plots (a sample spread over the files)")
    p.add_argument("--viewer_records", type=int, default=300, help="records in viewer.html (a sample spread over the files)")
    p.add_argument("--viewer_rejects", type=int, default=2000,
                   help="rejects in viewer.html, shared between stages and reasons (the page builds only what a filter shows)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from apache_beam.io.filesystems import FileSystems

    from transforms.report.card import write_card

    args = build_parser().parse_args(argv)
    out = args.dir.rstrip("/")
    if not FileSystems.exists(f"{out}/manifest.json"):
        print(f"{args.dir}: no manifest.json there: give an output directory of an entityforge command "
              "(python -m pipelines.inspect DIR lists the outputs inside a folder)", file=sys.stderr)
        return 2
    made = write_card(out, max_rows=args.max_rows, viewer_records=args.viewer_records,
                      viewer_rejects=args.viewer_rejects)
    print(f"card: {made['card']} ({len(made['plots'])} plots)" + (f"   viewer: {made['viewer']}" if made["viewer"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
