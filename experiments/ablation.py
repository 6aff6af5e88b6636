"""Cross-modal input ablation (Frank, Bugliarello & Elliott 2021) on Flickr30k Entities.

    python -m experiments.ablation --model=uniter            # the built-in demo
    python -m experiments.ablation --model=lxmert --checkpoint=ckpt/lxmert --vocab=vocab.txt \
        --flickr30k_root=flickr30k_entities --flickr30k_features=flickr30k_obj36.tsv

Vision-for-language: MLM loss (bits) of the masked phrase with no / the phrase's (IoT > t) / all
regions replaced by the dataset-mean feature, plus the object ablation swept over t.
Language-for-vision: MRC-KL / MRC-XE (bits in the tables, nats in results.json) at the masked
target region with the caption intact, its phrase masked, or every word masked; averaged over
the examples with a masked region, or as the reference code (`--lang4vis_average=reference`). Writes results.json, table.md, flags.json and the sweep
plot (PNG, SVG) to <out_dir>/ablation/<model>/.
"""
from __future__ import annotations

import os
import shutil

from absl import app, flags

from experiments import common

flags.adopt_module_key_flags(common)   # --help lists the shared flags
from value_jax.data.ablation_data import DEFAULT_MAX_TEXT_LEN, Lang4Vis, Vis4Lang, prepare_ablation
from value_jax.data.tokenization import WordPieceTokenizer
from value_jax.probes.ablation import LANG4VIS_AVERAGES, run_ablation

FLAGS = flags.FLAGS
flags.DEFINE_float("iot_threshold", 0.5, "Regions with IoT > this against a gold box of the phrase "
                   "are ablated (vision-for-language 'object') and masked (language-for-vision).")
flags.DEFINE_list("sweep", [f"{t / 10:.1f}" for t in range(10)], "IoT thresholds of the "
                  "object-ablation sweep (empty: no sweep).")
flags.DEFINE_boolean("label_match", False, "Evaluate the LabelMatch subset only: phrases whose head "
                     "noun is a detector label (needs --objects_vocab).")
flags.DEFINE_string("objects_vocab", "", "The detector's objects_vocab.txt (1600 VG classes) for the "
                    "LabelMatch flag. Empty: no LabelMatch statistics.")
flags.DEFINE_enum("lang4vis_average", "masked", list(LANG4VIS_AVERAGES), "Language-for-vision "
                  "means over the examples with a masked region ('masked'), or over every "
                  "example with 0 loss where no region is masked, as the reference code averages "
                  "('reference'). Recorded in the results.")
flags.DEFINE_integer("max_text_len", DEFAULT_MAX_TEXT_LEN, "Word pieces per caption incl. [CLS]/"
                     "[SEP] (the reference uses 38); phrases cut off are counted and left out.")


def _inputs(demo):
    if demo is None:
        return FLAGS.flickr30k_root, FLAGS.flickr30k_features
    root = FLAGS.flickr30k_root or demo.flickr_root
    # UNITER's MRC-KL needs the detector's 1601-way distributions: the demo's npz files hold them.
    features = FLAGS.flickr30k_features or (demo.flickr_features_npz if FLAGS.model == "uniter"
                                            else demo.flickr_features_tsv)
    return root, features


def main(argv):
    del argv
    if FLAGS.label_match and not FLAGS.objects_vocab:
        raise app.UsageError("--label_match needs --objects_vocab")
    if bool(FLAGS.flickr30k_root) != bool(FLAGS.flickr30k_features):
        raise app.UsageError("--flickr30k_root and --flickr30k_features go together")
    demo = common.demo_data() if common.needs_demo("flickr30k_root", "flickr30k_features",
                                                   "vocab") else None
    if demo is not None:
        common.say(f"empty --flickr30k_root / --vocab / --checkpoint: the built-in demo under "
                   f"{demo.root} stands in for them (synthetic data and random weights: the "
                   "numbers mean nothing)")
    model, params = common.load_model(demo)
    run(model, params, demo)


def run(model, params, demo):
    """Both ablation directions for the loaded model; writes <out_dir>/ablation/<model>/."""
    vocab, lowercase = common.vocab_path(demo)
    root, features = _inputs(demo)
    data = prepare_ablation(root, features, WordPieceTokenizer(vocab, lowercase), split=FLAGS.split,
                            max_text_len=FLAGS.max_text_len, max_images=FLAGS.max_images or None,
                            objects_vocab=FLAGS.objects_vocab or None)
    if FLAGS.label_match:
        data = data.label_match_subset()
        common.say(f"LabelMatch subset: {len(data.examples)} examples")
    for line in data.report.summary_lines():
        common.say(f"  data: {line}")
    thr = FLAGS.iot_threshold
    sweep = sorted({float(t) for t in FLAGS.sweep} | {thr})
    vis = [Vis4Lang("none"), Vis4Lang("all")] + [Vis4Lang("object", t) for t in sweep]
    lang = [Lang4Vis(text, thr) for text in ("none", "phrase", "all")]
    state = os.path.join(FLAGS.out_dir, "_state", "ablation", common.model_tag()) \
        if FLAGS.resume else None
    result = run_ablation(model, params, data, vis, lang, FLAGS.batch_size, threshold=thr,
                          state_dir=state, lang4vis_average=FLAGS.lang4vis_average,
                          fingerprint=common.run_fingerprint(
                              (root, features, FLAGS.objects_vocab)))
    result.data["inputs"] = {"flickr30k_root": root, "features": features, "vocab": vocab,
                             "demo": demo is not None}
    common.write(result, "ablation")
    if state:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
