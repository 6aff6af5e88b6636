"""The probe sets of each analysis, shared by the single-analysis scripts and `all`."""
from __future__ import annotations

from absl import flags

from experiments import common
from experiments.common import FLAGS
from value_jax.probes.coref import CorefProbe
from value_jax.probes.fusion import FusionProbe
from value_jax.probes.head_summary import HeadSummaryProbe
from value_jax.probes.linguistic import LinguisticProbe
from value_jax.probes.modality import ImageToTextProbe, ModalityProbe
from value_jax.probes.relation import RelationProbe

flags.DEFINE_integer("bilinear_rank", 0, "Rank of the Eq. 4 embedding prober's W_w, W_μ "
                     "(0 = full rank, hidden x hidden, as VALUE; a smaller rank trains faster). "
                     "Recorded in the results.", lower_bound=0)


def flickr_probes(model, loader, analyses):
    """Probes that run on Flickr30k Entities captions + regions, in one pass."""
    single_stream = model.config.model_type == "uniter"
    probes = []
    if "fusion" in analyses:
        probes.append(FusionProbe(include_special=FLAGS.fusion_include_special))
    if "modality" in analyses:
        if single_stream:
            probes += [ModalityProbe(), ImageToTextProbe()]
        else:
            common.say("modality importance and image-to-text heads are single-stream analyses "
                       "(VALUE §3.2-3.3.1): skipped for LXMERT")
    if "coref" in analyses:
        probes.append(CorefProbe(types=loader.types, seed=FLAGS.seed,
                                 bilinear_rank=FLAGS.bilinear_rank))
    if "head_summary" in analyses:
        probes.append(HeadSummaryProbe())
    return probes


def flickr_main(analysis: str):
    """The absl `main` of a script that runs one Flickr30k analysis (`--model`, `--checkpoint`,
    data flags; the built-in demo without them). Outputs go to <out_dir>/<analysis>/<model>/."""
    def main(argv):
        del argv
        demo = common.demo_data() if common.needs_demo("flickr30k_root", "vocab") else None
        model, params = common.load_model(demo)
        run_flickr(model, params, demo, {analysis}, analysis)
    return main


def run_flickr(model, params, demo, analyses, state_name):
    loader = common.coref_loader(demo)
    probes = flickr_probes(model, loader, analyses)
    if not probes:
        return {}
    results = common.run(model, params, loader, probes, state_name)
    for r in results.values():
        common.write(r)
    return results


def run_relations(model, params, demo, state_name, mismatched=True):
    results = {}
    for captions, name in (("region", "relation"), ("mismatched", "relation_mismatched")):
        if captions == "mismatched" and not mismatched:
            continue
        loader = common.relation_loader(demo, captions)
        probe = RelationProbe(loader.predicates, name=name, seed=FLAGS.seed,
                              bilinear_rank=FLAGS.bilinear_rank)
        results.update(common.run(model, params, loader, [probe], f"{state_name}.{name}"))
        common.write(results[name])
    return results


def run_linguistic(model, params, demo, state_name):
    results = {}
    for task, loader in common.senteval_loaders(demo, common.feat_dim(model)).items():
        probe = LinguisticProbe(task, loader.labels, pooling=FLAGS.sentence_pooling, seed=FLAGS.seed)
        res = common.run(model, params, loader, [probe], f"{state_name}.{task}")[probe.name]
        common.write(res, f"linguistic/{task}")
        results[probe.name] = res
    return results
