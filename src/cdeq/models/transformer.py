"""DEQ transformer for word-level language modelling (torchdeq paper Eq. 21 and appendix E).

One weight-tied pre-LayerNorm block is the layer f_theta. With token embeddings ``e = U(x)``
(word + learned position embeddings), one application is::

    z_tilde = e + Attention(LN_1(z + e))            # q, k, v from the state and the injection
    z'      = z_tilde + FFN(LN_2(z_tilde))

Causal multi-head self-attention (a position sees itself and earlier positions) and a two-layer
GELU FFN, as in Eq. 21. Difference from Eq. 21: the residual stream of the block starts from the
injection ``e`` instead of from ``z``. An identity path ``z -> z`` would give the layer's Jacobian
an eigenvalue near 1 at initialisation, so the fixed-point solvers would crawl; without it the
Jacobian passes through LN_1 and attention and starts contractive, and the Jacobian penalty keeps
it so (Eq. 17-18). The readout is a final LayerNorm and a linear head tied to the word embedding.

Sequences are fixed-length segments: there is no recurrence memory of earlier segments (the
``z*_{0:t}`` context of Eq. 21 is empty), so every segment is modelled on its own.

For large vocabularies (WikiText, 33k words and more) ``cutoffs`` switches the input and output to
:class:`AdaptiveIO`: an adaptive softmax (Grave et al. 2017) whose word vectors are also the input
embeddings (tied adaptive input, Baevski & Auli 2019), so that neither the embedding table nor the
head grows with d x V. ``readout`` then returns log-probabilities over the whole vocabulary and
:meth:`DEQTransformer.lm_loss` the adaptive softmax's own loss, which evaluates a tail cluster only
for the targets that fall in it. :class:`AdaptiveTransformer` is the explicit model of that size.

:class:`CausalSelfAttention`, :class:`FeedForward` and :class:`TokenEmbedding` are shared with the
explicit transformer baseline (:mod:`cdeq.models.explicit`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.models.protocol import DEQModel

# Initial gain of the block's output projections (attention out, FFN second layer). With it and
# unit-scale token embeddings the layer starts contractive (spectral radius ~0.2; Anderson reaches
# 1e-5 in 8 steps), where the default init gives ~1 and a residual of ~1e-1 after 30 steps.
OUTPUT_GAIN = 0.3

# Adaptive softmax cut-offs for WikiText-2's 33,278 words (ids in falling frequency). The DEQ
# transformer on WikiText-103 cuts 267k words at 20000/40000/200000; scaled to 33k the head keeps
# the 2000 most frequent words (77% of the training tokens) and one cluster 2000-10000 (to 93%), the
# rest (23k words, 7% of the tokens) is the last cluster.
WIKITEXT2_CUTOFFS = (2000, 10000)
# The adaptive softmax's width divisor per cluster (PyTorch's default): cluster i has d / 4^i.
DIV_VALUE = 4.0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask, written out (softmax(q k^T / sqrt(d_h)) v) so
    that it supports the double backward the Jacobian penalty needs."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: {n_heads} does not divide d_model={d_model}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        b, length, d = h.shape
        q, k, v = self.qkv(h).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads)
        future = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
        att = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        att = F.dropout(att, self.dropout, self.training)
        return self.out((att @ v).transpose(1, 2).reshape(b, length, d))


class FeedForward(nn.Module):
    """The two-layer FFN of Eq. 21: ``W_2 GELU(W_1 h)``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = dropout

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(F.dropout(F.gelu(self.fc1(h)), self.dropout, self.training))


class TokenEmbedding(nn.Module):
    """Word embeddings times sqrt(d) plus learned position embeddings for ``(B, L)`` token ids,
    ``L <= max_len``. The word table is small (std 0.02) because the head is tied to it; the
    sqrt(d) factor gives the embedded tokens unit scale."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.vocab_size, self.max_len, self.dropout = vocab_size, max_len, dropout
        self.scale = math.sqrt(d_model)

    def forward(self, x: Tensor) -> Tensor:
        check_token_ids(x, self.max_len)
        return F.dropout(self.word(x) * self.scale + self.pos[: x.shape[1]], self.dropout, self.training)


def check_token_ids(x: Tensor, max_len: int) -> None:
    """Raise unless ``x`` is a ``(B, L)`` long tensor of token ids with ``L <= max_len``."""
    if x.dim() != 2 or x.dtype != torch.long:
        raise ValueError(f"x: expected token ids of shape (B, L) and dtype long, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] > max_len:
        raise ValueError(f"x: sequence length {x.shape[1]} exceeds max_len={max_len}")


class AdaptiveIO(nn.Module):
    """Tied adaptive input and output: one :class:`torch.nn.AdaptiveLogSoftmaxWithLoss` gives the
    log-probabilities and, read backwards, the word embeddings (head words: the head's rows; a tail
    word of cluster i: its row of the cluster table times the cluster's projection to d).

    ``forward(x)`` embeds ``(B, L)`` ids like :class:`TokenEmbedding` (times sqrt(d), plus learned
    positions); :meth:`log_prob` and :meth:`nll` take the final normalised states. Word ids must be
    in falling frequency so that the head holds the frequent words.
    """

    def __init__(self, vocab_size: int, d_model: int, max_len: int, cutoffs: Sequence[int],
                 dropout: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        cutoffs = list(cutoffs)
        if not cutoffs or cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= vocab_size:
            raise ValueError(f"cutoffs: expected increasing ids between 1 and vocab_size - 1 = {vocab_size - 1}, "
                             f"got {cutoffs}")
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab_size, cutoffs, div_value=DIV_VALUE)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        with torch.no_grad():  # every word vector and logit starts at the tied embedding's scale (std 0.02)
            nn.init.normal_(self.pos, std=0.02)
            nn.init.normal_(self.softmax.head.weight, std=0.02)
            for proj, table in self.softmax.tail:
                nn.init.normal_(proj.weight, std=proj.out_features ** -0.5)
                nn.init.normal_(table.weight, std=0.02)
        self.vocab_size, self.max_len, self.dropout = vocab_size, max_len, dropout
        self.scale, self.ignore_index = math.sqrt(d_model), ignore_index

    def words(self, x: Tensor) -> Tensor:
        """The tied word vectors of ids ``x`` (any shape), ``(*x.shape, d)``."""
        bounds = self.softmax.cutoffs  # [c_1, ..., c_k, V]
        out = self.softmax.head.weight[x.clamp(max=bounds[0] - 1)]
        for (lo, hi), (proj, table) in zip(zip(bounds[:-1], bounds[1:]), self.softmax.tail):
            rows = table.weight[(x - lo).clamp(0, hi - lo - 1)] @ proj.weight
            out = torch.where(((x >= lo) & (x < hi)).unsqueeze(-1), rows, out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        check_token_ids(x, self.max_len)
        return F.dropout(self.words(x) * self.scale + self.pos[: x.shape[1]], self.dropout, self.training)

    def log_prob(self, h: Tensor) -> Tensor:
        """Log-probabilities over the whole vocabulary, ``(..., V)``, of states ``(..., d)``."""
        return self.softmax.log_prob(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], self.vocab_size)

    def nll(self, h: Tensor, y: Tensor) -> Tensor:
        """Mean negative log-likelihood of the targets ``y`` (``h``'s shape less its last
        dimension; ``ignore_index`` entries skipped) through the adaptive softmax's own loss."""
        if h.shape[:-1] != y.shape:
            raise ValueError(f"y: expected shape {tuple(h.shape[:-1])}, got {tuple(y.shape)}")
        keep = y != self.ignore_index
        return self.softmax(h[keep], y[keep]).loss


def _embedding(vocab_size: int, d_model: int, max_len: int, dropout: float,
               cutoffs: Optional[Sequence[int]]) -> nn.Module:
    if cutoffs is None:
        return TokenEmbedding(vocab_size, d_model, max_len, dropout)
    return AdaptiveIO(vocab_size, d_model, max_len, cutoffs, dropout)


def _head(embed: nn.Module, h: Tensor) -> Tensor:
    """Logits of the tied head, or log-probabilities of the adaptive softmax, from final states."""
    return embed.log_prob(h) if isinstance(embed, AdaptiveIO) else F.linear(h, embed.word.weight)


def _head_loss(embed: nn.Module, h: Tensor, y: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean NLL of ``y``: the adaptive softmax's own loss, or cross-entropy of the tied logits."""
    if isinstance(embed, AdaptiveIO):
        return embed.nll(h, y)
    logits = _head(embed, h)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=ignore_index)


class DEQTransformer(DEQModel):
    """Word-level DEQ transformer LM: x = token ids (B, L), state (B, L, d), logits (B, L, V)
    (log-probabilities with ``cutoffs``).

    Args:
        vocab_size: V.
        d_model, n_heads, d_ff: the block's width, heads and FFN width.
        max_len: the longest segment.
        dropout: on the embeddings (the injection) only, so that f stays a deterministic map.
        weight_norm: weight-normalise the block's linear maps (Eq. 13).
        cutoffs: adaptive softmax cluster boundaries (e.g. :data:`WIKITEXT2_CUTOFFS`) for tied
            adaptive input and output (:class:`AdaptiveIO`); None: a full tied softmax.
    """

    feature_dim = -1

    def __init__(self, vocab_size: int, d_model: int = 128, n_heads: int = 4, d_ff: int = 512,
                 max_len: int = 256, dropout: float = 0.0, weight_norm: bool = True,
                 cutoffs: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.embed = _embedding(vocab_size, d_model, max_len, dropout, cutoffs)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ffn = FeedForward(d_model, d_ff)
        with torch.no_grad():  # start contractive: the injection dominates the block's output
            self.attn.out.weight.mul_(OUTPUT_GAIN)
            self.ffn.fc2.weight.mul_(OUTPUT_GAIN)
        if weight_norm:
            from cdeq.norm import apply_norm

            apply_norm(self.attn, kind="weight")
            apply_norm(self.ffn, kind="weight")

    def inject(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def layer(self, z: Tensor, u: Tensor) -> Tensor:
        """One application of the block (Eq. 21, residual stream from the injection)."""
        h = u + self.attn(self.ln1(z + u))
        return h + self.ffn(self.ln2(h))

    def readout(self, z: Tensor) -> Tensor:
        return _head(self.embed, self.ln_f(z))

    def lm_loss(self, z: Tensor, y: Tensor) -> Tensor:
        """Mean NLL of the next-token targets ``y`` (-100: ignored) at state ``z``; with an
        adaptive softmax its own loss, cheaper than the loss of :meth:`readout`'s output."""
        return _head_loss(self.embed, self.ln_f(z), y)

    def init_state(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)


class AdaptiveTransformer(nn.Module):
    """Explicit causal transformer LM with the tied adaptive input and output of
    :class:`AdaptiveIO`: ``n_layers`` pre-LN blocks of the DEQ transformer's width (one block has
    the adaptive DEQ transformer's parameter count). ``forward(x)`` gives log-probabilities."""

    def __init__(self, vocab_size: int, cutoffs: Sequence[int], d_model: int = 128, n_heads: int = 4,
                 d_ff: int = 512, max_len: int = 256, n_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        from cdeq.models.explicit import _Block  # explicit imports this module: a late import breaks the cycle

        self.embed = AdaptiveIO(vocab_size, d_model, max_len, cutoffs, dropout)
        self.blocks = nn.Sequential(*(_Block(d_model, n_heads, d_ff) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)

    def features(self, x: Tensor) -> Tensor:
        """The final normalised states ``(B, L, d)``."""
        return self.ln_f(self.blocks(self.embed(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed.log_prob(self.features(x))

    def lm_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean NLL of the next-token targets ``y`` (-100: ignored), the adaptive softmax's own loss."""
        return self.embed.nll(self.features(x), y)
