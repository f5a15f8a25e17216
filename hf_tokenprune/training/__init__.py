"""Compressor training: the label store (:mod:`.store`), padded batches (:mod:`.data`), the training loop
(:mod:`.train`) and scoring compressors on labels (:mod:`.evaluation`)."""

from .evaluation import evaluate_compressors
from .result import TrainResult
from .store import LabelRecord, LabelWriter, merge_index, read_index, read_labels
from .train import DEPTH_CHANNELS, train_compressor

__all__ = ["DEPTH_CHANNELS", "LabelRecord", "LabelWriter", "TrainResult", "evaluate_compressors", "merge_index",
           "read_index", "read_labels", "train_compressor"]
