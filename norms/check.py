"""Find impossible normalization set-ups before training, naming the layer."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def check_statistics(model: nn.Module, input_shape) -> None:
    """Raise ValueError if a norm layer would normalise over a single value.

    input_shape is one device's input, e.g. (batch_size_per_device, 3, 32, 32). The shapes each
    norm sees come from one eval-mode forward on zeros of one image (no state changes), the
    batch dimension set to the device's: a batch of 100000 costs no more than one. Each layer
    with a `check_input(shape)` method judges its own.
    """
    batch = input_shape[0]
    hooks = []
    for name, module in model.named_modules():
        if hasattr(module, "check_input"):
            def hook(mod, args, name=name):
                reason = mod.check_input((batch, *args[0].shape[1:]))
                if reason:  # stop before the layer itself fails less helpfully
                    raise ValueError(f"{name} ({type(mod).__name__}): {reason}")
            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    try:
        model.eval()
        model(torch.zeros((1, *input_shape[1:]), device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
