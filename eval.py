"""Evaluate a trained model: python eval.py ckpt=PATH [split=test]. See README.md.

The same app as the console script `lmlab-eval`; the steps are in src/lmlab/evaluation.py.
"""

from lmlab.cli import eval_main

if __name__ == "__main__":
    eval_main()
