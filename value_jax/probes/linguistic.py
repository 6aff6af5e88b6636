"""VALUE §3.5, Table 5: SentEval linguistic probes per layer, on text-only input.

Per sentence and layer, a sentence embedding (mean of the word tokens t1..tm by default, or the
[CLS] state) is collected; after the pass one linear probe per layer is trained for the task,
all layers at once under vmap, with early stopping on SentEval's own `va` split, and scored on
`te`. Single-stream: the embedding output and every layer; two-stream: the language layers only
(VALUE Table 5; the cross layers see the image). Baseline: BERT-base through the `bert`
conversion, which loads into UNITER's text path.

Best layer: VALUE Table 5 reports the layer with the best TEST accuracy (`best_layer`); the layer
a test-blind selection would pick, the best on SentEval's `va` split (`best_layer_dev`), is
reported next to it with its test accuracy.

Targets: senteval.label [B] int, senteval.split [B] int (0 = tr, 1 = va, 2 = te), senteval.mask [B].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from value_jax import names
from value_jax.names import LayerId
from value_jax.probes.base import Probe
from value_jax.probes.results import Result, Table, line_plot


class LinguisticProbe(Probe):
    collect_keys = ("sentence", "label", "split")

    def __init__(
        self,
        task: str,
        labels: list[str],
        pooling: str = "mean",
        seed: int = 0,
        max_epochs: int = 300,
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.task, self.labels, self.pooling = task, list(labels), pooling
        self.seed, self.max_epochs = seed, max_epochs
        self.name = f"linguistic.{task}"
        self.layer_names: list[str] = []

    def bind(self, layout):
        # LXMERT: the language encoder's layers only (VALUE Table 5), not the cross layers.
        self.layer_names = [
            n for n in layout.hidden_names("text") if LayerId.parse(n).stack != "cross"
        ]

    def step(self, trace, targets):
        states, _ = trace.hidden_states("text", self.layer_names)  # [L, B, T, D]
        if self.pooling == "cls":
            sentence = states[:, :, 0]
        else:
            w = trace.word_mask.astype(states.dtype)
            sentence = (
                jnp.einsum("lbtd,bt->lbd", states, w) / jnp.maximum(w.sum(1), 1.0)[None, :, None]
            )
        mask = targets["senteval.mask"]
        return {
            "sentence": jnp.transpose(sentence, (1, 0, 2)),
            "sentence.mask": mask,
            "label": targets["senteval.label"],
            "label.mask": mask,
            "split": targets["senteval.split"],
            "split.mask": mask,
        }

    def finalize(self, stats, info):
        from value_jax.probes import classifiers

        x = np.transpose(stats["sentence"], (1, 0, 2))  # [L, N, D]
        y, split = stats["label"].astype(np.int32), stats["split"]
        parts = {s: np.flatnonzero(split == i) for i, s in enumerate(("train", "dev", "test"))}
        if any(len(v) == 0 for v in parts.values()):
            raise ValueError(
                f"{self.task}: every SentEval split (tr, va, te) needs sentences; "
                f"got { ({k: len(v) for k, v in parts.items()}) }"
            )
        import jax

        tr, va, te = parts["train"], parts["dev"], parts["test"]
        probe = classifiers.fit_linear(
            x[:, tr],
            y[tr],
            x[:, va],
            y[va],
            len(self.labels),
            jax.random.PRNGKey(self.seed),
            max_epochs=self.max_epochs,
            patience=max(10, self.max_epochs // 10),
        )
        test_acc = np.asarray(classifiers.evaluate(probe, x[:, te], y[te]), np.float64)
        dev_acc = np.asarray(classifiers.evaluate(probe, x[:, va], y[va]), np.float64)
        best, best_dev = int(np.argmax(test_acc)), int(np.argmax(dev_acc))
        labels = [names.label(n) for n in self.layer_names]
        table = Table(
            f"Table 5: SentEval {self.task}, accuracy per layer (best on test, as "
            f"VALUE: {labels[best]}, {test_acc[best]:.4f}; best on dev: "
            f"{labels[best_dev]}, test {test_acc[best_dev]:.4f})",
            ["layer"] + labels,
            [["test accuracy"] + list(test_acc), ["dev accuracy"] + list(dev_acc)],
        )
        selection = Table(
            f"Table 5: SentEval {self.task}, best layer by selection split",
            ["selected on", "layer", "test accuracy", "dev accuracy"],
            [
                ["test (VALUE)", labels[best], float(test_acc[best]), float(dev_acc[best])],
                ["dev", labels[best_dev], float(test_acc[best_dev]), float(dev_acc[best_dev])],
            ],
        )
        return Result(
            self.name,
            {
                "task": self.task,
                "layers": self.layer_names,
                "test_accuracy": test_acc,
                "dev_accuracy": dev_acc,
                "best_layer": self.layer_names[best],
                "best_accuracy": float(test_acc[best]),
                "best_layer_dev": self.layer_names[best_dev],
                "best_accuracy_dev": float(test_acc[best_dev]),
                "pooling": self.pooling,
                "sentences": {k: len(v) for k, v in parts.items()},
                "majority_baseline": float(
                    np.bincount(y[parts["test"]]).max() / len(parts["test"])
                ),
            },
            [table, selection],
            {
                f"linguistic_{self.task}": line_plot(
                    {self.task: test_acc},
                    f"SentEval {self.task} per layer",
                    "layer",
                    "accuracy",
                    labels,
                )
            },
        )
