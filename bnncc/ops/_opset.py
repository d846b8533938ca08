"""The opsets the ai.bnncc functions are written against."""

from onnxscript import opset18 as op  # noqa: F401  (the default-domain ops function bodies use)
from onnxscript.values import Opset

from bnncc.domain import DOMAIN, VERSION

DEFAULT_OPSET = 18
bnncc_opset = Opset(DOMAIN, VERSION)
