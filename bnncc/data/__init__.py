"""Data shipped with bnncc: a small sample of Fashion-MNIST for ``bnncc demo`` (see fashion_mnist/LICENSE)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FASHION_MNIST_SAMPLE"]

# The first 2000 training and the first 500 test images of Fashion-MNIST, as IDX .gz files, in
# the layout bnncc.train.data reads (train-*/t10k-* images and labels).
FASHION_MNIST_SAMPLE = Path(__file__).parent / "fashion_mnist"
