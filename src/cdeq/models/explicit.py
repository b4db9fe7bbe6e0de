"""Explicit (feed-forward) baselines of about the same parameter count as the DEQ models.

Plain ``nn.Module`` s with ``forward(x) -> logits`` on the same inputs as their DEQ counterparts:

- :class:`GCN` (Kipf & Welling 2017) and :class:`GAT` (Velickovic et al. 2018) for graphs,
  x = node features ``(1, N, F)``, logits ``(1, N, C)``;
- :class:`ResNet` (a small residual CNN) for images, x = ``(B, 1, 28, 28)``, logits ``(B, C)``;
- :class:`Transformer` (pre-LayerNorm, the DEQ transformer's width) for text, x = token ids
  ``(B, L)``, logits ``(B, L, V)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.models.ignn import SparseAdjacency
from cdeq.models.transformer import CausalSelfAttention, FeedForward, TokenEmbedding


def _check_graph_x(x: Tensor, num_nodes: int) -> None:
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != num_nodes:
        raise ValueError(f"x: expected node features of shape (1, {num_nodes}, F), got {tuple(x.shape)}")


class GCN(nn.Module):
    """Two-layer graph convolutional network: ``A relu(A X W_1) W_2`` with the normalised
    adjacency ``A = D^-1/2 (A + I) D^-1/2`` and dropout before each layer."""

    def __init__(self, edge_index: Tensor, num_nodes: int, in_features: int, num_classes: int,
                 hidden: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        self.adj = SparseAdjacency(edge_index, num_nodes)
        self.num_nodes, self.dropout = num_nodes, dropout
        self.lin1, self.lin2 = nn.Linear(in_features, hidden), nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_graph_x(x, self.num_nodes)
        h = F.dropout(x[0], self.dropout, self.training)
        h = torch.relu(self.adj(self.lin1(h)))
        h = F.dropout(h, self.dropout, self.training)
        return self.adj(self.lin2(h)).unsqueeze(0)


class _GATLayer(nn.Module):
    """Multi-head graph attention: ``alpha_ij = softmax_j LeakyReLU(a_s . W h_i + a_d . W h_j)``
    over the neighbours j of i (self loops included), output ``sum_j alpha_ij W h_j``."""

    def __init__(self, in_features: int, out_per_head: int, heads: int, concat: bool, dropout: float) -> None:
        super().__init__()
        self.heads, self.out, self.concat, self.dropout = heads, out_per_head, concat, dropout
        self.lin = nn.Linear(in_features, heads * out_per_head, bias=False)
        self.att_src = nn.Parameter(torch.empty(heads, out_per_head))
        self.att_dst = nn.Parameter(torch.empty(heads, out_per_head))
        self.bias = nn.Parameter(torch.zeros(heads * out_per_head if concat else out_per_head))
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, h: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        n = h.shape[0]
        wh = self.lin(h).view(n, self.heads, self.out)
        logits = F.leaky_relu((wh * self.att_dst).sum(-1)[dst] + (wh * self.att_src).sum(-1)[src], 0.2)
        logits = logits - logits.max()  # a global shift leaves each neighbourhood's softmax unchanged
        weight = logits.exp()
        denom = torch.zeros(n, self.heads, dtype=h.dtype, device=h.device).index_add_(0, dst, weight)
        alpha = F.dropout(weight / denom[dst], self.dropout, self.training)
        out = torch.zeros_like(wh).index_add_(0, dst, alpha.unsqueeze(-1) * wh[src])
        out = out.reshape(n, -1) if self.concat else out.mean(dim=1)
        return out + self.bias


class GAT(nn.Module):
    """Two-layer graph attention network (8 heads of 8 features, then one averaged output head)."""

    def __init__(self, edge_index: Tensor, num_nodes: int, in_features: int, num_classes: int,
                 hidden: int = 8, heads: int = 8, dropout: float = 0.6) -> None:
        super().__init__()
        pattern = SparseAdjacency(edge_index, num_nodes).indices()  # the edges plus self loops
        self.register_buffer("src", pattern[1].clone(), persistent=False)
        self.register_buffer("dst", pattern[0].clone(), persistent=False)
        self.num_nodes, self.dropout = num_nodes, dropout
        self.gat1 = _GATLayer(in_features, hidden, heads, concat=True, dropout=dropout)
        self.gat2 = _GATLayer(hidden * heads, num_classes, 1, concat=False, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_graph_x(x, self.num_nodes)
        h = F.dropout(x[0], self.dropout, self.training)
        h = F.elu(self.gat1(h, self.src, self.dst))
        h = F.dropout(h, self.dropout, self.training)
        return self.gat2(h, self.src, self.dst).unsqueeze(0)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.gn1, self.gn2 = nn.GroupNorm(groups, cout), nn.GroupNorm(groups, cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(groups, cout)))

    def forward(self, h: Tensor) -> Tensor:
        out = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(h)))))
        return torch.relu(out + self.skip(h))


class ResNet(nn.Module):
    """A small residual CNN: a stem, one residual block per stage (the first stage at the stem's
    resolution, each later one halving it), average pooling to a ``pool x pool`` grid and a linear
    classifier of the flattened grid (as the MDEQ's readout)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (32, 64),
                 stem_stride: int = 1, blocks_per_stage: int = 1, groups: int = 4, pool: int = 4) -> None:
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, stride=stem_stride, padding=1, bias=False),
                                  nn.GroupNorm(groups, c0), nn.ReLU())
        stages: list[nn.Module] = []
        cin = c0
        for i, c in enumerate(channels):
            for k in range(blocks_per_stage):
                stages.append(_ResBlock(cin, c, 2 if (i > 0 and k == 0) else 1, groups))
                cin = c
        self.stages = nn.Sequential(*stages)
        self.pool = pool
        self.classifier = nn.Linear(cin * pool * pool, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x: expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        return self.classifier(F.adaptive_avg_pool2d(self.stages(self.stem(x)), self.pool).flatten(1))


class _Block(nn.Module):
    """A pre-LayerNorm transformer block: ``h + Attn(LN(h))``, then ``+ FFN(LN(.))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.ffn = CausalSelfAttention(d_model, n_heads), FeedForward(d_model, d_ff)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.ffn(self.ln2(h))


class Transformer(nn.Module):
    """Explicit causal transformer LM of ``n_layers`` pre-LN blocks with the same embedding, block
    width and tied head as :class:`cdeq.models.transformer.DEQTransformer` (one block has the
    DEQ transformer's parameter count)."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_heads: int = 4, d_ff: int = 512,
                 max_len: int = 256, n_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, d_model, max_len, dropout)
        self.blocks = nn.Sequential(*(_Block(d_model, n_heads, d_ff) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.ln_f(self.blocks(self.embed(x))), self.embed.word.weight)
