"""The opsets the ai.bnncc functions are written against."""

from onnxscript import opset18 as op  # noqa: F401  (the function bodies' default-domain ops: domain.CANONICAL_OPSET)
from onnxscript.values import Opset

from bnncc.domain import DOMAIN, VERSION

bnncc_opset = Opset(DOMAIN, VERSION)
