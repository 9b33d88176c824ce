"""ivreg: non-contrastive self-supervised learning with implicit variance regularisation.

``ivreg.load_backbone(path)`` returns the pretrained backbone of a checkpoint.
"""

from ivreg.checkpoints import load_backbone

__version__ = "0.1.0"

__all__ = ["__version__", "load_backbone"]
