"""``python -m bnncc`` (and ``torchrun -m bnncc finetune ...``): the command line."""

from bnncc.cli import main

main()
