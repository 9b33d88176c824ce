"""Reading pretraining checkpoints back: the config they were made with and the backbone.

A checkpoint is a Lightning checkpoint written by ``main_pretrain.py`` (or ``main_linear.py``):
``ckpt["state_dict"]`` holds ``backbone.*`` weights and ``ckpt["hyper_parameters"]["cfg"]`` the
resolved config that names the architecture. Every way this can go wrong becomes a
``CheckpointError`` that names the file and the problem, because a bare ``KeyError`` or a
size-mismatch traceback from ``load_state_dict`` does not tell a user which of their runs is
at fault.

Torch is imported inside the functions so that ``import ivreg`` stays cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ivreg.errors import CheckpointError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

BACKBONE_PREFIX = "backbone."


def resolve_path(path: str | Path) -> Path:
    """The checkpoint file; a run folder stands for its ``last.ckpt``."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "last.ckpt").is_file():
            return p / "last.ckpt"
        raise CheckpointError(f"{p} is a folder without last.ckpt; pass a checkpoint file")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, bare_ok: bool = False
) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True`` (no arbitrary code from the file);
    ``mmap``: tensors stay in the file until read (for a look at the config of a large one).
    ``bare_ok``: a file holding only a state_dict is read as ``{"state_dict": it}``."""
    import torch

    p = resolve_path(path)
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{p} is empty (0 bytes): its write never happened or was cut off")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a pickle
        raise CheckpointError(
            f"{p} is not a PyTorch checkpoint; pass a run's last.ckpt (or epoch<N>.ckpt), or its run folder"
        )
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # garbage bytes fail anywhere in the (weights-only, safe) unpickler
        raise CheckpointError(
            f"{p} is not a readable PyTorch checkpoint (corrupt or truncated?): {first_line(exc).split('. ')[0]}"
        ) from exc
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if not bare_ok:  # torch.save(model.state_dict())
            raise CheckpointError(
                f"{p} is a bare state_dict, not a Lightning checkpoint written by ivreg; {FOREIGN_ADVICE}"
            )
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{p} is not a Lightning checkpoint: it has no 'state_dict'")
    return ckpt


FOREIGN_ADVICE = (
    "to evaluate another library's checkpoint (solo-learn's, a torchvision state_dict), name its "
    "architecture and data: backbone.name=resnet18 data.dataset=cifar10 (and data.train_path, data.val_path)"
)


def config_of(ckpt: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    cfg = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("backbone"), Mapping):
        raise CheckpointError(
            f"{path} has no run config (hyper_parameters.cfg); it was not written by ivreg. {FOREIGN_ADVICE}"
        )
    for key in ("backbone", "data"):
        if not isinstance(cfg.get(key), Mapping):
            raise CheckpointError(f"the config stored in {path} has no '{key}' section")
    return copy.deepcopy(dict(cfg))


def require_pretraining_config(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Raise CheckpointError unless ``cfg`` is a pretraining run's config (it names a method);
    a linear-evaluation checkpoint holds a backbone too, but not the pretraining run's
    augmentations, method and heads that evaluation and resumption read."""
    if cfg.get("method"):
        return
    source = cfg.get("pretrained_feature_extractor")
    if source:
        raise CheckpointError(
            f"{path} is a linear-evaluation checkpoint (main_linear.py); pass the pretraining run's "
            f"checkpoint instead (this one was trained on {source})"
        )
    raise CheckpointError(f"the config stored in {path} names no method; it is not a pretraining checkpoint")


def load_config(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The resolved config a checkpoint was trained with (a plain dict); ``mmap`` reads no
    tensor data."""
    return config_of(read_checkpoint(path, mmap=mmap), path)


def backbone_state(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries with the prefix removed."""
    state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise CheckpointError(f"{path} holds no backbone weights (no '{BACKBONE_PREFIX}*' entries in its state_dict)")
    return state


def mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What differs between a model's state dict and ``state``, briefly (empty when they fit)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]} (checkpoint vs model)")
    if missing:
        parts.append(f"{len(missing)} missing weight(s), e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    return "; ".join(parts)


def build_backbone_for(cfg: Mapping[str, Any], arch: str | None = None) -> nn.Module:
    """A randomly initialised backbone of the architecture ``cfg`` names (``arch`` must agree)."""
    from ivreg.errors import IvregError
    from ivreg.method import backbone_from_config

    name = cfg["backbone"].get("name")
    if arch is not None and arch != name:
        raise CheckpointError(f"arch='{arch}' was requested but the checkpoint's config names backbone '{name}'")
    try:
        return backbone_from_config(cfg)
    except IvregError as exc:
        raise CheckpointError(f"cannot build the backbone the checkpoint's config describes: {exc}") from exc


# Where other libraries keep the backbone's weights: solo-learn ("backbone."; "encoder." before
# its 1.0), the same saved from inside DDP ("module."), and lightly-style modules ("model.").
FOREIGN_PREFIXES = ("backbone.", "encoder.", "module.backbone.", "module.encoder.", "model.backbone.", "module.")


def foreign_backbone_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone entries of another library's state_dict and the prefix they were under:
    those under the first of ``FOREIGN_PREFIXES`` present, prefix removed, else the whole
    state_dict (a bare backbone's; prefix "")."""
    for prefix in FOREIGN_PREFIXES:
        state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if state:
            return state, prefix
    return dict(state_dict), ""


def load_backbone_and_config(
    path: str | Path,
    map_location: Any = "cpu",
    arch: str | None = None,
    pretraining: bool = False,
    foreign: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``load_backbone`` and ``load_config`` from one read of the file. ``pretraining``: the
    checkpoint must be a pretraining run's (``require_pretraining_config``), as the evaluation
    tools that read its data and augmentations need.

    ``foreign``: for a checkpoint another library wrote (no ivreg config inside: solo-learn's,
    a bare torchvision state_dict), the config that describes it, with at least
    ``backbone.name`` and ``data.dataset`` (which chooses the CIFAR stem); its backbone weights
    are found under ``FOREIGN_PREFIXES``. Ignored for ivreg's own checkpoints."""
    import torch

    # Read onto the CPU and move only the backbone: the file also holds the projector, the
    # target network and optimiser states, which need not visit the GPU.
    movable = isinstance(map_location, (str, torch.device))
    if movable and torch.device(map_location).type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"map_location={str(map_location)!r} but no CUDA GPU is visible; use map_location='cpu'")
    ckpt = read_checkpoint(path, "cpu" if movable else map_location, bare_ok=foreign is not None)
    if foreign is not None and not isinstance((ckpt.get("hyper_parameters") or {}).get("cfg"), Mapping):
        cfg = _foreign_config(foreign, path)
        state, prefix = foreign_backbone_state(ckpt["state_dict"])
        cfg["foreign_prefix"] = prefix
    else:
        cfg = config_of(ckpt, path)
        if pretraining:
            require_pretraining_config(cfg, path)
        state = backbone_state(ckpt["state_dict"], path)
    net = build_backbone_for(cfg, arch)
    if cfg.get("foreign_checkpoint"):
        state = _as_backbone_state(state, net)
    problem = mismatch_report(net, state)
    if problem:
        named = (
            "backbone.name and backbone.kwargs; data.dataset of at most 32 px gives ResNets the CIFAR stem; "
            f"the weights read are those under {cfg.get('foreign_prefix') or 'no prefix'!r}"
            if cfg.get("foreign_checkpoint")
            else "the architecture its config names"
        )
        raise CheckpointError(
            f"the backbone weights in {path} do not fit a {cfg['backbone'].get('name')} ({named}): {problem}"
        )
    net.load_state_dict(state, strict=True)
    if movable:
        net = net.to(map_location)
    return net.eval(), cfg


CLASSIFIER_HEADS = ("fc.", "head.", "classifier.")  # torchvision's and timm's classification layers


def _as_backbone_state(state: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """A foreign state_dict as ``net``'s: without the classifier of a whole classification
    network (``fc.*`` of a torchvision ResNet; the backbone has none), and with BatchNorm's
    step counters where the file lacks them (they hold no weights; some libraries drop them)."""
    own = net.state_dict()
    fitted = {k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_HEADS)}
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in fitted:
            fitted[key] = value
    return fitted


def _foreign_config(foreign: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The config standing for a foreign checkpoint's: the given backbone and data, named
    after the file."""
    backbone = dict(foreign.get("backbone") or {})
    data = dict(foreign.get("data") or {})
    if not backbone.get("name") or not data.get("dataset"):
        raise CheckpointError(
            f"{path} has no run config (hyper_parameters.cfg); it was not written by ivreg. {FOREIGN_ADVICE}"
        )
    name = Path(path).stem if Path(path).stem != "last" else Path(path).parent.name
    return {"name": name, "backbone": backbone, "data": data, "foreign_checkpoint": True}


PROJECTOR_PREFIX = "projector."


def load_projector(path: str | Path, cfg: Mapping[str, Any], in_dim: int, map_location: Any = "cpu") -> nn.Module:
    """The pretrained projector MLP of a pretraining checkpoint (whose config is ``cfg``), in
    eval mode (its BatchNorm uses the running statistics), with ``num_features`` set: for
    evaluating the projections ``z`` the loss saw instead of the backbone's features."""
    from ivreg.heads import mlp

    ckpt = read_checkpoint(path, map_location)
    state = {k[len(PROJECTOR_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PROJECTOR_PREFIX)}
    if not state:
        raise CheckpointError(f"{path} holds no projector weights (no '{PROJECTOR_PREFIX}*' entries)")
    mk = cfg["method_kwargs"]
    net = mlp(in_dim, int(mk["proj_hidden_dim"]), int(mk["proj_output_dim"]))
    problem = mismatch_report(net, state)
    if problem:
        raise CheckpointError(f"the projector weights in {path} do not fit its config's method_kwargs: {problem}")
    net.load_state_dict(state, strict=True)
    net.num_features = int(mk["proj_output_dim"])
    return net.eval()


def load_backbone(
    path: str | Path, map_location: Any = "cpu", arch: str | None = None, foreign: Mapping[str, Any] | None = None
) -> nn.Module:
    """The pretrained backbone of a checkpoint, in eval mode.

    Returns the backbone of ``build_backbone`` (a torchvision ResNet with ``fc = Identity``,
    or a timm model without its classifier: its forward gives pooled features) with
    ``num_features`` set. ``path`` may be a run folder (its ``last.ckpt`` is used). ``arch``,
    when given, must match the architecture the checkpoint's config names. ``foreign``
    describes a checkpoint another library wrote (see ``load_backbone_and_config``).

        >>> import ivreg
        >>> net = ivreg.load_backbone("trained_models/isoloss-cifar10/last.ckpt")
        >>> feats = net(images)  # (batch, net.num_features)
        >>> solo = ivreg.load_backbone(
        ...     "solo-byol-cifar10.ckpt", foreign={"backbone": {"name": "resnet18"}, "data": {"dataset": "cifar10"}}
        ... )
    """
    return load_backbone_and_config(path, map_location, arch, foreign=foreign)[0]
