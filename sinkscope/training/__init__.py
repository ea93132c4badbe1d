"""Training LLaVA connectors on cached tower features: :mod:`~sinkscope.training.projector`
(``sinkscope train-projector``), its data (:mod:`~sinkscope.training.examples`) and the feature
cache (:mod:`~sinkscope.training.features`)."""

from .projector import TrainResult, train_projector

__all__ = ["TrainResult", "train_projector"]
