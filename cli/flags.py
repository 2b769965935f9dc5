"""The one table from the library's fields to this CLI's flags. Library errors and log lines name what is wrong by
the field a Python caller set (``FoldRequest.max_batch_size``, ``Options.data``, ``TrainConfig.epochs``); the
commands show each as the flag that sets it (``--max-batch-size``)."""
from __future__ import annotations

import logging

from foldserve.errors import FIELD

FLAGS: dict[str, str] = {
    # foldserve fold: folding.export.FoldRequest and folding.programs.Options
    "FoldRequest.max_batch_size": "--max-batch-size",
    "FoldRequest.name": "--name",
    "FoldRequest.version": "--version",
    "FoldRequest.force": "--force",
    "FoldRequest.labels_file": "--labels",
    "FoldRequest.precision": "--precision",
    "FoldRequest.calibration_method": "--calibration-method",
    "FoldRequest.calibration_samples": "--calibration-samples",
    "Options.data": "--data",
    "Options.calibration_data": "--calibration-data",
    "Options.normalize": "--normalize",
    "Options.input_shape": "--input-shape",
    "Options.input_name": "--input-name",
    "Options.output_name": "--output-name",
    "Options.accuracy_output": "--accuracy-output",
    # foldserve train: trainer.train.TrainConfig
    "TrainConfig.data": "--data",
    "TrainConfig.dataset": "--dataset",
    "TrainConfig.out": "--out",
    "TrainConfig.epochs": "--epochs",
    "TrainConfig.batch_size": "--batch-size",
    "TrainConfig.optimizer": "--optimizer",
    "TrainConfig.lr": "--lr",
    "TrainConfig.bn_momentum": "--bn-momentum",
    "TrainConfig.bn_placement": "--bn-placement",
    "TrainConfig.precise_bn": "--precise-bn",
    "TrainConfig.val_fraction": "--val-fraction",
    "TrainConfig.device": "--device",
    "TrainConfig.resume": "--resume",
}


def render(text: str) -> str:
    """``text`` with every field it names shown as its flag (a field without a flag stays as it is)."""
    return FIELD.sub(lambda m: FLAGS.get(m.group(0), m.group(0)), text)


class FlagNames(logging.Filter):
    """Shows the library's log lines in flags, as :func:`render` shows its errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if FIELD.search(message):
            record.msg, record.args = render(message), ()
        return True
