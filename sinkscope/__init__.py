"""sinkscope: find, measure and use the attention sinks of vision transformers inside LVLMs.

>>> import sinkscope as ss
>>> ad = ss.load_model("dinov2-small")                               # real DINOv2 ViT-S/14, offline
>>> res = ss.scan(ad, ss.sample_images(4), method="all")             # doctest: +SKIP
>>> res.report.sinks()                                                # doctest: +SKIP

Every analysis also runs from one typed config, and every run folder reads back:

>>> res = ss.run(ss.ScanConfig(model="tiny-dinov2+sinks", images=("embedded:2",), out="runs/s"))  # doctest: +SKIP
>>> ss.load_run("runs/s").config == res.config                                                # doctest: +SKIP
True

Layer convention: layer ``i`` is ``hidden_states[i]`` of the Hugging Face model, ``0`` is the
embedding output.
"""

from . import flow
from ._utils import SinkscopeError
from .capture import BatchCapture, Capture, parse_layers
from .config import DecodeConfig, FlowConfig, ProbeConfig, RunConfig, ScanConfig
from .data import ImageItem, LabeledImages, image_items, load_dataset, sample_images
from .models import Plant, TokenLayout, list_models, load_model, paint_markers
from .neurons import RegisterNeurons, register_neurons
from .api import probe, run, scan
from .flow.decoding import DecodeResult
from .flow.run import FlowResult
from .probing import GroupFeatures, LinearProbe, ProbeResult, extract_group_features, run_probes
from .runs import load_run
from .scanning import ScanResult, build_rules
from .viz import write_report, write_result_page
from .sinks import AttentionRule, Detection, DimsRule, NormRule, SinkReport, detect

__version__ = "0.1.0"

__all__ = [
    "AttentionRule",
    "BatchCapture",
    "Capture",
    "DecodeConfig",
    "DecodeResult",
    "Detection",
    "DimsRule",
    "FlowConfig",
    "FlowResult",
    "GroupFeatures",
    "ImageItem",
    "LabeledImages",
    "LinearProbe",
    "NormRule",
    "Plant",
    "ProbeConfig",
    "ProbeResult",
    "RegisterNeurons",
    "RunConfig",
    "ScanConfig",
    "ScanResult",
    "SinkReport",
    "SinkscopeError",
    "TokenLayout",
    "__version__",
    "build_rules",
    "detect",
    "extract_group_features",
    "flow",
    "image_items",
    "list_models",
    "load_dataset",
    "load_run",
    "load_model",
    "paint_markers",
    "parse_layers",
    "probe",
    "register_neurons",
    "run",
    "run_probes",
    "sample_images",
    "scan",
    "write_report",
    "write_result_page",
]
