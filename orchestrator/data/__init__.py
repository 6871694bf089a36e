"""Datasets streamed so no run loads a whole one: tables and images as sharded Parquet read
through pyarrow, text as a token file tokenised once and memory-mapped.

``resolve_dataset`` turns the config's data section into a picklable ``DatasetInfo``;
workers build an ``orchestrator.data.stream.BatchStream`` from it (kept out of this module so
listing or validating datasets does not import torch).
"""

from orchestrator.data.builtin import BUILTIN_DATASETS, BuiltinDataset
from orchestrator.data.source import DatasetInfo, check_dataset, resolve_dataset

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "DatasetInfo", "check_dataset", "resolve_dataset"]
