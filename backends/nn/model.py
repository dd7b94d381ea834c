"""A small language model around ``DLAAttention``: embedding, pre-norm blocks, tied head.

    h = embed(tokens)
    for each block:  h = h + mixer(norm(h));  h = h + mlp(norm(h))
    logits = norm(h) @ embed.weight^T
"""

from __future__ import annotations

from torch import nn

from .layer import DLAAttention


class Block(nn.Module):
    """Pre-norm residual block: DLA token mixer, then a 4x GELU MLP."""

    def __init__(self, d_model, n_heads, **layer_options):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = DLAAttention(d_model, n_heads, **layer_options)
        self.mlp_norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, h):
        h = h + self.mixer(self.mixer_norm(h))[0]
        return h + self.mlp(self.mlp_norm(h))


class TinyLM(nn.Module):
    """tokens [B, T] int64 -> logits [B, T, vocab]; ``layer_options`` go to DLAAttention."""

    def __init__(self, vocab, d_model=64, n_heads=2, n_layers=2, **layer_options):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, **layer_options)
                                    for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-5)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.T

    def mixers(self):
        """The DLAAttention layers, first block first."""
        return [block.mixer for block in self.blocks]


def loss_and_accuracy(logits, targets, ignore=-1):
    """(mean cross-entropy, share of exact predictions) over the scored positions."""
    scored = targets != ignore
    loss = nn.functional.cross_entropy(logits[scored], targets[scored])
    accuracy = (logits[scored].argmax(-1) == targets[scored]).float().mean()
    return loss, accuracy

