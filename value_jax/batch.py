"""The one input type every model takes: a padded batch of text + regions.

Layout (both models): the text slot holds `[CLS] w1..wm [SEP]` followed by padding, the region
slot holds the regions of the image followed by padding. UNITER concatenates the two slots into
one joint sequence `[text slot | region slot]`; LXMERT keeps them as two streams. Packing UNITER's
sequence compactly (the original `gather_index`) and padding each slot separately give identical
outputs on the real tokens: padded keys get a -10000 bias, whose softmax weight underflows to 0.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Batch:
    """A batch of text + region inputs. Shapes in `[B, T]` (text), `[B, R]` (regions).

    Attributes:
      input_ids: `[B, T]` int32 word-piece ids, `[CLS] ... [SEP]` then padding (any id).
      text_mask: `[B, T]` int32, 1 on real tokens (including [CLS]/[SEP]), 0 on padding.
      region_feats: `[B, R, F]` float32 detector features (F = 2048 for BUTD).
      region_boxes: `[B, R, 4]` float32 boxes as normalised `x1, y1, x2, y2` (divided by the
        image width / height). UNITER derives its 7-d position feature from them, LXMERT uses them
        as they are.
      region_mask: `[B, R]` int32, 1 on real regions, 0 on padding.
      region_masked: `[B, R]` int32, 1 where a region is masked in the UNITER pre-training sense
        (UNITER adds `mask_embedding[1]` to its feature). Zeroing the feature of a masked region is
        the caller's job, as in the original pre-training code. LXMERT ignores this field.
    """

    input_ids: jnp.ndarray
    text_mask: jnp.ndarray
    region_feats: jnp.ndarray
    region_boxes: jnp.ndarray
    region_mask: jnp.ndarray
    region_masked: jnp.ndarray

    @classmethod
    def create(
        cls,
        input_ids,
        text_mask,
        region_feats,
        region_boxes,
        region_mask=None,
        region_masked=None,
    ) -> "Batch":
        """Builds a Batch from numpy (or jax) arrays, checking shapes and filling defaults.

        `region_mask` defaults to all regions real; `region_masked` to no region masked.
        """
        input_ids = np.asarray(input_ids, dtype=np.int32)
        text_mask = np.asarray(text_mask, dtype=np.int32)
        region_feats = np.asarray(region_feats, dtype=np.float32)
        region_boxes = np.asarray(region_boxes, dtype=np.float32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if text_mask.shape != (b, t):
            raise ValueError(f"text_mask must be {(b, t)} like input_ids, got {text_mask.shape}")
        if region_feats.ndim != 3 or region_feats.shape[0] != b:
            raise ValueError(f"region_feats must be [B={b}, R, F], got {region_feats.shape}")
        r = region_feats.shape[1]
        if region_boxes.shape != (b, r, 4):
            raise ValueError(
                f"region_boxes must be [B={b}, R={r}, 4] normalised x1,y1,x2,y2, got {region_boxes.shape}"
            )
        region_mask = (
            np.ones((b, r), np.int32) if region_mask is None else np.asarray(region_mask, np.int32)
        )
        region_masked = (
            np.zeros((b, r), np.int32)
            if region_masked is None
            else np.asarray(region_masked, np.int32)
        )
        for name, arr in (("region_mask", region_mask), ("region_masked", region_masked)):
            if arr.shape != (b, r):
                raise ValueError(f"{name} must be [B={b}, R={r}], got {arr.shape}")
        return cls(input_ids, text_mask, region_feats, region_boxes, region_mask, region_masked)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def text_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_regions(self) -> int:
        return self.region_feats.shape[1]

    def replace_regions(self, region_feats=None, region_masked=None) -> "Batch":
        """A copy with new region features and/or masked-region flags (used by ablations)."""
        return self.replace(
            region_feats=self.region_feats if region_feats is None else region_feats,
            region_masked=self.region_masked if region_masked is None else region_masked,
        )


def uniter_position_feature(boxes: jnp.ndarray) -> jnp.ndarray:
    """UNITER's 7-d box feature `[x1, y1, x2, y2, w, h, w*h]` from normalised x1,y1,x2,y2.

    UNITER stores `norm_bb = [x1, y1, x2, y2, w, h]` and its loader appends `w*h`
    (`data/data.py: _get_img_feat`).
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return jnp.concatenate([boxes, w[..., None], h[..., None], (w * h)[..., None]], axis=-1)
