"""Train a Transformer language model: python train.py [overrides]. See README.md.

The same app as the console script `lmlab-train`; the steps are in src/lmlab/train.py.
"""

from lmlab.cli import train_main

if __name__ == "__main__":
    train_main()
