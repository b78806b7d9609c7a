"""Writers: typed records to Parquet (schema derived from the record), rejects to
`rejected/<stage>/rejects-*.jsonl` with one counter per stage and reason."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.common import METRICS_NAMESPACE
from transforms.schema import Reject, arrow_schema, to_row, truncate_json


class WriteRecordsToParquet(beam.PTransform):
    """Dataclass records -> `<prefix>-SSSSS-of-NNNNN.parquet`, schema from the record type."""

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


class _CountReject(beam.DoFn):
    def process(self, r: Reject):
        Metrics.counter(METRICS_NAMESPACE, f"rejected_{r.stage}_{r.reason}").inc(r.count)
        if r.count == 0:
            # A file that could not be read at all: its rows are unknown, count the file.
            Metrics.counter(METRICS_NAMESPACE, f"rejected_{r.stage}_{r.reason}_files").inc()
        yield r


class WriteRejects(beam.PTransform):
    """Rejects -> `<output>/rejected/<stage>/rejects-*.jsonl`, one folder per known stage.

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
        for stage, part in zip(self.stages, parts):
            (
                part
                | f"ToJson_{stage}" >> beam.Map(Reject.to_json)
                | f"Write_{stage}"
                >> beam.io.WriteToText(
                    f"{self.output_dir}/rejected/{stage}/rejects",
                    file_name_suffix=".jsonl",
                )
            )
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
