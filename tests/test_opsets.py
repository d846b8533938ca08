"""The front end reads opsets 9 to 28 as one language: the ops it matches must not change meaning
across them (passes/set_opset.py relabels the result as opset 18)."""

from __future__ import annotations

import onnx.defs
import pytest

from bnncc.domain import SUPPORTED_OPSETS

# The ops canonicalization matches or folds by name (frontend.py's docstring lists the forms).
IMPORTED_OPS = ("Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
                "Add", "Sum", "Mul", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Gather", "Concat", "Shape",
                "Gemm", "MatMul", "Identity", "Constant", "ConstantOfShape", "Expand", "Cast", "CastLike", "Pad",
                "Transpose", "Softmax", "LogSoftmax", "Dropout")
# Attributes added after opset 21 that cannot change a float32 model: round_mode applies only to
# casts to float8e8m0.
HARMLESS_ADDITIONS = {"Cast": {"round_mode"}, "CastLike": {"round_mode"}}


def _signature(schema: onnx.defs.OpSchema) -> tuple:
    inputs = tuple((i.name, i.option) for i in schema.inputs)
    outputs = tuple((o.name, o.option) for o in schema.outputs)
    attributes = {name: (a.type, a.required, a.default_value.SerializeToString())
                  for name, a in schema.attributes.items() if name not in HARMLESS_ADDITIONS.get(schema.name, ())}
    return inputs, outputs, attributes


@pytest.mark.parametrize("op", IMPORTED_OPS)
def test_an_imported_op_has_one_signature_from_opset_21_to_the_newest_read(op):
    newest = SUPPORTED_OPSETS.stop - 1
    assert newest <= onnx.defs.onnx_opset_version(), "onnx does not know the newest opset bnncc reads"
    at_21 = _signature(onnx.defs.get_schema(op, 21))
    for version in range(22, newest + 1):
        assert _signature(onnx.defs.get_schema(op, version)) == at_21, f"{op} changed by opset {version}"
