"""Cross-modal input ablation (Frank, Bugliarello & Elliott 2021) on Flickr30k Entities.

    python -m experiments.ablation --model=uniter            # the built-in demo
    python -m experiments.ablation --model=lxmert --checkpoint=ckpt/lxmert --vocab=vocab.txt \
        --flickr30k_root=flickr30k_entities --flickr30k_features=flickr30k_obj36.tsv

Vision-for-language: MLM loss (bits) of the masked phrase with no / the phrase's (IoT > t) / all
regions replaced by the dataset-mean feature, plus the object ablation swept over t.
Language-for-vision: MRC-KL / MRC-XE (bits in the tables, nats in results.json) at the masked
target region with the caption intact, its phrase masked, or every word masked; averaged over
the examples with a masked region, or as the reference code (`--lang4vis_average=reference`).
Writes results.json, table.md, flags.json and the sweep plot (PNG, SVG) to
<out_dir>/ablation/<model>/. The probes and per-example losses are in `value_jax.probes.ablation`;
`run_ablation` here orchestrates the two passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import types
from typing import Optional, Sequence

import numpy as np
from absl import app, flags

from experiments import common, config, inputs
from experiments.config import RunConfig
from value_jax.data.ablation_data import (
    DEFAULT_MAX_TEXT_LEN,
    AblationData,
    Lang4Vis,
    Vis4Lang,
    prepare_ablation,
    summary,
)
from value_jax.data.ablation_loader import AblationLoader
from value_jax.data.flickr30k import PHRASE_TYPES
from value_jax.data.tokenization import WordPieceTokenizer
from value_jax.models.configs import CONFIGS
from value_jax.probes.ablation import LANG4VIS_AVERAGES, Lang4VisProbe, Vis4LangProbe, merge_results
from value_jax.probes.results import Result
from value_jax.runner import run_probes

flags.adopt_module_key_flags(config)  # --help lists the shared flags
flags.DEFINE_float(
    "iot_threshold",
    0.5,
    "Regions with IoT > this against a gold box of the phrase "
    "are ablated (vision-for-language 'object') and masked (language-for-vision).",
)
flags.DEFINE_list(
    "sweep",
    [f"{t / 10:.1f}" for t in range(10)],
    "IoT thresholds of the object-ablation sweep (empty: no sweep).",
)
flags.DEFINE_boolean(
    "label_match",
    False,
    "Evaluate the LabelMatch subset only: phrases whose head "
    "noun is a detector label (needs --objects_vocab).",
)
flags.DEFINE_string(
    "objects_vocab",
    "",
    "The detector's objects_vocab.txt (1600 VG classes) for the "
    "LabelMatch flag. Empty: no LabelMatch statistics.",
)
flags.DEFINE_enum(
    "lang4vis_average",
    "masked",
    list(LANG4VIS_AVERAGES),
    "Language-for-vision "
    "means over the examples with a masked region ('masked'), or over every "
    "example with 0 loss where no region is masked, as the reference code averages "
    "('reference'). Recorded in the results.",
)
flags.DEFINE_integer(
    "max_text_len",
    DEFAULT_MAX_TEXT_LEN,
    "Word pieces per caption incl. [CLS]/"
    "[SEP] (the reference uses 38); phrases cut off are counted and left out.",
)


@dataclasses.dataclass(frozen=True)
class AblationOptions:
    """The ablation's own flags (`cfg.script`), with the flags' defaults."""

    iot_threshold: float = flags.FLAGS["iot_threshold"].default
    sweep: tuple = tuple(flags.FLAGS["sweep"].default)
    label_match: bool = flags.FLAGS["label_match"].default
    objects_vocab: str = flags.FLAGS["objects_vocab"].default
    lang4vis_average: str = flags.FLAGS["lang4vis_average"].default
    max_text_len: int = flags.FLAGS["max_text_len"].default


def _sources(cfg: RunConfig, demo):
    if demo is None:
        return cfg.flickr30k_root, cfg.flickr30k_features
    root = cfg.flickr30k_root or demo.flickr_root
    # MRC-KL of a head with the background class (UNITER's 1601-way) needs the detector's
    # distributions: the demo's npz files hold them.
    features = cfg.flickr30k_features or (
        demo.flickr_features_npz if CONFIGS[cfg.model].mrc_background else demo.flickr_features_tsv
    )
    return root, features


def main(argv):
    del argv
    cfg = RunConfig.from_flags()
    opts = config.script_options(AblationOptions, cfg)
    if opts.label_match and not opts.objects_vocab:
        raise app.UsageError("--label_match needs --objects_vocab")
    if bool(cfg.flickr30k_root) != bool(cfg.flickr30k_features):
        raise app.UsageError("--flickr30k_root and --flickr30k_features go together")
    demo = (
        common.demo_data(cfg)
        if inputs.needs_demo(cfg, "flickr30k_root", "flickr30k_features", "vocab")
        else None
    )
    if demo is not None:
        common.say(
            f"empty --flickr30k_root / --vocab / --checkpoint: the built-in demo under "
            f"{demo.root} stands in for them (synthetic data and random weights: the "
            "numbers mean nothing)"
        )
    model, params = common.load_model(cfg, demo)
    run(cfg, model, params, demo)


def run(cfg: RunConfig, model, params, demo):
    """Both ablation directions for the loaded model; writes <out_dir>/ablation/<model>/."""
    opts = config.script_options(AblationOptions, cfg)
    # flags.json records the ablation's settings also when another script (the demo) runs it.
    cfg = dataclasses.replace(
        cfg, script=types.MappingProxyType({**cfg.script, **dataclasses.asdict(opts)})
    )
    vocab, lowercase = common.vocab_path(cfg, demo)
    root, features = _sources(cfg, demo)
    data = prepare_ablation(
        root,
        features,
        WordPieceTokenizer(vocab, lowercase),
        split=cfg.split,
        max_text_len=opts.max_text_len,
        max_images=cfg.max_images or None,
        objects_vocab=opts.objects_vocab or None,
    )
    if opts.label_match:
        data = data.label_match_subset()
        common.say(f"LabelMatch subset: {len(data.examples)} examples")
    for line in data.report.summary_lines():
        common.say(f"  data: {line}")
    thr = opts.iot_threshold
    sweep = sorted({float(t) for t in opts.sweep} | {thr})
    vis = [Vis4Lang("none"), Vis4Lang("all")] + [Vis4Lang("object", t) for t in sweep]
    lang = [Lang4Vis(text, thr) for text in ("none", "phrase", "all")]
    state = (
        os.path.join(cfg.out_dir, "_state", "ablation", common.model_tag(cfg))
        if cfg.resume
        else None
    )
    result = run_ablation(
        model,
        params,
        data,
        vis,
        lang,
        cfg.batch_size,
        threshold=thr,
        state_dir=state,
        lang4vis_average=opts.lang4vis_average,
        fingerprint=common.run_fingerprint(cfg, (root, features, opts.objects_vocab)),
    )
    result.data["inputs"] = {
        "flickr30k_root": root,
        "features": features,
        "vocab": vocab,
        "demo": demo is not None,
    }
    common.write(cfg, result, "ablation")
    if state:
        shutil.rmtree(state, ignore_errors=True)
    return result


def head_classes(model) -> int:
    return model.config.mrc_classes


def run_ablation(
    model,
    params,
    data: AblationData,
    vis_settings: Sequence[Vis4Lang],
    lang_settings: Sequence[Lang4Vis],
    batch_size: int,
    *,
    threshold: float = 0.5,
    fold: bool = False,
    state_dir: Optional[str] = None,
    progress_every: int = 10,
    fingerprint: Optional[dict] = None,
    lang4vis_average: str = "masked",
) -> Result:
    """Both directions over `data`: one `run_probes` pass each (settings as rows), merged into
    one Result named `ablation`. `fold` maps the detector's classes onto a demo model's small
    head (`ablation_data.fold_classes`). `fingerprint`: the caller's inputs (checkpoint, data
    files, flags) that saved state must match, as in `run_probes`. `lang4vis_average`:
    "masked" or "reference" (`Lang4VisProbe`)."""
    model_type = model.config.model_type
    top = max(int(e.input_ids.max()) for e in data.examples)
    if top >= model.config.vocab_size:
        raise ValueError(
            f"token id {top} >= the model's vocab_size {model.config.vocab_size}: the "
            "vocab file does not belong to this checkpoint (a demo checkpoint built "
            "for another demo vocab? delete <out_dir>/demo/checkpoints)"
        )

    def state(kind, settings):
        # Keyed by what the accumulators depend on, so a resumed run never mixes in another's.
        key = repr((model_type, [s for s in settings], [e.id for e in data.examples], batch_size))
        return state_dir and os.path.join(
            state_dir, f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        )

    examples = hashlib.sha256()
    for e in data.examples:
        examples.update(e.id.encode() + b"\0" + np.asarray(e.input_ids).tobytes())
    fingerprint = {
        **(fingerprint or {}),
        "ablation_examples": examples.hexdigest(),
        "batch_size": batch_size,
        "fold": fold,
        "threshold": threshold,
    }

    def run_pass(kind, settings, loader, probe):
        return run_probes(
            model,
            params,
            loader,
            [probe],
            label=f"ablation {kind}",
            state_dir=state(kind, settings),
            progress_every=progress_every,
            fingerprint=fingerprint,
        )[probe.name]

    results = []
    if vis_settings:
        loader = AblationLoader(data, vis_settings, batch_size, model_type)
        probe = Vis4LangProbe(vis_settings, model_type, threshold)
        results.append(run_pass("vis4lang", vis_settings, loader, probe))
    if lang_settings:
        loader = AblationLoader(
            data, lang_settings, batch_size, model_type, head_classes=head_classes(model), fold=fold
        )
        probe = Lang4VisProbe(
            lang_settings,
            model_type,
            average=lang4vis_average,
            unmasked=loader.unmasked_counts(PHRASE_TYPES),
        )
        results.append(run_pass("lang4vis", lang_settings, loader, probe))
    notes = ["Global [IMG] features of CTRL models are not modelled (UNITER/LXMERT have none)."]
    if fold:
        notes.append(
            f"Demo model: the detector's 1600 classes are folded onto the head's "
            f"{head_classes(model)} outputs (class k -> k mod n)."
        )
    return merge_results(
        "ablation",
        results,
        {"data": summary(data), "data_report": data.report.to_dict(), "notes": notes},
    )


if __name__ == "__main__":
    app.run(main)
