"""Toy-model figures of the paper: ``python main_toy.py --out figures/toy [--figure ...]``."""

import sys

from ivreg.analysis.toy_figures import main

if __name__ == "__main__":
    sys.exit(main())
