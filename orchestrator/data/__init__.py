"""Datasets as sharded Parquet streamed through pyarrow, so no run loads a whole dataset.

``resolve_dataset`` turns the config's data section into a picklable ``DatasetInfo``;
workers build an ``orchestrator.data.stream.BatchStream`` from it (kept out of this module so
listing or validating datasets does not import torch).
"""

from orchestrator.data.builtin import BUILTIN_DATASETS, BuiltinDataset
from orchestrator.data.source import DatasetInfo, check_dataset, resolve_dataset

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "DatasetInfo", "check_dataset", "resolve_dataset"]
