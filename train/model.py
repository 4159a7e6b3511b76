"""Models for transfer learning: build, load local weights, replace the head, freeze.

No download ever happens here: `weights` is a local state-dict file (the
torchvision file users have, e.g. alexnet-owt-7be5be79.pth, or a best.pt of
an earlier planktonio run). The head (the last Linear layer, or the last
1x1 convolution of models such as SqueezeNet) is always replaced by a fresh
one for the data set's classes, so the file's head, whatever its size, is
not loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from planktonio.errors import PlanktonioError

from .checkpoint_file import CHECKSUM, content_checksum, load_error_reason, torch_load


class TinyCNN(nn.Module):
    """A small CNN shaped like AlexNet (features, then classifier): CI-sized, same code path."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


LOCAL_MODELS = {"tiny-cnn": TinyCNN}


def head_name(model: nn.Module) -> str:
    """Dotted name of the classification head: the last Linear, else the last Conv2d."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise PlanktonioError(f"{type(model).__name__}: found no Linear or Conv2d layer to use as the head")


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the head for a freshly initialised layer with num_classes outputs; returns its name."""
    name = head_name(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    setattr(parent, child, new)
    return name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PlanktonioError(f"weights file {path}: not found (weights are never downloaded; "
                              f"copy the .pth file to this machine)")
    try:
        state = torch_load(path)
    except Exception as error:  # pickle, zip and format errors all mean "not a weights file"
        raise PlanktonioError(f"weights file {path}: cannot be read as a PyTorch state dict "
                              f"({load_error_reason(error)}); give a .pth of tensors, or a best.pt") from None
    if isinstance(state, dict) and CHECKSUM in state:  # a planktonio checkpoint (best.pt / last.pt)
        if content_checksum(state) != state[CHECKSUM]:
            raise PlanktonioError(f"weights file {path}: its content does not match its checksum (changed or "
                                  f"damaged since it was written); use another copy")
        state = state.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PlanktonioError(f"weights file {path}: not a state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: Path, head: str, model_name: str) -> None:
    """Load every parameter but the head's; any other mismatch is an error naming the keys."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(head + ".")}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise PlanktonioError(f"weights file {path} does not fit model {model_name}: {'; '.join(details)}")
    model.load_state_dict(state, strict=False)


def freeze(model: nn.Module, mode: str, head: str) -> None:
    """none: train everything; features: freeze model.features; all-but-head: only the head trains."""
    if mode == "none":
        return
    if mode == "features":
        if not hasattr(model, "features"):
            raise PlanktonioError(f"freeze: features needs a model with a .features part "
                                  f"(alexnet, vgg, ...); {type(model).__name__} has none")
        frozen = model.features.parameters()
    else:
        frozen = (p for name, p in model.named_parameters() if not name.startswith(head + "."))
    for parameter in frozen:
        parameter.requires_grad_(False)


def forward_steps(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's forward as a flat sequence of named modules, for the families whose forward is one."""
    if isinstance(model, (torchvision.models.AlexNet, torchvision.models.VGG)):
        return [*((f"features.{n}", m) for n, m in model.features.named_children()), ("avgpool", model.avgpool),
                ("flatten", nn.Flatten(1)), *((f"classifier.{n}", m) for n, m in model.classifier.named_children())]
    if isinstance(model, torchvision.models.ResNet):
        return [(name, getattr(model, name)) for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                          "layer3", "layer4", "avgpool")] + \
            [("flatten", nn.Flatten(1)), ("fc", model.fc)]
    if isinstance(model, TinyCNN):
        return [*((f"features.{n}", m) for n, m in model.features.named_children()), ("avgpool", model.avgpool),
                *((f"classifier.{n}", m) for n, m in model.classifier.named_children())]
    return None


def set_train_mode(model: nn.Module, frozen_mode: str = "train") -> None:
    """model.train(), except that fully frozen BatchNorm layers keep their running statistics.

    frozen_mode "eval" (a linear probe): every module before the first one that
    trains runs in eval mode too, so the frozen layers' dropout is off. That
    changes the result (another recipe than the study's): measure it.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.eval()
    if frozen_mode == "eval":
        steps = forward_steps(model)
        if steps is None:
            raise PlanktonioError(f"model.frozen_mode eval: {type(model).__name__}'s forward is not a sequence "
                                  f"of modules this program knows; use frozen_mode train")
        for _, module in steps:
            if any(p.requires_grad for p in module.parameters()):
                break
            module.eval()


def build_model(name: str, num_classes: int, weights: str | None = None, freeze_mode: str = "none") -> nn.Module:
    if name in LOCAL_MODELS:
        model = LOCAL_MODELS[name]()
    else:
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            known = ", ".join([*LOCAL_MODELS, *torchvision.models.list_models(module=torchvision.models)])
            raise PlanktonioError(f"unknown model {name!r}; known: {known}") from None
    head = replace_head(model, num_classes)
    if weights:
        load_backbone_weights(model, Path(weights), head, name)
    freeze(model, freeze_mode, head)
    return model
