"""sinkscope: find, measure and use the attention sinks of vision transformers inside LVLMs.

>>> import sinkscope as ss
>>> ad = ss.load_model("tiny-dinov2+sinks")
>>> report = ss.scan(ad, ss.sample_images(2, ad))          # doctest: +SKIP
"""

from ._utils import SinkscopeError
from .models import Plant, TokenLayout, list_models, load_model, paint_markers

__version__ = "0.1.0"

__all__ = [
    "Plant",
    "SinkscopeError",
    "TokenLayout",
    "__version__",
    "list_models",
    "load_model",
    "paint_markers",
]
