"""``load_state_dict`` into a compressed model loads everything or changes nothing.

torch loads a state dict module by module: a refused mask in a later layer (or a size mismatch,
or a missing key) raises after earlier layers were overwritten. A pre-hook on the root of every
compressed model (registered by ``mpdify_``, ``pack``, ``unpack`` and ``load``) runs first and
checks the whole incoming state against the whole model before torch copies anything.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["guard_state_dict_loading"]

# Keys that modules add themselves when an older checkpoint lacks them.
_ADDED_BY_MODULES = ("num_batches_tracked",)


def guard_state_dict_loading(root: nn.Module) -> nn.Module:
    """Register the whole-state check on ``root`` (once); returns ``root``."""
    if not getattr(root, "_mpd_state_guard", False):
        root.register_load_state_dict_pre_hook(_check_whole_state)
        root._mpd_state_guard = True
    return root


def _check_whole_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # A module-level function, not a closure: deep copies and pickles of the model keep it.
    from .masked import MaskedWeight
    from .packed import PackedBlocks
    from .quantized import QuantizedLinear

    for name, layer in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(layer, (MaskedWeight, PackedBlocks, QuantizedLinear)):
            layer.check_incoming(state_dict, f"{name}." if name else "")
    expected = module.state_dict(prefix=prefix, keep_vars=True)
    problems = [
        f"size mismatch for {key}: copying a tensor of shape {tuple(state_dict[key].shape)}, "
        f"the model's is {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict
        and isinstance(state_dict[key], torch.Tensor)
        and not is_lazy(value)
        and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if strict:
        missing = [k for k in expected if k not in state_dict and not k.endswith(_ADDED_BY_MODULES)]
        unexpected = [k for k in state_dict if k.startswith(prefix) and k not in expected]
        if missing:
            problems.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        # torch's own error type and wording, raised before anything was copied.
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__} (nothing was loaded):\n\t"
            + "\n\t".join(problems)
        )
