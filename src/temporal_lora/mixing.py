"""Apply any per-sample mix of LoRA adapters in one forward pass.

PEFT can run a batch where each sample uses one adapter (`adapter_names=`), but it loops over the
adapters and cannot weigh several. Here every LoRA layer gets one forward hook that computes

    delta(x) = sum_k w[b, k] * scaling_k * B_k A_k x

for all adapters at once with two matmuls over the concatenated A's and B's. Hard routing is the
special case of one-hot weights, soft routing uses the router's probabilities, top-k the
renormalised top-k probabilities, and all-zero weights give the plain base model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class AdapterMixer:
    """Owns the LoRA computation of a PeftModel holding one adapter per domain."""

    def __init__(self, peft_model: nn.Module, adapter_names: list[str]):
        from peft.tuners.lora import LoraLayer

        self.adapter_names = list(adapter_names)
        self._weights: torch.Tensor | None = None
        self._hooks = []
        self.layers: list[nn.Module] = []
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            a_cat, b_cat, rank = self._stack(module)
            # PEFT's own LoRA path stays off; this hook adds the (weighted) deltas instead.
            module.enable_adapters(False)
            module._tlora_a = a_cat
            module._tlora_b = b_cat
            module._tlora_rank = rank
            self._hooks.append(module.register_forward_hook(self._hook))
            self.layers.append(module)
        if not self.layers:
            raise ValueError("the model holds no LoRA layers")

    def _stack(self, module) -> tuple[torch.Tensor, torch.Tensor, int]:
        # Adapters may differ in rank: pad each to the largest rank with zeros (adds nothing).
        ranks = [module.lora_A[name].weight.shape[0] for name in self.adapter_names]
        rank = max(ranks)
        a_parts, b_parts = [], []
        for name, r in zip(self.adapter_names, ranks, strict=True):
            a = module.lora_A[name].weight.detach()
            b = module.lora_B[name].weight.detach() * module.scaling[name]
            a_parts.append(torch.cat([a, a.new_zeros(rank - r, a.shape[1])]))
            b_parts.append(torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1))
        return torch.cat(a_parts), torch.cat(b_parts, dim=1), rank

    def _hook(self, module, args, output):
        weights = self._weights
        if weights is None:
            return output
        x = args[0]
        rank = module._tlora_rank
        a_cat, b_cat = module._tlora_a, module._tlora_b
        h = x.to(a_cat.dtype) @ a_cat.T  # [batch, seq, K*r]
        w = weights.to(h.dtype).repeat_interleave(rank, dim=-1)  # [batch, K*r] or [batch, seq, K*r]
        if w.dim() == 2:
            h = h * w.view(w.shape[0], *([1] * (h.dim() - 2)), w.shape[1])
        else:  # per-token weights (segment routing): one row per position of this forward
            h = h * w
        return output + (h @ b_cat.T).to(output.dtype)

    @contextmanager
    def weights(self, weights: torch.Tensor | None):
        """Within this block every forward uses `weights` ([batch, n_adapters]); None = base model.

        Per-token weights [batch, seq, n_adapters] are accepted too (the forward's `seq` must match):
        segment routing scores a text whose segments use different adapters in one forward.
        Narrower weights are zero-padded on the right: the domains come first among the adapters,
        so weights over the domains alone never touch the subdomain adapters after them.
        """
        if weights is not None:
            missing = len(self.adapter_names) - weights.shape[-1]
            if missing > 0:
                weights = torch.cat([weights, weights.new_zeros(*weights.shape[:-1], missing)], dim=-1)
            if weights.dim() not in (2, 3) or weights.shape[-1] != len(self.adapter_names):
                raise ValueError(f"weights must be [batch, {len(self.adapter_names)}], got {tuple(weights.shape)}")
            if not torch.any(weights != 0):
                weights = None  # all-zero rows everywhere: skip the LoRA matmuls entirely
        previous, self._weights = self._weights, weights
        try:
            yield
        finally:
            self._weights = previous

    def stacked_bytes(self) -> int:
        """Memory held by the stacked copies of every adapter's A and B matrices (all layers)."""
        return sum(m._tlora_a.numel() * m._tlora_a.element_size() + m._tlora_b.numel() * m._tlora_b.element_size()
                   for m in self.layers)

    @contextmanager
    def peft_native(self):
        """PEFT's own LoRA path on (these hooks idle) within the block: PEFT's baselines, such as
        its `adapter_names=` mixed batches, run on the very same weights."""
        for m in self.layers:
            m.enable_adapters(True)
        previous, self._weights = self._weights, None
        try:
            yield
        finally:
            self._weights = previous
            for m in self.layers:
                m.enable_adapters(False)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        for module in self.layers:
            module.enable_adapters(True)
        self._hooks.clear()


def one_hot(indices: list[int | None], n: int) -> torch.Tensor:
    """Hard-routing weights; None (abstain) gives an all-zero row, i.e. the base model."""
    w = torch.zeros(len(indices), n)
    for row, idx in enumerate(indices):
        if idx is not None:
            w[row, idx] = 1.0
    return w
