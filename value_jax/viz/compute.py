"""Examples → one jitted pass per batch → store records.

The pass is the runner's (`runner.make_step`): forward → Trace → probe steps, compiled once per
bucket shape. Its one probe, `ExampleProbe`, returns what the store keeps of each example: every
attention map and hidden state (float16, cast on device so half the bytes cross to the host) and
the `step` statistics of the analysis probes computed on each example alone (the probe's own step
on a batch of one, vmapped), so the app's numbers are the probes' numbers and their sum over the
dataset is what the runner accumulates for results.json.

    session = Session(model, params, tokenizer, regions, region_labels)
    write_store(session, examples, "out/explore/lxmert/store")
    store = open_store(...); session.add_caption(store, example_index, "a dog on a lake")
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from value_jax.data import collate as C
from value_jax.data.loaders import ExampleLoader
from value_jax.names import LayerId
from value_jax.probes.base import Probe
from value_jax.probes.coref import CorefProbe
from value_jax.probes.head_summary import HeadSummaryProbe
from value_jax.probes.modality import ImageToTextProbe, ModalityProbe
from value_jax.runner import make_step
from value_jax.trace import Layout
from value_jax.viz.store import Store, StoreWriter, group_of, map_axes


def analysis_probes(single_stream: bool, coref: bool) -> list[Probe]:
    """The probes whose statistics the explorer shows: VL-InterpreT's head summary always;
    VALUE's modality importance and image-to-text heads (single-stream only, as VALUE defines
    them); VALUE's coreference max attention where the data give phrase–region links."""
    probes: list[Probe] = [HeadSummaryProbe()]
    if single_stream:
        probes += [ModalityProbe(), ImageToTextProbe()]
    if coref:
        probes.append(CorefProbe(collect_features=False))
    return probes


class ExampleProbe(Probe):
    """Every map and hidden state of each example plus each wrapped probe's per-example step."""

    name = "explore"

    def __init__(self, probes: Sequence[Probe]):
        self.probes = list(probes)

    def bind(self, layout: Layout) -> None:
        for p in self.probes:
            p.bind(layout)

    def step(self, trace, targets):
        half = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), tree)
        one = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
        stats = {}
        for p in self.probes:
            stats[p.name] = jax.vmap(lambda tr, tg, p=p: p.step(one(tr), one(tg)))(trace, targets)
        return {"attention": half(trace.attention), "hidden": half(trace.hidden), "stats": stats}


@dataclasses.dataclass
class ExampleInfo:
    """What the store keeps about an example besides the model's outputs."""

    example: C.Example
    caption: str
    image: str = ""  # image file, "" when none
    width: int = 0
    height: int = 0
    boxes: Optional[np.ndarray] = None  # [R, 4] pixels
    region_labels: Optional[list] = None
    added: bool = False


class Session:
    """The model, its compiled passes and the data sources, shared by the store writer and the
    app's "add caption"."""

    def __init__(
        self,
        model,
        params,
        tokenizer,
        regions: Callable[[str], tuple],
        *,
        batch_size: int = 8,
        max_text_len: int = 64,
    ):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.regions = regions  # image_id -> (features [R, F], normalised boxes [R, 4])
        self.batch_size = batch_size
        self.max_text_len = max_text_len
        self.layout = Layout.from_config(model.config)
        self._steps: dict = {}

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def step_for(self, coref: bool):
        if coref not in self._steps:
            probe = ExampleProbe(analysis_probes(self.model.config.single_stream, coref))
            probe.bind(self.layout)
            self._steps[coref] = (probe, make_step(self.model, [probe]))
        return self._steps[coref]

    def meta(self) -> dict:
        c = self.model.config
        # Layout.from_config lists maps and hidden states in forward order.
        maps = {n: dict(zip(("query", "key"), map_axes(n))) for n in self.layout.attention}
        groups = list(dict.fromkeys(group_of(n) for n in self.layout.hidden))
        return {
            "model_type": self.model_type,
            "num_heads": int(c.num_heads),
            "maps": maps,
            "group_order": groups,
            "hidden_names": list(self.layout.hidden),
            "directions": {d: self.layout.layer_names(d) for d in ("t2t", "t2v", "v2t", "v2v")},
            "config": {
                k: v
                for k, v in dataclasses.asdict(c).items()
                if isinstance(v, (int, float, str, bool))
            },
        }

    # ---- examples -------------------------------------------------------------------------
    def caption_example(
        self, image_id: str, caption: str, example_id: str, n_regions: int
    ) -> C.Example:
        enc = self.tokenizer.encode_words(caption.split(), self.max_text_len)
        return C.Example(example_id, enc.ids, {}, image_id=image_id, num_regions=n_regions)

    def run(self, infos: Sequence[ExampleInfo]):
        """Yields `(info, record, hidden)` per example, one jitted pass per batch."""
        for coref in (True, False):
            part = [i for i in infos if bool(i.example.targets) == coref]
            if not part:
                continue
            probe, step = self.step_for(coref)
            loader = ExampleLoader([i.example for i in part], self.batch_size, regions=self.regions)
            for batch, targets in loader:
                out = jax.device_get(step(self.params, batch, targets))["explore"]
                mask_t = np.asarray(batch.text_mask) > 0
                mask_r = np.asarray(batch.region_mask) > 0
                for row, k in enumerate(np.asarray(targets[C.EXAMPLE_INDEX])):
                    if k < 0:
                        continue
                    yield self._record(part[k], out, row, mask_t[row], mask_r[row])

    def _record(self, info: ExampleInfo, out, row, text_mask, region_mask):
        t_idx, r_idx = np.flatnonzero(text_mask), np.flatnonzero(region_mask)
        n_text, n_reg = len(t_idx), len(r_idx)
        t_slot = len(text_mask)
        joint = np.concatenate([t_idx, t_slot + r_idx])
        pick = {"joint": joint, "text": t_idx, "image": r_idx}
        attention = {}
        for name in self.layout.attention:  # forward order
            a = out["attention"][name]
            q, k = map_axes(name)
            attention[name] = np.asarray(a[row])[:, pick[q]][:, :, pick[k]]
        hidden = {}
        for name, h in out["hidden"].items():
            h = np.asarray(h[row])
            modalities = LayerId.parse(name).modalities()
            if len(modalities) == 2:  # UNITER: [text slot | regions] on one axis
                parts = [(h[t_idx], 0, np.arange(n_text)), (h[t_slot + r_idx], 1, np.arange(n_reg))]
            elif modalities == ("text",):
                parts = [(h[t_idx], 0, np.arange(n_text))]
            else:
                parts = [(h[r_idx], 1, np.arange(n_reg))]
            g = group_of(name)
            for states, kind, pos in parts:
                where = np.stack([np.full(len(pos), kind), pos], 1)
                if g in hidden:
                    hidden[g] = (
                        np.concatenate([hidden[g][0], states]),
                        np.concatenate([hidden[g][1], where]),
                    )
                else:
                    hidden[g] = (states, where)
        # Within a group: text rows first, then regions (LXMERT's lang then visn).
        for g, (states, where) in hidden.items():
            order = np.lexsort((where[:, 1], where[:, 0]))
            hidden[g] = (states[order], where[order])
        stats = {p: {k: np.asarray(v[row]) for k, v in s.items()} for p, s in out["stats"].items()}
        ex = info.example
        tokens = [self.tokenizer.id_to_token(i) for i in ex.input_ids]
        labels = info.region_labels or [f"r{i}" for i in range(n_reg)]
        boxes = np.zeros((n_reg, 4), np.float32) if info.boxes is None else info.boxes[:n_reg]
        record = {"boxes": np.asarray(boxes, np.float32), "attention": attention, "stats": stats}
        entry = {
            "id": ex.id,
            "image_id": ex.image_id,
            "caption": info.caption,
            "tokens": tokens,
            "regions": [str(x) for x in labels[:n_reg]],
            "image": info.image,
            "width": int(info.width),
            "height": int(info.height),
            "n_text": int(n_text),
            "n_regions": int(n_reg),
            "added": bool(info.added),
        }
        return entry, record, hidden

    def add_caption(self, store: Store, like: int, caption: str) -> int:
        """Runs `caption` on the image of example `like` and appends it to the store."""
        caption = caption.strip()
        if not caption:
            raise ValueError("empty caption")
        src = store.examples[like]
        rec = store.record(like)
        ex = self.caption_example(
            src["image_id"], caption, f"{src['image_id']}:typed{len(store)}", src["n_regions"]
        )
        info = ExampleInfo(
            ex,
            caption,
            src["image"],
            src["width"],
            src["height"],
            np.asarray(rec["boxes"]),
            list(rec["regions"]),
            added=True,
        )
        ((entry, record, hidden),) = list(self.run([info]))
        return store.append(entry, record, hidden)


def write_store(
    session: Session,
    infos: Sequence[ExampleInfo],
    path,
    projection: str = "pca",
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every example and writes the store at `path`; returns timing and size facts."""
    start = time.perf_counter()
    writer = StoreWriter(path, session.meta())
    for n, (entry, record, hidden) in enumerate(session.run(infos)):
        writer.add(entry, record, hidden, in_aggregate=not entry["added"])
        if (n + 1) % 100 == 0:
            log(f"[explore] {n + 1}/{len(infos)} examples written")
    writer.close(projection)
    return {"examples": writer.count, "seconds": time.perf_counter() - start}


__all__ = ["ExampleProbe", "ExampleInfo", "Session", "analysis_probes", "write_store"]
