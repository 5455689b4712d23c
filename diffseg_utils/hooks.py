"""Context managers that observe or modify a denoiser (UNet or transformer) and always restore it.

``CaptureOutputs`` records sub-module outputs with forward hooks; ``AttentionProcessors``
swaps diffusers attention processors and puts the originals back. Both refuse to be entered
twice and clean up even when the forward pass raises.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .backbones.base import first_tensor


class CaptureOutputs:
    """Record the outputs of named sub-modules during forward passes.

    >>> with CaptureOutputs(unet, ["up_blocks.1.attentions.0"]) as cap:
    ...     unet(x, t, encoder_hidden_states=c)
    >>> cap.outputs["up_blocks.1.attentions.0"]   # the tensor of the last call

    ``read`` turns a sub-module's output into a tensor (default: its first tensor; a backbone's
    :meth:`~diffseg_utils.backbones.Backbone.capture` reads transformer tokens as maps);
    ``transform`` maps each captured tensor (e.g. a dtype cast or a slice) before it is stored; the UNet's own computation is untouched (hooks return None).
    """

    def __init__(self, module: nn.Module, names: Iterable[str],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 read: Callable[[object], torch.Tensor] = first_tensor):
        self.module = module
        self.read = read
        self.names = list(names)
        self.transform = transform or (lambda x: x.detach())
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "CaptureOutputs":
        if self._handles:
            raise RuntimeError("CaptureOutputs is already installed; use a new one or exit the first")
        for name in self.names:
            sub = self.module.get_submodule(name)

            def hook(_m, _inp, out, name=name):
                self.outputs[name] = self.transform(self.read(out))

            self._handles.append(sub.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class AttentionProcessors:
    """Install attention processors for some layers and restore the originals on exit.

    ``processors`` maps a layer path (``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``,
    with or without a trailing ``.processor``) to a processor.
    """

    def __init__(self, module: nn.Module, processors: dict[str, object]):
        self.module = module
        self.processors = {k.removesuffix(".processor"): v for k, v in processors.items()}
        self._saved: dict[str, object] | None = None

    def __enter__(self) -> "AttentionProcessors":
        if self._saved is not None:
            raise RuntimeError("AttentionProcessors is already installed")
        self._saved = {}
        try:
            for path, proc in self.processors.items():
                attn = self.module.get_submodule(path)
                self._saved[path] = attn.processor
                attn.set_processor(proc)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for path, proc in (self._saved or {}).items():
            self.module.get_submodule(path).set_processor(proc)
        self._saved = None
