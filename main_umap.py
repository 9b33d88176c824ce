"""2-D map of a pretrained backbone's features coloured by class (UMAP, t-SNE or PCA).

    python3 main_umap.py trained_models/isoloss_cifar10 --out figures/umap.png

UMAP needs ``pip install 'ivreg[umap]'``; ``--method tsne`` and ``--method pca`` need only scikit-learn.
"""

import sys

from ivreg.analysis.umap_plot import main

if __name__ == "__main__":
    sys.exit(main())
