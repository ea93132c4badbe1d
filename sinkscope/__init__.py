"""sinkscope: find, measure and use the attention sinks of vision transformers inside LVLMs.

>>> import sinkscope as ss
>>> ad = ss.load_model("dinov2-small")                               # real DINOv2 ViT-S/14, offline
>>> res = ss.scan(ad, ss.sample_images(4), method="all")             # doctest: +SKIP
>>> res.report.sinks()                                                # doctest: +SKIP

Layer convention: layer ``i`` is ``hidden_states[i]`` of the Hugging Face model, ``0`` is the
embedding output.
"""

from ._utils import SinkscopeError
from .capture import BatchCapture, Capture, parse_layers
from .data import ImageItem, LabeledImages, image_items, load_dataset, sample_images
from .models import Plant, TokenLayout, list_models, load_model, paint_markers
from .neurons import RegisterNeurons, register_neurons
from .probing import GroupFeatures, LinearProbe, ProbeResult, extract_group_features, probe, run_probes
from .scan import ScanResult, build_rules, scan
from .sinks import AttentionRule, Detection, DimsRule, NormRule, SinkReport, detect

__version__ = "0.1.0"

__all__ = [
    "AttentionRule",
    "BatchCapture",
    "Capture",
    "Detection",
    "DimsRule",
    "GroupFeatures",
    "ImageItem",
    "LabeledImages",
    "LinearProbe",
    "NormRule",
    "Plant",
    "ProbeResult",
    "RegisterNeurons",
    "ScanResult",
    "SinkReport",
    "SinkscopeError",
    "TokenLayout",
    "__version__",
    "build_rules",
    "detect",
    "extract_group_features",
    "image_items",
    "list_models",
    "load_dataset",
    "load_model",
    "paint_markers",
    "parse_layers",
    "probe",
    "register_neurons",
    "run_probes",
    "sample_images",
    "scan",
]
