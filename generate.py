"""Continue prompts with a trained model: python generate.py ckpt=PATH prompt="...". See README.md.

The same app as the console script `lmlab-generate`; the steps are in src/lmlab/generation.py.
"""

from lmlab.cli import generate_main

if __name__ == "__main__":
    generate_main()
