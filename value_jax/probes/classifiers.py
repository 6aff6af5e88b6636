"""Probing classifiers shared by the analyses: VALUE §3.3.3 (Eq. 3, Eq. 4), §3.4 (Fig. 5).

* Attention prober (Eq. 3): `p(c|i,j) ∝ Σ_k (w_k α^k_ij + μ_k α^k_ji)` is a linear classifier over
  the `2N` attention values of a pair: `attention_pair_features` builds them (the one layout of
  Eq. 3 features in the project), `fit_linear` trains, `eq3_weights` reads `w_k`, `μ_k` back.
* Layer-wise embedding prober (Eq. 4): `p(c|i,j) ∝ w_cᵀ(W_w e_i ⊙ W_μ e_j) + b_c`: `fit_bilinear`.
* One probing experiment (split, fit, control task, scores) is `value_jax.probes.probing.train_prober`.

Every fit trains `P` independent probes at once (one per layer, say) under `jax.vmap` over a
leading probe axis, full-batch L-BFGS (or Adam) for the convex linear prober and minibatch Adam
for the bilinear one, L2 on the weight matrices (not on biases), features standardised with train
statistics, and early stopping on dev accuracy: per probe, the parameters of its best dev epoch
are kept (`jnp.where`, no per-probe Python control flow), dev loss breaking accuracy ties, and a
probe stops after `patience` epochs without improving, or at `max_epochs`. On CPU the probes are
trained one after another (each stops on its own); on an accelerator they share each step, and the
loop ends when every probe has stopped. Epochs are 0-based indices into
`TrainRecord.dev_acc_history`; a bilinear epoch is capped at `EPOCH_ITEMS` train items.

Eq. 4 inputs too large to hold (a layer's collected rows at Flickr30k scale) come as
`CollectedRows` and are streamed: read `STREAM_ROWS` at a time from the collected arrays (memmaps
when spilled) for the statistics, the minibatches and the scores, with the same training as in
memory (`_fit_bilinear_streamed`).

One module for both fits (about 770 lines): the Eq. 3 and Eq. 4 probers, in memory or
streamed, share the training loop, standardisation and early stopping.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

_STD_FLOOR = 1e-6  # features constant on train (e.g. an attention value that is always 0)
# Full float32 matmuls for the linear prober: on GPU the default (TF32) shifts L-BFGS line
# searches and so early-stopping epochs; the cost there is negligible (skinny C-wide products).
_EXACT = jax.lax.Precision.HIGHEST
# Eq. 4 prober epochs at scale (`fit_bilinear`): an epoch sees at most EPOCH_ITEMS train items
# (256 minibatches of 256), early stopping scores at most STOPPING_DEV_ITEMS dev items.
EPOCH_ITEMS = 65536
STOPPING_DEV_ITEMS = 16384
_STOPPING_DEV_SALT = 0x5D
# Streamed inputs (`CollectedRows`) are read this many rows at a time for statistics and scores.
STREAM_ROWS = 65536
_BILINEAR_INPUTS = ("e_i_train", "e_j_train", "e_i_dev", "e_j_dev")


@flax.struct.dataclass
class TrainRecord:
    """Per probe `[P]`: `best_epoch` (0-based; its parameters were kept), `best_dev_acc`,
    `epochs_run` (until patience ran out, or `max_epochs`), and `dev_acc_history`
    `[P, max_epochs]` (dev accuracy after every epoch, NaN once the probe stopped)."""

    best_epoch: jnp.ndarray
    best_dev_acc: jnp.ndarray
    epochs_run: jnp.ndarray
    dev_acc_history: jnp.ndarray


@flax.struct.dataclass
class LinearProbe:
    """`P` multinomial logistic regressions: weights `{"w": [P, F, C], "b": [P, C]}` act on
    `(x - mean) / std`, with `mean`, `std` `[P, F]` from train."""

    weights: dict
    mean: jnp.ndarray
    std: jnp.ndarray
    record: TrainRecord

    def input_space_weights(self):
        """`(w [P, F, C], b [P, C])` acting on raw features, comparable across features; for
        Eq. 3 features, `eq3_weights(w, layers)` splits `w` into Eq. 3's `w_k` and `μ_k`."""
        w = self.weights["w"] / self.std[..., None]
        b = self.weights["b"] - jnp.einsum("pf,pfc->pc", self.mean, w)
        return w, b


@flax.struct.dataclass
class BilinearProbe:
    """`P` Eq. 4 probers. weights: `{"w_i": [P, D, R], "w_j": [P, D, R], "w_cls": [P, R, C],
    "b": [P, C]}` acting on standardised `e_i`, `e_j` (`mean_i`, `std_i`, ... are `[P, D]`)."""

    weights: dict
    mean_i: jnp.ndarray
    std_i: jnp.ndarray
    mean_j: jnp.ndarray
    std_j: jnp.ndarray
    record: TrainRecord


def attention_pair_features(a_ij, a_ji):
    """Eq. 3's input: `a_ij`, `a_ji` `[..., L, H]` (attention of i on j, and of j on i, per layer
    and head) -> `[..., L * 2H]`, layer-major: layer l's H values of α_ij, then its H of α_ji.

    A linear prober over these features (`fit_linear`) is exactly Eq. 3 per class c,
    `Σ_k w^c_k α^k_ij + μ^c_k α^k_ji` (plus a class bias) over the N = L·H heads k; `eq3_weights`
    returns `w_k` and `μ_k` from the fitted weights. For a phrase, α is the max over its word
    pieces (VALUE §3.3.3); N = 144 heads for UNITER (12 layers × 12 heads).
    """
    a_ij, a_ji = jnp.asarray(a_ij), jnp.asarray(a_ji)
    if a_ij.shape != a_ji.shape or a_ij.ndim < 2:
        raise ValueError(
            f"a_ij {a_ij.shape} and a_ji {a_ji.shape} must have the same shape [..., layers, heads]"
        )
    both = jnp.concatenate([a_ij, a_ji], axis=-1)  # [..., L, 2H]
    return both.reshape(*both.shape[:-2], -1)


def eq3_weights(w, num_layers: int):
    """`(w_ij, w_ji)`, each `[..., L, H, C]`: Eq. 3's `w_k` (on α_ij) and `μ_k` (on α_ji) per
    layer and head, from weights `w [..., L * 2H, C]` over `attention_pair_features`."""
    w = jnp.asarray(w)
    *lead, features, classes = w.shape
    if features % (2 * num_layers):
        raise ValueError(f"{features} features are not {num_layers} layers × 2 directions × heads")
    w = w.reshape(*lead, num_layers, 2, features // (2 * num_layers), classes)
    return w[..., 0, :, :], w[..., 1, :, :]


@jax.custom_vjp
def _matmul_pretransposed(x, x_t, w):
    """`x [N, F] @ w [F, C]`, differentiable in `w` only, with `x_t = x.T` given so that the
    weight gradient `x_t @ g` is a plain matmul: XLA:CPU contracts `x` over its long N axis
    about 6x slower per step (measured at 8000 x 1536 x 8)."""
    return jnp.matmul(x, w, precision=_EXACT)


_matmul_pretransposed.defvjp(
    lambda x, x_t, w: (jnp.matmul(x, w, precision=_EXACT), x_t),
    lambda x_t, g: (None, None, jnp.matmul(x_t, g, precision=_EXACT)),
)


def _linear_logits(w, x, x_t=None):
    if x_t is None:
        return jnp.matmul(x, w["w"], precision=_EXACT) + w["b"]
    return _matmul_pretransposed(x, x_t, w["w"]) + w["b"]


def _bilinear_logits(w, e_i, e_j):
    return ((e_i @ w["w_i"]) * (e_j @ w["w_j"])) @ w["w_cls"] + w["b"]


def _trainer(logits_fn, optimizer, learning_rate, l2, num_probes):
    """`(opt, step, scores)` of a fit: `step(w, state, inputs, y)` one optimiser step and
    `scores(w, inputs, y)` the dev `(accuracy, loss)`, both over `num_probes` probes."""
    # L-BFGS sets its step by line search: learning_rate is Adam's alone.
    opt = optax.lbfgs() if optimizer == "lbfgs" else optax.adam(learning_rate)

    def objective(w, inputs, y):
        logits = logits_fn(w, *inputs)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        penalty = sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(w) if v.ndim >= 2)
        return nll + 0.5 * l2 * penalty

    def one_step(w, state, inputs, y):
        if optimizer == "lbfgs":
            value_fn = functools.partial(objective, inputs=inputs, y=y)
            value, grad = optax.value_and_grad_from_state(value_fn)(w, state=state)
            updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=value_fn)
        else:
            updates, state = opt.update(jax.grad(objective)(w, inputs, y), state, w)
        return optax.apply_updates(w, updates), state

    def dev_scores(w, inputs, y):
        logits = logits_fn(w, *inputs)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jnp.mean(jnp.argmax(logits, -1) == y), nll

    return opt, _over_probes(one_step, num_probes), _over_probes(dev_scores, num_probes)


def _epoch_plan(n, batch_size, steps_per_epoch):
    """`(num_batches, epoch_size, per_pass)` of an epoch over `n` train items.

    One order is shared by all probes, so a probe trains the same alone or alongside others. An
    uncapped epoch is a fresh permutation of the train set; capped epochs (steps_per_epoch)
    walk through one permutation, `per_pass` epochs of `epoch_size` items each, then draw the
    next (permuting a million items costs about half a capped epoch's training on CPU)."""
    num_batches = n // batch_size
    if steps_per_epoch:
        num_batches = min(num_batches, steps_per_epoch)
    epoch_size = num_batches * batch_size
    return num_batches, epoch_size, max(1, n // epoch_size)


def _permutation(key, epoch, per_pass, n):
    """The train order that epochs `per_pass * (epoch // per_pass)` onwards walk through."""
    return jax.random.permutation(jax.random.fold_in(key, epoch // per_pass), n)


def _loop_start(weights, opt, max_epochs):
    """Early-stopping state before the first epoch (`_after_epoch` advances it)."""
    num_probes = jax.tree.leaves(weights)[0].shape[0]
    return dict(
        epoch=jnp.int32(0),
        w=weights,
        state=jax.vmap(opt.init)(weights),
        best_w=weights,
        best_acc=jnp.full((num_probes,), -1.0),
        best_nll=jnp.full((num_probes,), jnp.inf),
        best_epoch=jnp.zeros((num_probes,), jnp.int32),
        bad=jnp.zeros((num_probes,), jnp.int32),
        active=jnp.ones((num_probes,), bool),
        history=jnp.full((num_probes, max_epochs), jnp.nan),
    )


def _after_epoch(s, w, state, acc, nll, patience):
    """Early stopping after an epoch that left `w, state` and scored `acc, nll` on dev: per
    probe, keep the parameters of the best dev epoch, stop after `patience` without a gain."""

    def keep(mask, new, old):
        return jax.tree.map(
            lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
        )

    # Dev loss breaks accuracy ties: on a plateau of accuracy keep the better-fitted epoch.
    improved = s["active"] & (
        (acc > s["best_acc"]) | ((acc == s["best_acc"]) & (nll < s["best_nll"]))
    )
    bad = jnp.where(improved, 0, s["bad"] + 1)
    return dict(
        epoch=s["epoch"] + 1,
        w=w,
        state=state,
        bad=bad,
        best_w=keep(improved, w, s["best_w"]),
        best_acc=jnp.where(improved, acc, s["best_acc"]),
        best_nll=jnp.where(improved, nll, s["best_nll"]),
        best_epoch=jnp.where(improved, s["epoch"], s["best_epoch"]),
        history=s["history"].at[:, s["epoch"]].set(jnp.where(s["active"], acc, jnp.nan)),
        active=s["active"] & (bad < patience),
    )


def _loop_end(s):
    """`(best weights, TrainRecord)` of a finished early-stopping loop."""
    record = TrainRecord(
        best_epoch=s["best_epoch"],
        best_dev_acc=s["best_acc"],
        epochs_run=jnp.sum(~jnp.isnan(s["history"]), axis=1),
        dev_acc_history=s["history"],
    )
    return s["best_w"], record


@functools.partial(
    jax.jit,
    static_argnames=(
        "logits_fn",
        "max_epochs",
        "patience",
        "batch_size",
        "optimizer",
        "steps_per_epoch",
    ),
)
def _train_together(
    weights,
    train,
    y_train,
    dev,
    y_dev,
    key,
    learning_rate,
    l2,
    *,
    logits_fn,
    max_epochs,
    patience,
    batch_size,
    optimizer="adam",
    steps_per_epoch=None,
):
    """Trains `P` probes in lockstep: weights leaves `[P, ...]`, inputs tuples of `[P, N, ...]`,
    y `[P, N]`. The loop runs until the last probe stops (stopped probes keep computing, their
    results masked); `_train` decides whether to call it for all probes or one at a time."""
    num_probes, n = y_train.shape
    opt, step, scores = _trainer(logits_fn, optimizer, learning_rate, l2, num_probes)
    num_batches, epoch_size, per_pass = _epoch_plan(n, batch_size, steps_per_epoch)

    def run_epoch(w, state, epoch, order):
        if batch_size == n:  # full batch: no gather of the whole train set
            return step(w, state, train, y_train), order
        order = jax.lax.cond(
            epoch % per_pass == 0, lambda: _permutation(key, epoch, per_pass, n), lambda: order
        )
        start = (epoch % per_pass) * epoch_size
        batches = jax.lax.dynamic_slice_in_dim(order, start, epoch_size)
        batches = batches.reshape(num_batches, batch_size)

        def body(carry, idx):
            inputs = tuple(jnp.take(x, idx, axis=1) for x in train)
            return step(*carry, inputs, jnp.take(y_train, idx, axis=1)), None

        return jax.lax.scan(body, (w, state), batches)[0], order

    def body(carry):
        s, order = carry
        (w, state), order = run_epoch(s["w"], s["state"], s["epoch"], order)
        acc, nll = scores(w, dev, y_dev)
        return _after_epoch(s, w, state, acc, nll, patience), order

    s, _ = jax.lax.while_loop(
        lambda c: (c[0]["epoch"] < max_epochs) & jnp.any(c[0]["active"]),
        body,
        (_loop_start(weights, opt, max_epochs), jnp.zeros((n,), jnp.int32)),
    )
    return _loop_end(s)


def _over_probes(fn, num_probes):
    """`jax.vmap(fn)` over the leading probe axis; for one probe, `fn` on the probe's arrays
    without a probe axis: XLA:CPU runs a matmul with a batch axis of size 1 as a batched matmul,
    measured 1.3x (768 x 768) to 2.9x (2048 x 2048) slower than the plain one per Eq. 4 step."""
    if num_probes > 1:
        return jax.vmap(fn)

    def one(*args):
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda a: a[None], out)

    return one


def _each_probe(fn, *trees):
    """`fn(*trees)` for all `P` probes (leading axis of every leaf) at once, or, on CPU, one
    probe at a time, the results concatenated.

    Trained in lockstep every probe computes until the last one stops; on CPU a step costs in
    proportion to the probes in it, so probes that stop early would waste that time (on the
    demo's relation probers the slowest layer ran twice the mean epochs), and batched matmuls
    are slower there (`_over_probes`). On an accelerator the `P` probes of a step run side by
    side at little extra cost, so they stay together. Either way a probe gets the same
    initialisation and minibatch order, hence the same training.
    """
    num_probes = jax.tree.leaves(trees)[0].shape[0]
    if num_probes == 1 or jax.default_backend() != "cpu":
        return fn(*trees)
    parts = [fn(*jax.tree.map(lambda a, p=p: a[p : p + 1], trees)) for p in range(num_probes)]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def _train(weights, train, y_train, dev, y_dev, *args, **kwargs):
    """`_train_together`, per probe on CPU (`_each_probe`)."""
    return _each_probe(
        lambda *trees: _train_together(*trees, *args, **kwargs),
        weights,
        train,
        y_train,
        dev,
        y_dev,
    )


@jax.jit
def _stats(x):
    std = jnp.std(x, axis=1)
    return jnp.mean(x, axis=1), jnp.where(std > _STD_FLOOR, std, 1.0)


@jax.jit
def _standardise(x, mean, std):
    return (x - mean[:, None]) / std[:, None]


@functools.partial(jax.jit, static_argnames="logits_fn")
def _accuracy_together(weights, inputs, y, logits_fn):
    return _over_probes(
        lambda w, inp, t: jnp.mean(jnp.argmax(logits_fn(w, *inp), -1) == t), y.shape[0]
    )(weights, inputs, y)


def _accuracy(weights, inputs, y, logits_fn):
    return _each_probe(
        lambda *trees: _accuracy_together(*trees, logits_fn=logits_fn), weights, inputs, y
    )


def _features(x, name):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 3:
        raise ValueError(
            f"{name} must be [P, N, F] (a leading probe axis; x[None] for one "
            f"probe), got shape {x.shape}"
        )
    return x


def _labels(y, num_probes, n, num_classes, name):
    y = np.asarray(y)
    if y.ndim == 1:
        y = np.broadcast_to(y, (num_probes,) + y.shape)
    if y.shape != (num_probes, n):
        raise ValueError(f"{name} must be [N] or [P, N] = [{num_probes}, {n}], got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} holds labels in [{y.min()}, {y.max()}], outside [0, num_classes={num_classes})"
        )
    return jnp.asarray(y, jnp.int32)


def fit_linear(
    x_train,
    y_train,
    x_dev,
    y_dev,
    num_classes: int,
    key,
    *,
    l2: float = 1e-4,
    optimizer: str = "lbfgs",
    learning_rate: float = 0.1,
    max_epochs: int = 300,
    patience: int = 20,
) -> LinearProbe:
    """Trains `P` multinomial logistic regressions (the Eq. 3 attention prober, or a linear probe
    of any features) with early stopping on dev accuracy.

    Args:
      x_train: `[P, N, F]`; y_train: `[N]` (shared by all probes) or `[P, N]` ints in [0, C).
      x_dev: `[P, M, F]`; y_dev: `[M]` or `[P, M]`.
      key: `jax.random` key, accepted for symmetry with `fit_bilinear`: full-batch training from
        a zero start is deterministic (the problem is convex) and does not use it.
      l2: objective is `mean cross-entropy + l2/2 ||w||²` (bias not penalised); scikit-learn's
        `LogisticRegression(C=c)` on the same standardised train set is `l2 = 1 / (c N)`.
      optimizer: "lbfgs" (default: optax L-BFGS with zoom line search; reaches the l2 optimum in
        tens of iterations, as scikit-learn's lbfgs does) or "adam" (`learning_rate`).
      max_epochs, patience: an epoch is one full-batch step (sizes up to ~50k x 2k fit in
        memory: the train features are held standardised and transposed, 2 copies).
    Returns: a `LinearProbe` holding each probe's best-dev-epoch parameters.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    x_train, x_dev = _features(x_train, "x_train"), _features(x_dev, "x_dev")
    num_probes, n, f = x_train.shape
    if x_dev.shape[0] != num_probes or x_dev.shape[2] != f:
        raise ValueError(f"x_dev {x_dev.shape} does not match x_train {x_train.shape}")
    y_train = _labels(y_train, num_probes, n, num_classes, "y_train")
    y_dev = _labels(y_dev, num_probes, x_dev.shape[1], num_classes, "y_dev")
    mean, std = _stats(x_train)
    weights = {
        "w": jnp.zeros((num_probes, f, num_classes)),  # convex: zero start is exact
        "b": jnp.zeros((num_probes, num_classes)),
    }
    x_train = _standardise(x_train, mean, std)
    weights, record = _train(
        weights,
        (x_train, jnp.swapaxes(x_train, 1, 2)),
        y_train,
        (_standardise(x_dev, mean, std),),
        y_dev,
        key,
        learning_rate,
        l2,
        logits_fn=_linear_logits,
        optimizer=optimizer,
        max_epochs=max_epochs,
        patience=patience,
        batch_size=n,
    )
    return LinearProbe(weights=weights, mean=mean, std=std, record=record)


def evaluate(probe: LinearProbe, x, y):
    """Accuracy `[P]` of each probe on `x [P, N, F]`, `y [N] or [P, N]`."""
    x = _features(x, "x")
    y = _labels(y, *x.shape[:2], probe.weights["b"].shape[-1], "y")
    return _accuracy(probe.weights, (_standardise(x, probe.mean, probe.std),), y, _linear_logits)


def _aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised array starting on a 64-byte boundary: jax on CPU takes such a host
    array without copying it (measured 0.1 s per 200 MB copied otherwise)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _read_buffers(rows, n: int) -> list:
    """One aligned `[n, D]` float32 buffer per `CollectedRows` of `rows`, for reads that reuse
    it: a new 200 MB array for every read of 65,536 rows at 768 paid its page faults again
    (0.12 s a read inside a fit, against 0.04 s into a reused buffer)."""
    return [_aligned_empty((n, r.shape[-1])) for r in rows]


class CollectedRows:
    """`[N, D]` float32 rows `base[index, layer]` of a collected `[N_all, L, D]` array (or
    `base[index]` of an `[N_all, D]` one, `layer=None`), read on demand: `base` is typically
    the read-only memmap, or the `LayerFiles`, a spilled collection comes back as.
    `fit_bilinear` and `evaluate_bilinear` stream such inputs, `STREAM_ROWS` at a time,
    instead of holding them; `probing.train_prober` splits them by index (`subset`)."""

    def __init__(self, base, index, layer: Optional[int] = None):
        self.base, self.index, self.layer = base, np.asarray(index, np.int64), layer
        if self.index.ndim != 1 or base.ndim != (2 if layer is None else 3):
            raise ValueError(
                f"CollectedRows needs an [N, D] base with layer=None or an [N, L, D] one with "
                f"a layer, and an [n] index; got base {base.shape}, layer {layer}, "
                f"index {self.index.shape}"
            )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        """`(1, n, D)`: the one probe's `[P, N, D]` the rows stand for."""
        return (1, len(self.index), self.base.shape[-1])

    def subset(self, positions) -> "CollectedRows":
        return CollectedRows(self.base, self.index[positions], self.layer)

    def _source(self):
        """The `[N_all, D]` rows of the layer (a view: nothing is read)."""
        if self.layer is None:
            return self.base
        if hasattr(self.base, "layer"):  # LayerFiles: the layer's own file
            return self.base.layer(self.layer)
        return self.base[:, self.layer]

    def read(self, positions, buffer: Optional[np.ndarray] = None):
        """`(rows, order)`: the rows of `positions` in increasing row order (disk locality),
        64-byte aligned float32 `[len(positions), D]`, `rows[k]` being `positions[order[k]]`'s.
        `buffer`: an aligned float32 array of at least that many rows to read into (its first
        rows are returned) instead of a new one."""
        at = self.index[positions]
        order = np.argsort(at, kind="stable")
        shape = (len(at), self.base.shape[-1])
        if buffer is None:
            out = _aligned_empty(shape)
        elif buffer.dtype != np.float32 or buffer.ndim != 2 or buffer.shape[1] != shape[1]:
            raise ValueError(
                f"read buffer must be float32 [>= {shape[0]}, {shape[1]}], got "
                f"{buffer.dtype} {buffer.shape}"
            )
        elif buffer.shape[0] < shape[0]:
            raise ValueError(f"read buffer holds {buffer.shape[0]} rows, {shape[0]} asked")
        else:
            out = buffer[: shape[0]]
        source = self._source()
        if source.dtype == np.float32:
            np.take(source, at[order], axis=0, out=out)
        else:
            out[:] = source[at[order]]
        return out, order

    def take(self, positions) -> np.ndarray:
        """`[len(positions), D]` float32 in the order of `positions`."""
        rows, order = self.read(positions)
        out = _aligned_empty(rows.shape)
        out[order] = rows
        return out

    def chunks(self, size: int, buffer: Optional[np.ndarray] = None):
        """`(positions, rows)` over all rows, `size` at a time, `rows[k]` being `positions[k]`'s
        (positions in increasing row order within a chunk); with `buffer` (see `read`) every
        chunk is read into it, so a chunk is only valid until the next one is read."""
        for lo in range(0, len(self), size):
            positions = np.arange(lo, min(lo + size, len(self)))
            rows, order = self.read(positions, buffer)
            yield positions[order], rows


def _row_stats(rows: CollectedRows, chunk: int):
    """`(mean [1, D], std [1, D])` as `_stats`, over the rows in chunks: float64 sums per
    chunk, combined exactly (Chan et al.), so no copy of the rows is held."""
    count, mean, m2 = 0, np.zeros(rows.shape[-1]), np.zeros(rows.shape[-1])
    (buffer,) = _read_buffers([rows], min(chunk, len(rows)))
    for _, x in rows.chunks(chunk, buffer):
        k = len(x)
        m = x.sum(0, dtype=np.float64) / k
        x -= m.astype(np.float32)  # the chunk's own buffer: deviations from (nearly) its mean
        np.square(x, out=x)
        # Σ(x - m)² = Σ(x - m32)² - k (m - m32)², m32 the float32 mean subtracted above.
        chunk_m2 = x.sum(0, dtype=np.float64) - k * (m - m.astype(np.float32)) ** 2
        delta = m - mean
        mean = mean + delta * k / (count + k)
        m2 = m2 + chunk_m2 + delta**2 * count * k / (count + k)
        count += k
    std = np.sqrt(np.maximum(m2, 0) / max(count, 1))
    std = np.where(std > _STD_FLOOR, std, 1.0)
    return jnp.asarray(mean[None], jnp.float32), jnp.asarray(std[None], jnp.float32)


@functools.partial(jax.jit, static_argnames="logits_fn")
def _streamed_steps(w, state, inputs, where, y, means, stds, learning_rate, l2, *, logits_fn):
    """Minibatch steps of a streamed Eq. 4 fit (`_fit_bilinear_streamed`) over rows read from
    disk: inputs a tuple of raw rows `[R, D]` as read (in row order), where a tuple of
    `[batches, batch]` positions in them of each minibatch's rows, y `[batches, 1, batch]`;
    each minibatch is gathered and standardised as it is used."""
    _, step, _ = _trainer(logits_fn, "adam", learning_rate, l2, 1)

    def body(carry, batch):
        at, t = batch
        xs = tuple(
            _standardise(jnp.take(x, i, axis=0)[None], m, sd)
            for x, i, m, sd in zip(inputs, at, means, stds)
        )
        return step(*carry, xs, t), None

    return jax.lax.scan(body, (w, state), (where, y))[0]


@functools.partial(jax.jit, static_argnames=("logits_fn", "patience"))
def _streamed_check(s, w, state, dev, y_dev, learning_rate, l2, *, logits_fn, patience):
    """The dev check and early stopping after an epoch of a streamed fit, as in
    `_train_together`."""
    _, _, scores = _trainer(logits_fn, "adam", learning_rate, l2, y_dev.shape[0])
    acc, nll = scores(w, dev, y_dev)
    return _after_epoch(s, w, state, acc, nll, patience)


def _fit_bilinear_streamed(
    weights, rows, y_train, dev, y_dev, means, stds, key, learning_rate, l2,
    *, max_epochs, patience, batch_size, steps_per_epoch,
):  # fmt: skip
    """`_train_together` for one probe whose train rows (`rows`, a pair of `CollectedRows`)
    are read from disk `STREAM_ROWS` at a time (whole minibatches): the same initialisation,
    minibatch order, steps and early stopping, while only one read's rows (on an accelerator
    also the next one's, read while these train) are held, whatever the epoch size. Returns
    `(best weights, TrainRecord)`."""
    n = len(rows[0])
    num_batches, epoch_size, per_pass = _epoch_plan(n, batch_size, steps_per_epoch)
    per_read = max(1, STREAM_ROWS // batch_size)  # minibatches per read
    y_train = np.asarray(y_train)[0]
    kw = dict(learning_rate=learning_rate, l2=l2)

    # On an accelerator the next read runs while the device computes, each into a new array.
    # On CPU the steps use every core, and a read alongside them slowed a capped epoch (768
    # wide, 2 cores) to 2.3 s from 1.7 s with the read after them, so the read waits for them
    # and then reuses one buffer per side (`_read_buffers`): the steps that used it are done.
    overlap = jax.default_backend() != "cpu"
    buffers = (
        [None] * len(rows)
        if overlap
        else _read_buffers(rows, min(per_read, num_batches) * batch_size)
    )

    def reads():
        """`(epoch, last read of the epoch, inputs, y)` for every read of every epoch."""
        order = None
        for epoch in range(max_epochs):
            if batch_size == n:
                idx = np.arange(n)
            else:
                if epoch % per_pass == 0:
                    order = np.asarray(_permutation(key, epoch, per_pass, n))
                start = (epoch % per_pass) * epoch_size
                idx = order[start : start + epoch_size]
            for lo in range(0, num_batches, per_read):
                at = idx[lo * batch_size : min(lo + per_read, num_batches) * batch_size]
                inputs, where = [], []
                for r, buffer in zip(rows, buffers):
                    x, read_order = r.read(at, buffer)
                    inverse = np.empty(len(at), np.int32)
                    inverse[read_order] = np.arange(len(at), dtype=np.int32)
                    inputs.append(x)
                    where.append(inverse.reshape(-1, batch_size))
                y = y_train[at].reshape(-1, 1, batch_size)
                yield epoch, lo + per_read >= num_batches, (tuple(inputs), tuple(where)), y

    s = _loop_start(weights, optax.adam(learning_rate), max_epochs)
    w, state = s["w"], s["state"]
    feed = reads()
    ahead = next(feed, None)
    while ahead is not None:
        epoch, last, inputs, y = ahead
        w, state = _streamed_steps(
            w, state, *inputs, y, means, stds, **kw, logits_fn=_bilinear_logits
        )
        if not overlap:
            jax.block_until_ready(w)
        ahead = next(feed, None)  # on an accelerator: read while the steps above run
        if last:
            s = _streamed_check(
                s, w, state, dev, y_dev, **kw, logits_fn=_bilinear_logits, patience=patience
            )
            if not bool(jnp.any(s["active"])):
                break
    return _loop_end(s)


def _bilinear_start(key, num_probes, d, rank, num_classes):
    """`(weights, order key)`: the same initialisation for every probe, and the key of the
    minibatch order."""
    k_i, k_j, k_c, k_order = jax.random.split(key, 4)
    # Unit-variance projections of standardised inputs keep the initial logits O(1).
    one = {
        "w_i": jax.random.normal(k_i, (d, rank)) / np.sqrt(d),
        "w_j": jax.random.normal(k_j, (d, rank)) / np.sqrt(d),
        "w_cls": jax.random.normal(k_c, (rank, num_classes)) / np.sqrt(rank),
        "b": jnp.zeros((num_classes,)),
    }
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (num_probes,) + v.shape), one), k_order


def _stopping_dev(key, m, stopping_dev_items):
    """Sorted indices of the dev items early stopping scores (None: all `m`)."""
    if not stopping_dev_items or m <= stopping_dev_items:
        return None
    # Its own key: the initialisation and minibatch order stay those of an uncapped fit.
    pick = jax.random.permutation(jax.random.fold_in(key, _STOPPING_DEV_SALT), m)
    return jnp.sort(pick[:stopping_dev_items])


def fit_bilinear(
    e_i_train,
    e_j_train,
    y_train,
    e_i_dev,
    e_j_dev,
    y_dev,
    num_classes: int,
    key,
    *,
    rank: Optional[int] = None,
    l2: float = 1e-5,
    learning_rate: float = 1e-3,
    max_epochs: int = 50,
    patience: int = 5,
    batch_size: int = 256,
    epoch_items: Optional[int] = EPOCH_ITEMS,
    stopping_dev_items: Optional[int] = STOPPING_DEV_ITEMS,
) -> BilinearProbe:
    """Trains `P` layer-wise embedding probers of Eq. 4 with minibatch Adam and early stopping.

    `p(c|i,j) ∝ exp(w_cᵀ (W_w ê_i ⊙ W_μ ê_j) + b_c)`, ê the train-standardised embeddings,
    `W_w, W_μ ∈ R^{D×D'}` (paper: D = D' = 768), `w_c ∈ R^{D'}` per class.

    Args:
      e_i_train, e_j_train: `[P, N, D]` embeddings of the pair's two members at each layer (a
        phrase is the mean of its word pieces); y_train: `[N]` or `[P, N]`.
      e_i_dev, e_j_dev: `[P, M, D]`; y_dev: `[M]` or `[P, M]`.
      key: draws the initialisation (the same for every probe) and the minibatch order.
      rank: D' (default D); a smaller rank gives a low-rank bilinear form.
      l2: penalty `l2/2 (||W_w||² + ||W_μ||² + ||w||²)` added to the mean cross-entropy.
      epoch_items: an epoch (the unit of `max_epochs`, `patience` and the dev checks) is
        `min(N, epoch_items)` train items: the next ones of a permutation of the train set, so
        that `N // epoch_items` epochs see every item once before a new permutation; None:
        always all N. With a large train set a full pass would hold thousands of
        steps between two dev checks, and `patience` epochs of them would dwarf the training
        that found the best epoch. Below the cap nothing changes.
      stopping_dev_items: early stopping scores at most this many dev items (one seeded subset
        for the whole fit); None: all M. The dev accuracy reported by `train_prober` is always
        computed on the whole dev split.
    """
    for name, value in (("epoch_items", epoch_items), ("stopping_dev_items", stopping_dev_items)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be None (no cap) or >= 1, got {value}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    streamed = isinstance(e_i_train, CollectedRows)
    inputs = (e_i_train, e_j_train, e_i_dev, e_j_dev)
    if streamed and not all(isinstance(x, CollectedRows) for x in inputs):
        raise ValueError("streamed fits take CollectedRows for all four of e_i/e_j train/dev")
    if not streamed:
        inputs = tuple(_features(x, name) for x, name in zip(inputs, _BILINEAR_INPUTS))
    e_i_train, e_j_train, e_i_dev, e_j_dev = inputs
    num_probes, n, d = e_i_train.shape
    if (
        e_j_train.shape != e_i_train.shape
        or e_j_dev.shape != e_i_dev.shape
        or e_i_dev.shape[::2] != (num_probes, d)
    ):
        raise ValueError(
            f"embeddings must be [P, N, D] with matching P, D and e_i/e_j pairing; "
            f"got train {e_i_train.shape} / {e_j_train.shape}, "
            f"dev {e_i_dev.shape} / {e_j_dev.shape}"
        )
    y_train = _labels(y_train, num_probes, n, num_classes, "y_train")
    y_dev = _labels(y_dev, num_probes, e_i_dev.shape[1], num_classes, "y_dev")
    weights, k_order = _bilinear_start(key, num_probes, d, rank or d, num_classes)
    batch_size = min(batch_size, n)
    keep = _stopping_dev(key, e_i_dev.shape[1], stopping_dev_items)
    if keep is not None:
        y_dev = y_dev[:, keep]
    train = dict(
        max_epochs=max_epochs,
        patience=patience,
        batch_size=batch_size,
        steps_per_epoch=max(1, epoch_items // batch_size) if epoch_items else None,
    )
    if streamed:
        (mean_i, std_i), (mean_j, std_j) = (_row_stats(r, STREAM_ROWS) for r in inputs[:2])
        dev_at = np.arange(e_i_dev.shape[1]) if keep is None else np.asarray(keep)
        dev = (
            _standardise(e_i_dev.take(dev_at)[None], mean_i, std_i),
            _standardise(e_j_dev.take(dev_at)[None], mean_j, std_j),
        )
        weights, record = _fit_bilinear_streamed(
            weights, inputs[:2], y_train, dev, y_dev, (mean_i, mean_j), (std_i, std_j),
            k_order, learning_rate, l2, **train,
        )  # fmt: skip
    else:
        mean_i, std_i = _stats(e_i_train)
        mean_j, std_j = _stats(e_j_train)
        if keep is not None:
            e_i_dev, e_j_dev = e_i_dev[:, keep], e_j_dev[:, keep]
        weights, record = _train(
            weights,
            (_standardise(e_i_train, mean_i, std_i), _standardise(e_j_train, mean_j, std_j)),
            y_train,
            (_standardise(e_i_dev, mean_i, std_i), _standardise(e_j_dev, mean_j, std_j)),
            y_dev,
            k_order,
            learning_rate,
            l2,
            logits_fn=_bilinear_logits,
            **train,
        )
    return BilinearProbe(
        weights=weights, mean_i=mean_i, std_i=std_i, mean_j=mean_j, std_j=std_j, record=record
    )


@functools.partial(jax.jit, static_argnames="logits_fn")
def _correct(weights, inputs, y, logits_fn):
    return _over_probes(
        lambda w, inp, t: jnp.sum(jnp.argmax(logits_fn(w, *inp), -1) == t), y.shape[0]
    )(weights, inputs, y)


def evaluate_bilinear(probe: BilinearProbe, e_i, e_j, y):
    """Accuracy `[P]` of each Eq. 4 probe on `e_i, e_j [P, N, D]`, `y [N] or [P, N]`; or of
    one probe on `CollectedRows`, read `STREAM_ROWS` at a time."""
    if isinstance(e_i, CollectedRows):
        y = np.asarray(_labels(y, 1, len(e_i), probe.weights["b"].shape[-1], "y"))
        correct = 0
        b_i, b_j = _read_buffers((e_i, e_j), min(STREAM_ROWS, len(e_i)))
        for at, x_i in e_i.chunks(STREAM_ROWS, b_i):  # each chunk is scored before the next
            x_j, order = e_j.read(at, b_j)  # a pair's sides share their index: order 0, 1, ..
            if np.any(order != np.arange(len(at))):
                x_j = x_j[np.argsort(order)]
            inputs = (
                _standardise(x_i[None], probe.mean_i, probe.std_i),
                _standardise(x_j[None], probe.mean_j, probe.std_j),
            )
            correct += int(_correct(probe.weights, inputs, y[:, at], _bilinear_logits)[0])
        return np.array([correct / max(len(e_i), 1)])
    e_i, e_j = _features(e_i, "e_i"), _features(e_j, "e_j")
    y = _labels(y, *e_i.shape[:2], probe.weights["b"].shape[-1], "y")
    inputs = (
        _standardise(e_i, probe.mean_i, probe.std_i),
        _standardise(e_j, probe.mean_j, probe.std_j),
    )
    return _accuracy(probe.weights, inputs, y, _bilinear_logits)
