"""Local training loop and evaluation."""

from fedlora.train.evaluate import EvalResult, evaluate
from fedlora.train.hooks import LocalTraining
from fedlora.train.loop import RoundPlan, TrainResult, train_local
from fedlora.train.schedule import lr_factor

__all__ = ["EvalResult", "LocalTraining", "RoundPlan", "TrainResult", "evaluate", "lr_factor",
           "train_local"]
