"""Qwen2-MoE's sparse block: softmax router, top-k experts, and a sigmoid-gated shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2Config


class SparseMoeBlock(nn.Module):
    """Routes each token to `num_experts_per_tok` of `num_experts` SwiGLU experts, plus the shared expert."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        from .model import MLP

        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices (N, k) and their weights (N, k) in the activations' dtype."""
        probs = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float32)  # (N, E)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights.to(tokens.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # (N, hidden)
        indices, weights = self.route(tokens)
        # group the (token, slot) pairs by expert: one matmul per expert that received tokens, none for the rest
        flat_experts = indices.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=len(self.experts)).tolist()
        token_of_pair = order // self.top_k  # (N*k,) token index of each sorted pair
        pair_weights = weights.reshape(-1)[order]  # (N*k,)
        routed = torch.zeros_like(tokens)
        begin = 0
        for expert_index, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of_pair[begin : begin + count]
            out = self.experts[expert_index](tokens[rows]) * pair_weights[begin : begin + count, None]
            routed.index_add_(0, rows, out)
            begin += count
        shared = torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return (routed + shared).reshape(batch, length, hidden)
