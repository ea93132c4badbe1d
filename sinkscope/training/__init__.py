"""Training LLaVA connectors on cached tower features: :mod:`~sinkscope.training.projector`
(``sinkscope train-projector``), DIYSink's dual connector and router
(:mod:`~sinkscope.training.diysink`, ``sinkscope diysink``), their data
(:mod:`~sinkscope.training.examples`) and the feature cache (:mod:`~sinkscope.training.features`)."""

from .diysink import DIYSinkResult, init_diysink, train_diysink
from .projector import TrainResult, train_projector

__all__ = ["DIYSinkResult", "TrainResult", "init_diysink", "train_diysink", "train_projector"]
