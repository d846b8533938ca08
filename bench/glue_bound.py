"""How close the fused PokeConv epilogues let PokeBNN-1x come to its binary convs: an instruction count.

Run: ``.venv/bin/python bench/glue_bound.py`` (no timing; the same on every machine).

Issue 16 asks for a whole network within 1.3x of its binary convs. This counts, for each of the
48 binary convs (``kernels.resnet50_shapes``), the 512-bit vector instructions per 16-channel
output vector that the conv needs at the popcount peak (xor, popcount and add per 32-bit word:
bench/popcount_peak.c's loop) and the fewest the op's float32 epilogue needs (below), and prints
(conv + epilogue) / conv for the network and per stage. Both at the same instruction rate, this is
a lower bound of whole network / binary convs before the stem, SE gates and head are added.

Epilogue instructions an output vector (bnncc.targets.lower's fused kernel, batch 1):
the count (1x1: one subtraction; 3x3: a table load and a subtraction), the integer-to-float
conversion, the scale-and-shift multiply-add, DPReLU (compare, blend, multiply-add), the store,
the next layer's sign bits (a compare, and a mask pack and store per two vectors), the next SE
gate's row sum (an add); then the shortcuts: an add each; a channel mean of k channels k - 1 adds,
a multiply and 2 (k - 1) lane-crossing permutes; a 3x3/2 average pool 8 adds and a multiply; the
expand conv's zero-padded local shortcut only on the Cin / Cout share of its vectors.
"""

from __future__ import annotations

from kernels import Shape, resnet50_shapes

CONV_PER_WORD = 3  # xor, popcount, add
BASE_1X1 = 1 + 1 + 1 + 3 + 1 + 1.5 + 1  # count, convert, multiply-add, DPReLU, store, sign bits, row sum
BASE_3X3 = BASE_1X1 + 1  # the border table's load
POOL = 9  # 8 adds and a multiply


def conv_instructions(shape: Shape) -> float:
    """Per output vector: the words of one window, three instructions each."""
    return CONV_PER_WORD * shape.cin * shape.kernel ** 2 / 32


def epilogue_instructions(shape: Shape) -> float:
    """Per output vector, by the conv's place in its bottleneck (kernels.resnet50_shapes' names)."""
    first = shape.name.endswith("first")
    if "conv1" in shape.name:  # 1x1 shrink: the local shortcut is the block input's channel mean
        k = shape.cin // shape.cout
        mean = 0 if k == 1 else (k - 1) + 1 + 2 * (k - 1)
        return BASE_1X1 + mean + 1
    if "conv2" in shape.name:  # 3x3: the identity local shortcut, pooled when the conv is strided
        return BASE_3X3 + 1 + (POOL if shape.stride == 2 else 0)
    # 1x1 expand: zero-padded local shortcut on Cin/Cout of the vectors; the block shortcut (tiled
    # and pooled in a stage's first block after the first stage)
    pooled = first and not shape.name.startswith("s1")
    return BASE_1X1 + shape.cin / shape.cout + 1 + (POOL if pooled else 0)


def main() -> None:
    rows: dict[str, list[float]] = {}
    for shape in resnet50_shapes():
        size = shape.size // shape.stride
        vectors = shape.count * size * size * shape.cout / 16
        stage = rows.setdefault(shape.name.split()[0], [0.0, 0.0])
        stage[0] += vectors * conv_instructions(shape)
        stage[1] += vectors * epilogue_instructions(shape)
    conv, epilogue = (sum(r[i] for r in rows.values()) for i in (0, 1))
    print("| stage | conv instructions (M) | epilogue instructions (M) | (conv + epilogue) / conv |")
    print("|---|---|---|---|")
    for name, (c, e) in rows.items():
        print(f"| {name} | {c / 1e6:.2f} | {e / 1e6:.2f} | {(c + e) / c:.2f} |")
    print(f"| network | {conv / 1e6:.2f} | {epilogue / 1e6:.2f} | **{(conv + epilogue) / conv:.2f}** |")


if __name__ == "__main__":
    main()
