"""The names and defaults every part of bnncc shares, in a module that imports nothing.

The op domain's name and version, and B, the clipping bound of binary activations: the graph's
BinaryConv/PokeConv attribute is the one place a model keeps its B; this is only the default a
new graph gets (pokebnn.md section 2).
"""

DOMAIN = "ai.bnncc"
VERSION = 1
# The two names of ONNX's default domain: a node or opset import may carry either.
DEFAULT_DOMAINS = ("", "ai.onnx")
DEFAULT_CLIP_BOUND = 3.0
# The batch norms bnncc adds: ONNX BatchNormalization's defaults (momentum in ONNX's convention,
# running = momentum * running + (1 - momentum) * batch).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# The default-domain opset of every graph bnncc writes (and of the ai.bnncc function bodies), and
# the opsets of the float models it reads: their ResNet ops mean the same across them
# (passes/set_opset.py; tests/test_opsets.py compares their schemas). 28 is the newest that onnx
# 1.23 and onnxruntime 1.32 know.
CANONICAL_OPSET = 18
SUPPORTED_OPSETS = range(9, 29)
# Older opsets of float models, which the front end brings to SUPPORTED_OPSETS.start with onnx's
# version converter (the ONNX model zoo's ResNets are opsets 3 to 7).
UPGRADED_OPSETS = range(1, SUPPORTED_OPSETS.start)
# The most input pixels (H x W) a network may have: its widest activation (256 channels at a quarter
# of the size, 16 floats an input pixel; 64 for margin) within the compiled kernels' 32-bit indices.
MAX_INPUT_PIXELS = 2**31 // 64
# The files of a library folder: compile writes them, convert publishes them beside its report.
LIBRARY_FILES = ("model.so", "model.json", "model.onnx")
# The largest batch a library is compiled for, or a graph exported at: a batch of a billion was
# taken, and compiling it ran for minutes until killed; a library serves larger batches in calls of
# its compiled sizes.
MAX_BATCH = 4096
# The widths `ace` may count a float MAC's operands at: up to a double's; 99999999999 was taken, and
# the ACE printed was 27 digits long.
FLOAT_BITS = range(1, 65)
# Keys of a graph's metadata_props that later stages read (compile copies both into model.json):
# the recipe that rewrote it, and the input normalisation it was fine-tuned with, as JSON
# {"mean": [...], "std": [...]} per input channel of pixels in [0, 1] (bnncc run applies it).
RECIPE_KEY = "bnncc.recipe"
PREPROCESSING_KEY = "bnncc.preprocessing"
# ... and what a fine-tune's weights came from besides its inputs (seed, steps, rate, batch, ...), as
# JSON, so that the run can be repeated (read by no stage)
TRAINING_KEY = "bnncc.training"
# ... and what the front end changed that a user of the model sees (an NHWC input taken as NCHW,
# the output Softmax dropped), one note a line, which ``recognize`` reports with the structure
IMPORT_NOTES_KEY = "bnncc.import_notes"
