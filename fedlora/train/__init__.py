"""Local training loop and evaluation."""

from fedlora.train.evaluate import EvalResult, evaluate
from fedlora.train.loop import TrainResult, train_local
from fedlora.train.schedule import lr_factor

__all__ = ["EvalResult", "TrainResult", "evaluate", "lr_factor", "train_local"]
