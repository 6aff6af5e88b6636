"""The probe sets of each analysis, shared by the single-analysis scripts and `all`."""

from __future__ import annotations

from experiments import common, inputs
from experiments.config import RunConfig
from value_jax.probes.coref import CorefProbe
from value_jax.probes.fusion import FusionProbe
from value_jax.probes.head_summary import HeadSummaryProbe
from value_jax.probes.linguistic import LinguisticProbe
from value_jax.probes.modality import ImageToTextProbe, ModalityProbe
from value_jax.probes.relation import RelationProbe


def flickr_probes(cfg: RunConfig, model, loader, analyses):
    """Probes that run on Flickr30k Entities captions + regions, in one pass."""
    probes = []
    if "fusion" in analyses:
        probes.append(FusionProbe(include_special=cfg.fusion_include_special))
    if "modality" in analyses:
        if model.config.single_stream:
            probes += [ModalityProbe(), ImageToTextProbe()]
        else:
            common.say(
                "modality importance and image-to-text heads are single-stream analyses "
                f"(VALUE §3.2-3.3.1): skipped for {model.config.display_name}"
            )
    if "coref" in analyses:
        probes.append(
            CorefProbe(types=loader.types, seed=cfg.seed, bilinear_rank=cfg.bilinear_rank)
        )
    if "head_summary" in analyses:
        probes.append(HeadSummaryProbe())
    return probes


def flickr_main(analysis: str):
    """The absl `main` of a script that runs one Flickr30k analysis (`--model`, `--checkpoint`,
    data flags; the built-in demo without them). Outputs go to <out_dir>/<analysis>/<model>/."""

    def main(argv):
        del argv
        run_one_flickr(RunConfig.from_flags(), analysis)

    return main


def run_one_flickr(cfg: RunConfig, analysis: str):
    """One Flickr30k analysis, as `python -m experiments.<analysis>` runs it."""
    demo = common.demo_data(cfg) if inputs.needs_demo(cfg, "flickr30k_root", "vocab") else None
    model, params = common.load_model(cfg, demo)
    return run_flickr(cfg, model, params, demo, {analysis}, analysis)


def run_flickr(cfg: RunConfig, model, params, demo, analyses, state_name):
    loader = inputs.coref_loader(cfg, demo)
    probes = flickr_probes(cfg, model, loader, analyses)
    if not probes:
        return {}
    results = common.run(cfg, model, params, loader, probes, state_name)
    for r in results.values():
        common.write(cfg, r)
    return results


def run_relations(cfg: RunConfig, model, params, demo, state_name, mismatched=True):
    results = {}
    for captions, name in (("region", "relation"), ("mismatched", "relation_mismatched")):
        if captions == "mismatched" and not mismatched:
            continue
        loader = inputs.relation_loader(cfg, demo, captions)
        probe = RelationProbe(
            loader.predicates, name=name, seed=cfg.seed, bilinear_rank=cfg.bilinear_rank
        )
        results.update(common.run(cfg, model, params, loader, [probe], f"{state_name}.{name}"))
        common.write(cfg, results[name])
    return results


def run_linguistic(cfg: RunConfig, model, params, demo, state_name):
    results = {}
    for task, loader in inputs.senteval_loaders(cfg, demo, model.config.feature_dim).items():
        probe = LinguisticProbe(task, loader.labels, pooling=cfg.sentence_pooling, seed=cfg.seed)
        res = common.run(cfg, model, params, loader, [probe], f"{state_name}.{task}")[probe.name]
        common.write(cfg, res, f"linguistic/{task}")
        results[probe.name] = res
    return results
