"""Shared by the PyTorch-reference tests (test_parity.py, test_convert.py); imports torch."""

import numpy as np
import torch


def perturb(module, seed):
    """HF init leaves biases at 0 and LayerNorms at 1; perturb every parameter so a swapped or
    dropped weight shows in the outputs. Returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval()


def random_inputs(feat_dim, vocab, b=2, t=7, r=5, seed=0):
    """`(ids, text_mask, feats, boxes, region_mask)` numpy inputs: sample 0 full length, the
    others padded (text to max(3, t // 2), regions to max(2, r - 7)), so padding is exercised."""
    rng = np.random.default_rng(seed)
    text_lens = [t] + [max(3, t // 2)] * (b - 1)
    region_lens = [r] + [max(2, r - 7)] * (b - 1)
    ids = rng.integers(1000 if vocab > 2000 else 1, vocab, (b, t))
    text_mask = (np.arange(t)[None] < np.array(text_lens)[:, None]).astype(np.int64)
    feats = rng.normal(size=(b, r, feat_dim)).clip(0).astype(np.float32)
    x1y1 = rng.uniform(0, 0.5, (b, r, 2))
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0.1, 0.5, (b, r, 2))], -1).astype(np.float32)
    region_mask = (np.arange(r)[None] < np.array(region_lens)[:, None]).astype(np.int64)
    return ids, text_mask, feats, boxes, region_mask
