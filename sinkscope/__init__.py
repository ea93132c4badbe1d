"""sinkscope: find, measure and use the attention sinks of vision transformers inside LVLMs.

>>> import sinkscope as ss
>>> ad = ss.load_model("dinov2-small")                  # real DINOv2 ViT-S/14, offline
>>> res = ss.scan(ad, ss.sample_images(2), method="attention", progress=False)
>>> cls = res.report.sinks().query("kind == 'cls'")       # CLS: the attention sink of most blocks
>>> dict(zip(cls.image, cls.n_layers))
{'astronaut': 9, 'chelsea': 11}

Every analysis also runs from one typed config, and every run folder reads back:

>>> res = ss.run(ss.ScanConfig(model="tiny-dinov2+sinks", images=("embedded:2",), out="runs/s"), progress=False)
>>> ss.load_run("runs/s").config == res.config
True

Layer convention: layer ``i`` is ``hidden_states[i]`` of the Hugging Face model, ``0`` is the
embedding output.
"""

from . import diysink, flow
from ._utils import SinkscopeError
from .api import probe, run, scan
from .capture import BatchCapture, Capture, parse_layers
from .config import DecodeConfig, EvalConfig, FlowConfig, ProbeConfig, RunConfig, ScanConfig
from .data import ImageItem, LabeledImages, image_items, load_dataset, sample_images
from .evaluation import EvalResult, VQAItem, evaluate, load_items
from .flow.decoding import DecodeResult
from .flow.run import FlowResult
from .models import Plant, TokenLayout, list_models, load_model, paint_markers
from .neurons import RegisterNeurons, register_neurons
from .probing import GroupFeatures, LinearProbe, ProbeResult, extract_group_features, run_probes
from .runs import load_run
from .scanning import ScanResult, build_rules
from .sinks import AttentionRule, Detection, DimsRule, NormRule, SinkReport, detect
from .training import TrainResult
from .training.diysink import DIYSinkResult
from .viz import write_report, write_result_page

__version__ = "0.1.0"

__all__ = [
    "AttentionRule",
    "BatchCapture",
    "Capture",
    "DecodeConfig",
    "EvalConfig",
    "EvalResult",
    "DecodeResult",
    "DIYSinkResult",
    "TrainResult",
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
    "VQAItem",
    "__version__",
    "build_rules",
    "detect",
    "evaluate",
    "extract_group_features",
    "diysink",
    "flow",
    "image_items",
    "list_models",
    "load_dataset",
    "load_items",
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
