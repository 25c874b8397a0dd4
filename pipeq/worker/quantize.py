"""A loaded model's memory footprint, counting the int8 weights that quantization packs away.

The int8 precision itself (bitsandbytes on CUDA, torch dynamic quantization on the CPU) is its
entry in the precision registry, ``pipeq.precisions``.
"""

from __future__ import annotations

from typing import Any

from pipeq.precisions import quantize_dynamic_int8

__all__ = ["memory_footprint", "quantize_dynamic_int8"]  # quantize_dynamic_int8: benchmarks import it from here


def memory_footprint(model: Any) -> int:
    """Bytes of parameters and buffers, counting the packed int8 weights that dynamic quantization hides."""
    import torch

    total = int(model.get_memory_footprint()) if hasattr(model, "get_memory_footprint") else 0
    if not total:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        total += sum(b.numel() * b.element_size() for b in model.buffers())
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    for module in model.modules():
        if isinstance(module, dynamic_linear):
            weight, bias = module._packed_params._weight_bias()
            total += weight.numel() * weight.element_size()
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total
