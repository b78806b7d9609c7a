"""Writers: typed records to Parquet (schema derived from the record), rejects to
`rejected/<stage>/rejects-*.jsonl` with one counter per stage and reason."""

from __future__ import annotations

import dataclasses
import logging

import apache_beam as beam

from transforms.progress import counter as progress_counter
from transforms.schema import Reject, arrow_schema, to_row, truncate_json

WRITTEN_PREFIX = "written_"


class _CountFile(beam.DoFn):
    """A finalised file -> {"path", "rows", "bytes"}, its rows counted in the file itself."""

    def __init__(self, what: str):
        self.what = what

    def process(self, path: str):
        from apache_beam.io.filesystems import FileSystems

        from transforms.formats.shards import count_records

        rows = count_records(path)
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        progress_counter(f"{WRITTEN_PREFIX}{self.what}").inc(rows)
        progress_counter(f"files_{WRITTEN_PREFIX}{self.what}").inc()
        yield {"path": path, "rows": rows, "bytes": size}


class CountWritten(beam.PTransform):
    """The file names a Beam file sink reports after its final rename -> one dict per file
    with the rows read back from it; counter `written_<what>` sums them.

    This is what the count checks compare with the records a stage meant to write: a
    record lost between a transform and the files (a sink that drops one) shows up as a
    gap, which a counter incremented before the sink could never show.
    """

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def expand(self, paths):
        return paths | "CountRows" >> beam.ParDo(_CountFile(self.what))


def files_summary(counted: list[dict], fmt: str) -> dict:
    """`CountWritten`'s per-file dicts -> `{"format", "files", "rows", "bytes"}`."""
    counted = sorted(counted, key=lambda f: f["path"])
    return {
        "format": fmt,
        "files": [f["path"] for f in counted],
        "rows": {f["path"]: f["rows"] for f in counted},
        "bytes": {f["path"]: f["bytes"] for f in counted},
    }


class WriteRecordsToParquet(beam.PTransform):
    """Dataclass records -> `<prefix>-SSSSS-of-NNNNN.parquet`, schema from the record type.

    Returns the finalised file names (what Beam's Parquet sink reports)."""

    def __init__(self, prefix: str, record_cls, exclude: tuple[str, ...] = (), num_shards: int = 0):
        super().__init__()
        self.prefix = prefix
        self.record_cls = record_cls
        self.exclude = tuple(exclude)
        self.num_shards = num_shards

    def expand(self, records):
        exclude = self.exclude
        return (
            records
            | "ToRow" >> beam.Map(lambda r: to_row(r, exclude))
            | "WriteParquet"
            >> beam.io.WriteToParquet(
                self.prefix,
                arrow_schema(self.record_cls, exclude),
                file_name_suffix=".parquet",
                num_shards=self.num_shards,
                # Parquet readers seek by row group: keep them modest so a reader of
                # one shard does not need the whole file in memory.
                row_group_buffer_size=32 * 1024 * 1024,
            )
        )


class _QuietEmptySinks(logging.Filter):
    """Beam warns "No shards found to finalize" for every sink that wrote nothing; reject
    sinks write nothing by design when a stage rejects nothing (skip_if_empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No shards found to finalize")


logging.getLogger("apache_beam.io.filebasedsink").addFilter(_QuietEmptySinks())

# Every reject stage of the project (what `rejected/<stage>/` folders are called), so a
# counter `rejected_<stage>_<reason>` can be split back into its stage and reason.
KNOWN_STAGES = (
    "read_catalog", "dedup", "embed", "read_captions", "search", "select", "read_candidates", "decode",
    "decontaminate", "eval_images", "read_samples", "verify", "ground", "rationale_qa", "read_oven", "images", "other",
)

REJECTS_EMITTED = "rejects_emitted"
REJECTS_WRITTEN = f"{WRITTEN_PREFIX}rejects"


class _CountReject(beam.DoFn):
    """Counts a reject and cleans it of credentials (error texts may quote a request URL
    or a server's echo of a key) before it is written."""

    def process(self, r: Reject):
        from transforms.secrets import redact

        r = dataclasses.replace(
            r, detail=redact(r.detail or "") or r.detail, record_json=redact(r.record_json, strip_query=False) if r.record_json else r.record_json
        )
        progress_counter(REJECTS_EMITTED).inc()
        progress_counter(f"rejected_{r.stage}_{r.reason}").inc(r.count)
        if r.count == 0:
            # A file that could not be read at all: its rows are unknown, count the file.
            progress_counter(f"rejected_{r.stage}_{r.reason}_files").inc()
        yield r


class WriteRejects(beam.PTransform):
    """Rejects -> `<output>/rejected/<stage>/rejects-*.jsonl`, one folder per stage that
    rejected something (a stage without rejects writes no empty file).

    `pcolls` may be one PCollection or a sequence of them. A stage not in `stages` goes to
    `rejected/other/`, so nothing is lost even when a new stage forgets to register.
    """

    def __init__(self, output_dir: str, stages: list[str]):
        super().__init__()
        self.output_dir = output_dir.rstrip("/")
        self.stages = list(stages) + ["other"]

    def expand(self, pcolls):
        if isinstance(pcolls, beam.PCollection):
            pcolls = [pcolls]
        merged = tuple(pcolls) | "FlattenRejects" >> beam.Flatten()
        index = {s: i for i, s in enumerate(self.stages)}
        other = len(self.stages) - 1
        parts = (
            merged
            | "CountRejects" >> beam.ParDo(_CountReject())
            | "ByStage"
            >> beam.Partition(lambda r, n: index.get(r.stage, other), len(self.stages))
        )
        files = []
        for stage, part in zip(self.stages, parts):
            files.append(
                part
                | f"ToJson_{stage}" >> beam.Map(Reject.to_json)
                | f"Write_{stage}"
                >> beam.io.WriteToText(
                    f"{self.output_dir}/rejected/{stage}/rejects",
                    file_name_suffix=".jsonl",
                    # A stage with no rejects leaves no file (and no folder on a local disk).
                    skip_if_empty=True,
                )
            )
        # Every reject line is counted again in the finished files (`written_rejects`),
        # and the run's count check compares it with the rejects emitted.
        _ = tuple(files) | "RejectFiles" >> beam.Flatten() | "CountRejectLines" >> CountWritten("rejects")
        return merged


class DeadLetters(beam.DoFn):
    """RunInference's failed batches -> one Reject per record."""

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        self.reason = reason

    def process(self, element):
        batch, error = element if isinstance(element, tuple) and len(element) == 2 else (element, "")
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            # Keyed elements: (key, example); the key may itself be (record, extra).
            record = item
            while isinstance(record, tuple) and record:
                record = record[0]
            yield Reject(
                stage=self.stage,
                reason=self.reason,
                detail=str(error)[:1000],
                key=getattr(record, "key", None),
                source=getattr(record, "source", None),
                record_json=truncate_json(
                    dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
                ),
            )
