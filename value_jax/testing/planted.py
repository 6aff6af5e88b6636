"""Planted-structure models: tiny UNITER / LXMERT weights that make a VALUE answer known.

A probe that cannot find an answer planted on purpose is wrong. Each builder below plants one
answer (a coreference head, image-to-text heads, [CLS] attention on the words, a layer where the
modalities fuse) into a tiny model; `save_checkpoint` writes it as a real checkpoint directory and
`write_planted_flickr` writes matching Flickr30k Entities data in the real file formats, so a
test runs the experiment entry points unchanged and reads their results.json.

The residual stream
-------------------
`Directions` is a fixed orthonormal set of unit vectors in R^D, all orthogonal to the all-ones
vector. LayerNorm (scale 1, bias 0) subtracts the mean, which is 0 for their sums, and rescales
to norm sqrt(D): it keeps every direction and the proportions between them. Every token's
embedding input is a "recipe" of pre-LayerNorm norm sqrt(ALPHA² + 1):

  word w          ALPHA·text   + key[w]        (+ nocode instead when w is no key word)
  [CLS] / [SEP]   ALPHA·cls / ALPHA·sep + nocode
  region v        ALPHA·region + Σ_{w∈S(v)} query[w] / sqrt|S(v)|   (+ nocode when S(v) = ∅)

so after the embedding LayerNorm each token carries `c = sqrt(D / (ALPHA² + 1))` per unit of its
recipe. Position and token-type embeddings are zero; the region path reads the recipe from the
features file (`img_linear` / `visn_fc` map feature slot i to one direction; box paths zero).

Identity layers: every attention-output and feed-forward-output dense is zero, so each sub-layer
computes `LN(x + 0) = x` for such normalised x. Every layer therefore sees the embedding output,
and its attention maps are set by its own query/key weights alone: `_plant_pairs` makes a head
score (x_q·a)(x_k·b)·s² / sqrt(head_dim) for each planted direction pair (a, b), one head
dimension per pair. A head with no pair scores 0 everywhere: it attends uniformly to the real
keys (padding keys get the model's -10000 bias).

Key words (the coreference code)
--------------------------------
A word embedding depends on the token id only, so a phrase can be recognised only through its
words. A boxed chain's key words are the lower-cased pre-tokens of its phrases (every caption of
the image) that occur in no other boxed chain's phrase of that image: `a`, `the`, or `man` when
the image has both "a man" and "a man 's arm", belong to nobody there. Each key word has its own
key/query direction pair (a one-hot code, global over the data set). S(v) is the union of the key
words of the chains region v is linked to, by the loader's rule (IoU >= 0.5 with one of the
chain's gold boxes). A linked phrase none of whose words is in S(v) (`uncoded_links`) cannot be
found by any head: it bounds what the coreference tests may ask for.

One module (about 460 lines): every planted construction shares the direction vectors and
the data that they code.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import flax
import jax
import numpy as np
from tokenizers import normalizers, pre_tokenizers

from value_jax import checkpoint
from value_jax.data.features import RegionRecord
from value_jax.data.fixtures.annotations import write_flickr30k, write_vocab
from value_jax.data.fixtures.features import write_lxmert_tsv
from value_jax.models import LxmertConfig, UniterConfig, build_model, param_shapes

HIDDEN = 160
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
MAX_KEYS = HEAD_DIM  # the coreference head gives one head dimension to each key word
FEAT_DIM = 2 + MAX_KEYS  # region features: [region marker, no-code flag, S(v) weights]
ALPHA = 2.0  # marker weight: the modality split dominates the codes
LINK_IOU = 0.5  # the loader's default --iou_threshold
COREF_LOGIT = 60.0  # score of a region on a key word of a 1-word S(v)
MARKER_LOGIT = 25.0  # score of a planted marker pair


# ---- the residual stream ----------------------------------------------------------------------


class Directions:
    """Named unit directions of R^hidden, orthonormal and orthogonal to the all-ones vector."""

    NAMES = ("text", "region", "cls", "sep", "nocode", "collapse")

    def __init__(self, hidden: int = HIDDEN, num_keys: int = MAX_KEYS, seed: int = 0):
        need = len(self.NAMES) + 2 * num_keys
        if need > hidden - 1:
            raise ValueError(f"{need} directions do not fit a mean-zero subspace of R^{hidden}")
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(
            np.concatenate([np.ones((hidden, 1)), rng.standard_normal((hidden, need))], axis=1)
        )
        basis = q[:, 1 : need + 1].T  # [need, hidden]
        for name, vec in zip(self.NAMES, basis):
            setattr(self, name, vec)
        self.key = basis[len(self.NAMES) : len(self.NAMES) + num_keys]
        self.query = basis[len(self.NAMES) + num_keys :]
        self.c = np.sqrt(hidden / (ALPHA**2 + 1.0))  # component per recipe unit


# ---- data -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlantedFlickr:
    """What `write_planted_flickr` wrote (absolute paths) and the code it planted.

    keys: the key words, slot k of the features = key direction k. region_keys: per image id,
    S(v) per region (in features-file order). Over the val split, as the loader pairs them:
    examples: captions with at least one link (one coreference example each);
    links / uncoded_links: gold (region, phrase) links, and how many have no key word of S(v);
    unlinked_pairs / confusable_pairs: (region, linked phrase) pairs that are no link (the pool
    of VCD negatives), and how many of them do share a key word (they look like links).
    """

    root: str
    flickr_root: str
    features: str
    vocab_cased: str
    vocab_uncased: str
    keys: tuple
    region_keys: dict
    examples: int
    links: int
    uncoded_links: int
    unlinked_pairs: int
    confusable_pairs: int


def _lower_pretokens(text: str) -> list[str]:
    norm = normalizers.BertNormalizer(lowercase=True)
    return [
        p for p, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(norm.normalize_str(text))
    ]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[N, M]` IoU with continuous areas (the loader's default convention)."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0) * np.maximum(h, 0)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _random_boxes(rng, gold: np.ndarray, n: int, width: int, height: int) -> np.ndarray:
    """n boxes with IoU < 0.3 with every gold box, so no threshold decides their links."""
    out = []
    while len(out) < n:
        x1, y1 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        box = np.array(
            [
                [
                    x1,
                    y1,
                    min(width - 1, x1 + rng.uniform(12, width * 0.3)),
                    min(height - 1, y1 + rng.uniform(12, height * 0.3)),
                ]
            ]
        )
        if _iou(box, gold).max() < 0.3:
            out.append(np.round(box[0]))
    return np.asarray(out).reshape(-1, 4)


def _key_words(sentences, chains, words) -> dict:
    """Per boxed chain, the words only it uses; a phrase left without one also keys its
    least-shared word (the head noun "man" of "a man" when "a man 's arm" is another chain's)."""
    owners = collections.Counter(w for c in chains for w in words[c])
    keys = {c: {w for w in words[c] if owners[w] == 1} for c in chains}
    for sentence in sentences:
        for phrase in sentence.phrases:
            pieces = _lower_pretokens(phrase.text)
            if phrase.chain_id in keys and not keys[phrase.chain_id] & set(pieces):
                # min() keeps the first of equals: reversed, that is the last word (the noun).
                keys[phrase.chain_id].add(min(reversed(pieces), key=lambda w: owners[w]))
    return keys


def write_planted_flickr(
    root, n_images: int = 12, seed: int = 0, random_regions: int = 4
) -> PlantedFlickr:
    """Flickr30k Entities (`fixtures.write_flickr30k`), cased and uncased vocabularies, and an
    LXMERT TSV of region features that carry the key-word code (see the module docstring).

    Regions per image: every distinct gold box exactly, then `random_regions` boxes away from all
    gold boxes. n_images go to train/val/test round-robin; the loaders read val.
    """
    root = Path(root).absolute()
    flickr = write_flickr30k(root / "flickr30k", n_images=n_images, seed=seed)
    rng = np.random.default_rng([seed, 7])
    per_image = {}
    for image_id in flickr.image_ids:
        ann = flickr.annotations[image_id]
        chains = sorted(ann.boxes)
        words = collections.defaultdict(set)
        for sentence in flickr.sentences[image_id]:
            for phrase in sentence.phrases:
                if phrase.chain_id in ann.boxes:
                    words[phrase.chain_id].update(_lower_pretokens(phrase.text))
        chain_keys = _key_words(flickr.sentences[image_id], chains, words)
        gold = np.unique(np.asarray([b for c in chains for b in ann.boxes[c]], np.float64), axis=0)
        boxes = np.concatenate(
            [gold, _random_boxes(rng, gold, random_regions, ann.width, ann.height)]
        )
        linked = {
            c: _iou(boxes, np.asarray(ann.boxes[c], np.float64)).max(1) >= LINK_IOU for c in chains
        }
        sets = [
            frozenset().union(*(chain_keys[c] for c in chains if linked[c][r]))
            for r in range(len(boxes))
        ]
        per_image[image_id] = (ann, boxes, sets, linked)
    keys = tuple(sorted(set().union(*(s for _, _, sets, _ in per_image.values() for s in sets))))
    if len(keys) > MAX_KEYS:
        raise ValueError(f"{len(keys)} key words do not fit the {MAX_KEYS} code slots")
    slot = {w: 2 + k for k, w in enumerate(keys)}

    records, examples, links, uncoded, unlinked, confusable = [], 0, 0, 0, 0, 0
    val = set(flickr.splits["val"])
    for image_id, (ann, boxes, sets, linked) in per_image.items():
        feats = np.zeros((len(boxes), FEAT_DIM), np.float32)
        feats[:, 0] = 1.0
        for r, s in enumerate(sets):
            if s:
                feats[r, [slot[w] for w in s]] = 1.0 / np.sqrt(len(s))
            else:
                feats[r, 1] = 1.0
        n = len(boxes)
        records.append(
            RegionRecord(
                image_id=image_id,
                image_w=ann.width,
                image_h=ann.height,
                boxes=boxes.astype(np.float32),
                features=feats,
                object_ids=np.zeros(n, np.int64),
                object_conf=np.ones(n, np.float32),
                attr_ids=np.zeros(n, np.int64),
                attr_conf=np.ones(n, np.float32),
            )
        )
        if image_id not in val:
            continue
        for sentence in flickr.sentences[image_id]:
            examples += any(p.chain_id in linked and not p.is_notvisual for p in sentence.phrases)
            for phrase in sentence.phrases:
                if phrase.chain_id not in linked or phrase.is_notvisual:
                    continue
                pieces = set(_lower_pretokens(phrase.text))
                for r, is_link in enumerate(linked[phrase.chain_id]):
                    hit = bool(pieces & sets[r])
                    links += bool(is_link)
                    uncoded += bool(is_link) and not hit
                    unlinked += not is_link
                    confusable += (not is_link) and hit
    features = root / "flickr30k_planted.tsv"
    write_lxmert_tsv(features, records)
    write_vocab(root / "vocab_cased.txt", flickr.words, cased=True)
    write_vocab(root / "vocab_uncased.txt", flickr.words, cased=False)
    return PlantedFlickr(
        str(root),
        str(flickr.root),
        str(features),
        str(root / "vocab_cased.txt"),
        str(root / "vocab_uncased.txt"),
        keys,
        {i: v[2] for i, v in per_image.items()},
        examples,
        links,
        uncoded,
        unlinked,
        confusable,
    )


# ---- configs and the identity model -------------------------------------------------------------


def _vocab(path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def uniter_config(data: PlantedFlickr, num_layers: int = 4) -> UniterConfig:
    return UniterConfig.tiny(
        vocab_size=len(_vocab(data.vocab_cased)),
        hidden_size=HIDDEN,
        num_heads=HEADS,
        num_layers=num_layers,
        intermediate_size=8,
        img_dim=FEAT_DIM,
    )


def lxmert_config(data: PlantedFlickr, x_layers: int = 3) -> LxmertConfig:
    return LxmertConfig.tiny(
        vocab_size=len(_vocab(data.vocab_uncased)),
        hidden_size=HIDDEN,
        num_heads=HEADS,
        intermediate_size=8,
        l_layers=2,
        r_layers=2,
        x_layers=x_layers,
        visual_feat_dim=FEAT_DIM,
    )


def identity_params(config, data: PlantedFlickr, d: Directions):
    """Every weight zero except LayerNorm scales (1) and the embeddings of the recipe table."""
    shapes = flax.core.unfreeze(param_shapes(build_model(config, outputs=())))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones if path[-1].key == "scale" else np.zeros)(s.shape, np.float32),
        shapes,
    )
    tokens = _vocab(data.vocab_uncased if config.lowercase else data.vocab_cased)
    key_of = {w: k for k, w in enumerate(data.keys)}
    table = np.zeros((len(tokens), config.hidden_size))
    for i, tok in enumerate(tokens):
        special = {"[CLS]": d.cls, "[SEP]": d.sep}.get(tok)
        k = key_of.get(tok.lower())
        table[i] = ALPHA * (d.text if special is None else special) + (
            d.key[k] if special is None and k is not None else d.nocode
        )
    region_fc = np.zeros((FEAT_DIM, config.hidden_size))
    region_fc[0], region_fc[1], region_fc[2 : 2 + len(d.query)] = (
        ALPHA * d.region,
        d.nocode,
        d.query,
    )
    if config.model_type == "uniter":
        params["uniter"]["embeddings"]["word_embeddings"]["embedding"] = table
        params["uniter"]["img_embeddings"]["img_linear"]["kernel"] = region_fc
    else:
        params["lxmert"]["embeddings"]["word_embeddings"]["embedding"] = table
        params["lxmert"]["encoder"]["visn_fc"]["visn_fc"]["kernel"] = region_fc
    return params


def _plant_pairs(core: dict, head: int, pairs, logit: float, d: Directions) -> None:
    """Head `head` (0-based) of attention core `core` scores `logit`·(x_q·a)(x_k·b)/c² for each
    (a, b) in `pairs`: `logit` for a query and a key that carry one recipe unit of a and b."""
    scale = np.sqrt(logit * np.sqrt(HEAD_DIM)) / d.c
    if len(pairs) > HEAD_DIM:
        raise ValueError(f"{len(pairs)} direction pairs do not fit a head of {HEAD_DIM} dims")
    for j, (a, b) in enumerate(pairs):
        col = head * HEAD_DIM + j
        core["query"]["kernel"][:, col] += scale * a
        core["key"]["kernel"][:, col] += scale * b


def save_checkpoint(out_dir, config, params) -> str:
    """The planted model as a checkpoint directory `value_jax.load` (and every experiment's
    `--checkpoint`) reads; no pre-training heads."""
    return checkpoint.save(os.fspath(out_dir), config, params, outputs=(), overwrite=True)


# ---- the planted answers -----------------------------------------------------------------------


def _coref_pairs(data: PlantedFlickr, d: Directions, direction: str):
    """One (query side, key side) pair per key word: a region's query code meets the word's key
    code (V→T), or a word's key code, read as a query, meets the region's query code (T→V)."""
    pairs = [(d.query[k], d.key[k]) for k in range(len(data.keys))]
    return pairs if direction == "v2t" else [(b, a) for a, b in pairs]


def _coref(data, config, v2t, t2v, planted, core_of):
    """Identity model with the V→T and T→V coreference heads planted in `core_of(params, layer)`."""
    d = Directions()
    params = identity_params(config, data, d)
    if planted:
        for direction, (layer, head) in (("v2t", v2t), ("t2v", t2v)):
            _plant_pairs(
                core_of(params, layer), head - 1, _coref_pairs(data, d, direction), COREF_LOGIT, d
            )
    return config, params


def uniter_coref(data: PlantedFlickr, v2t=(2, 3), t2v=(3, 2), planted: bool = True):
    """VALUE Table 2 / Eq. 3 answers, heads as 1-based `(layer, head)`:

    * V→T at `v2t`: every region query puts nearly all of its mass, evenly, on the tokens of
      the key words of S(v), i.e. on its linked phrases;
    * T→V at `t2v`: every key-word token puts nearly all of its mass, evenly, on the regions
      whose S(v) holds its word, i.e. on the regions linked to its phrase.
    Every other head, and these for the other queries, attends uniformly. With `planted=False`
    both heads are uniform too: the negative control.
    """
    return _coref(
        data,
        uniter_config(data),
        v2t,
        t2v,
        planted,
        lambda p, layer: p["uniter"]["encoder"][f"layer_{layer - 1}"]["attention"]["self"],
    )


def lxmert_coref(data: PlantedFlickr, v2t=(2, 3), t2v=(1, 2), planted: bool = True):
    """As `uniter_coref` in the cross layers' cross-attention: V→T in cross layer `v2t[0]`'s
    vision→language maps, T→V in cross layer `t2v[0]`'s language→vision maps (VALUE's
    two-stream reading). LXMERT shares the cross-attention weights between the two directions;
    the other direction of a planted head stays uniform because text tokens carry no query code
    and regions no key code."""
    return _coref(
        data,
        lxmert_config(data),
        v2t,
        t2v,
        planted,
        lambda p, layer: p["lxmert"]["encoder"][f"x_layers_{layer - 1}"]["visual_attention"]["att"],
    )


CLS_TARGETS = ("words", "regions", "specials")


def uniter_modality(data: PlantedFlickr, image_to_text=(), cls_target=None):
    """VALUE Eq. 1 / Eq. 2 answers, per head of every layer (1-based `(layer, head)`):

    * region queries attend to the words (mass ≈ 1 > 0.5) in the heads of `image_to_text` and
      to the regions (mass on words ≈ 0) in every other head: image-to-text probability 1 / 0;
    * the [CLS] query attends to `cls_target[(layer, head)]` (default "words"): the words only
      (I_T ≈ 1, I_V ≈ 0), the regions only (I_T ≈ 0, I_V ≈ 1) or [CLS]/[SEP] only (both ≈ 0,
      which Eq. 1 leaves out).
    """
    d = Directions()
    config = uniter_config(data)
    params = identity_params(config, data, d)
    cls_target = dict(cls_target or {})
    keys_of = {"words": [d.text], "regions": [d.region], "specials": [d.cls, d.sep]}
    for layer in range(1, config.num_layers + 1):
        core = params["uniter"]["encoder"][f"layer_{layer - 1}"]["attention"]["self"]
        for head in range(1, config.num_heads + 1):
            target = cls_target.get((layer, head), "words")
            pairs = [(d.cls, k) for k in keys_of[target]]
            pairs.append((d.region, d.text if (layer, head) in set(image_to_text) else d.region))
            _plant_pairs(core, head - 1, pairs, MARKER_LOGIT / ALPHA**2, d)
    return config, params


def _collapse(ln: dict, d: Directions) -> None:
    """LayerNorm output = one fixed normalised vector whatever the input."""
    ln["scale"] = np.zeros_like(ln["scale"])
    ln["bias"] = np.sqrt(len(d.collapse)) * d.collapse


def uniter_fusion(data: PlantedFlickr, collapse_layer: int = 3):
    """VALUE Table 1 answer: text and region states are the embedding recipes (modalities far
    apart: NMI 1) up to layer `collapse_layer - 1`; layer `collapse_layer`'s output LayerNorm
    has scale 0 and a fixed normalised bias, so from there on every token's state is that same
    vector (identity layers keep it): NMI 0."""
    d = Directions()
    config = uniter_config(data)
    params = identity_params(config, data, d)
    _collapse(params["uniter"]["encoder"][f"layer_{collapse_layer - 1}"]["output"]["LayerNorm"], d)
    return config, params


def lxmert_fusion(data: PlantedFlickr, collapse_layer: int = 2):
    """As `uniter_fusion` for the cross layers (the layers VALUE clusters for two-stream
    models): cross layer `collapse_layer` maps both its language and its vision outputs to the
    same vector."""
    d = Directions()
    config = lxmert_config(data)
    params = identity_params(config, data, d)
    layer = params["lxmert"]["encoder"][f"x_layers_{collapse_layer - 1}"]
    for stream in ("lang_output", "visn_output"):
        _collapse(layer[stream]["LayerNorm"], d)
    return config, params
