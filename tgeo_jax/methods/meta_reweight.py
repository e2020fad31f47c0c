"""The bilevel machinery for a learned per-sample fusion ratio α (TGeo-KD, RW-KD; docs/methods.md §2 and §7).

    L_train(θ; φ) = mean_i [α_i τ² KL_τ(t_i‖s_i) + (1 − α_i) CE(s_i, y_i)],   α_i = weight_fn(φ, context_i)

φ minimises the validation CE after the student's own optimizer steps, updated by its own optax optimizer.
The hypergradient (``<group>.hypergrad``, docs/methods.md §7):

* ``one_step`` (default): the exact one-step lookahead (``bilevel.one_step``).
* ``unroll``: K = ``<group>.unroll_steps`` consecutive real batches. The K steps are the student's real steps, taken
  one per ``train_step`` with φ fixed; each records (θ_k, rest_k, optimizer state, batch) in ``state["window"]``,
  and the K-th step differentiates L_val(θ_K) through all K of them (``bilevel.unroll_from_trajectory``: a reverse
  scan with per-step recomputation), then updates φ once. Memory: K × (θ + optimizer state + batch) in the state.
* ``implicit``: the implicit-function hypergradient at θ (Neumann or CG, ``bilevel.implicit``); a heuristic
  away from a stationary point, its solve residual is a training metric.
* ``head_only``: the one-step lookahead restricted to the classifier head (``bilevel.head_only``): cheap, exact
  for a linear student.

Orderings (``<group>.ordering``, one_step / implicit / head_only):
* ``reuse`` (default, cheaper): the hypergradient's step with α(φ_t) *is* the student's real step; φ is then
  updated.
* ``lookahead`` (Meta-Weight-Net): hypergradient with α(φ_t), update φ, then the real student step with α(φ_{t+1}).
``<group>.meta_interval`` m: φ is updated every m student steps (the other steps are plain fused steps with α(φ)).
With ``unroll`` the cycle is m windows: a window of K recorded steps ends with the φ update, then (m − 1)·K plain
steps follow.

``MetaReweightKD`` holds the bilevel machinery for any learned per-sample α (RW-KD in ``reweight.py`` reuses it).
Its weighting function is ``weight_fn(meta_params, context) -> α [N]``; the context carries the student's logits
(stop-gradient), the teacher's logits, the labels, the example indices and what ``context`` adds (TGeo-KD: the
relation features), so a subclass with another weighting network overrides ``init_meta`` and ``weight_fn`` only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tgeo_jax import alpha_report, bilevel, losses
from tgeo_jax.config_checks import nonnegative_int, positive_int, positive_number, require
from tgeo_jax.errors import UserError
from tgeo_jax.methods import base

__all__ = ["HYPERGRADS", "make_meta_optimizer", "meta_defaults", "MetaReweightKD"]

HYPERGRADS = ("one_step", "unroll", "implicit", "head_only")



def make_meta_optimizer(cfg) -> optax.GradientTransformation:
  """The fusion net's own optimizer: Adam(W) at ``fusion_lr`` (optionally clipped)."""
  parts = [optax.clip_by_global_norm(cfg.fusion_clip_norm)] if cfg.fusion_clip_norm else []
  parts.append(optax.adamw(cfg.fusion_lr, weight_decay=cfg.fusion_weight_decay))
  return optax.chain(*parts)


def meta_defaults():
  """Bilevel settings shared by TGeo-KD and RW-KD (docs/methods.md §2 and §7)."""
  m = ml_collections.ConfigDict()
  m.temperature = 4.0
  m.fusion_lr = 1e-3  # the meta-parameters' own Adam(W)
  m.fusion_weight_decay = 0.0
  m.fusion_clip_norm = 0.0
  m.hypergrad = "one_step"  # one_step | unroll | implicit | head_only
  m.ordering = "reuse"  # reuse: the hypergradient's step is the real step | lookahead: Meta-Weight-Net order
  m.meta_interval = 1  # update the meta-parameters every m student steps (unroll: every m windows)
  m.unroll_steps = 1  # K consecutive real batches per window (hypergrad='unroll')
  # neumann (a damped truncated series: J + 1 SGD steps unrolled from a stationary point) | cg (an exact solve,
  # which needs the damped Hessian positive definite: mid-training it often is not, and CG then fails to converge).
  m.implicit_solver = "neumann"
  m.implicit_terms = 10  # J: Neumann terms beyond the first, or CG iterations
  m.implicit_lr = 0.1  # η of the Neumann series (the student's learning rate is the natural choice)
  m.implicit_damping = 0.01  # λ > 0 added to the Hessian (mid-training it is not positive definite)
  m.implicit_tol = 1e-2  # relative residual below which the solve counts as converged
  m.val_bn_mode = "train"  # BatchNorm mode of the validation forward at the lookahead parameters
  m.analysis_examples = 5000  # α-by-group analytics each epoch over this many training examples (0 = off)
  return m


class MetaReweightKD(base.Method):
  """Fused KD/CE with α from meta-parameters φ learned on the validation split by a hypergradient.

  Subclasses define ``init_meta()`` -> φ and ``weight_fn(meta_params, context)`` -> α [N] (and may extend
  ``context``).
  """

  uses_validation_batch = True
  config_group = "tgeo"

  @classmethod
  def validate_config(cls, config):
    g = cls.config_group
    cfg = config[g]
    positive_number(config, f"{g}.temperature")
    positive_number(config, f"{g}.fusion_lr")
    positive_int(config, f"{g}.meta_interval")
    positive_int(config, f"{g}.unroll_steps")
    require(config, f"{g}.hypergrad", lambda v: v in HYPERGRADS, f"one of {list(HYPERGRADS)}")
    require(config, f"{g}.ordering", lambda v: v in ("reuse", "lookahead"), "'reuse' or 'lookahead'")
    require(config, f"{g}.val_bn_mode", lambda v: v in ("train", "eval"), "'train' or 'eval'")
    if cfg.unroll_steps > 1 and cfg.hypergrad != "unroll":
      raise UserError(f"{g}.unroll_steps: a window of {cfg.unroll_steps} steps is used by {g}.hypergrad='unroll' "
                      f"only (got {g}.hypergrad={cfg.hypergrad!r})")
    if cfg.hypergrad == "unroll" and config.get("nonfinite") == "skip":
      # A skipped step leaves the state's step (and so the window slot it writes) behind the host's step count,
      # which decides where a window starts and ends: the sweep would mix the batches of other steps.
      raise UserError(f"nonfinite: 'skip' cannot be combined with {g}.hypergrad='unroll' (a skipped step would leave "
                      "the unroll window's recorded steps out of line with the host's); use nonfinite='stop'")
    if cfg.hypergrad == "unroll" and cfg.ordering != "reuse":
      raise UserError(f"{g}.ordering: {g}.hypergrad='unroll' takes the window's steps as the student's real steps; "
                      f"it needs {g}.ordering='reuse', got {cfg.ordering!r}")
    require(config, f"{g}.implicit_solver", lambda v: v in bilevel.SOLVERS, f"one of {list(bilevel.SOLVERS)}")
    nonnegative_int(config, f"{g}.implicit_terms")
    if cfg.implicit_solver == "cg" and cfg.implicit_terms < 1:
      raise UserError(f"{g}.implicit_terms: CG needs at least 1 iteration, got {cfg.implicit_terms}")
    positive_number(config, f"{g}.implicit_lr")
    positive_number(config, f"{g}.implicit_damping")
    positive_number(config, f"{g}.implicit_tol")

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.cfg = cfg = self.config[self.config_group]
    self.meta_tx = make_meta_optimizer(cfg)
    # The hypergradient: ``(weight_fn, meta_params, per_sample_fn, batch, val_loss_fn, val_batch, student, tx) ->
    # bilevel.HypergradResult``. An injection point: e.g. bilevel.one_step_autodiff, the nested jax.grad
    # reference, in bench/step_cost.py. (``unroll`` is a window of steps; it does not go through it.)
    self.hypergrad = {
        "one_step": bilevel.one_step,
        "unroll": None,
        "implicit": functools.partial(bilevel.implicit, solver=cfg.implicit_solver, terms=int(cfg.implicit_terms),
                                      neumann_lr=float(cfg.implicit_lr), damping=float(cfg.implicit_damping),
                                      tol=float(cfg.implicit_tol)),
        "head_only": bilevel.head_only,
    }[cfg.hypergrad]
    self.window_steps = int(cfg.unroll_steps) if cfg.hypergrad == "unroll" else 0
    if self.window_steps and self.task is not None and self.window_steps > self.steps_per_epoch:
      raise UserError(f"{self.config_group}.unroll_steps: a window of {self.window_steps} steps is longer than "
                      f"an epoch ({self.steps_per_epoch} steps of batch_size {self.config.batch_size})")

  # ---- to define
  def init_meta(self):
    raise NotImplementedError

  def weight_fn(self, meta_params, context: dict) -> jax.Array:
    """``α [N]`` in (0, 1) from φ and the context (see ``context``)."""
    raise NotImplementedError

  def context(self, frozen, batch, student_logits) -> dict:
    """What ``weight_fn`` sees: ``student_logits`` [N, K] (stop-gradient), ``teacher_logits`` [N, K], ``labels``
    [N] and ``index`` [N] (training-part positions); subclasses add what they compute from them."""
    del frozen
    return {"student_logits": jax.lax.stop_gradient(student_logits), "teacher_logits": batch["teacher_logits"],
            "labels": batch["labels"], "index": batch["index"]}

  def alpha(self, meta_params, frozen, batch, student_logits, teacher_logits):
    """``α [N]`` for a batch (``labels``, ``index``) at given student and teacher logits (analysis helper)."""
    batch = dict(batch, teacher_logits=teacher_logits)
    return self.weight_fn(meta_params, self.context(frozen, batch, student_logits))

  # ---- the bilevel pieces
  def per_sample_fn(self, frozen):
    """``(params, rest, batch) -> ((soft [N], hard [N]), (new_rest, context))`` on a step batch (``inputs``,
    ``labels``, ``index``, ``teacher_logits``): one train-mode forward of the student."""
    tau = self.cfg.temperature

    def per_sample(params, rest, batch):
      logits, new_rest = self.student_forward(params, rest, batch["inputs"])
      soft = losses.kd_loss(logits, batch["teacher_logits"], temperature=tau)
      hard = losses.cross_entropy(logits, batch["labels"])
      return (soft, hard), (new_rest, self.context(frozen, batch, logits))

    return per_sample

  def val_loss_fn(self, params, rest, val_batch):
    """The meta-objective: mean validation CE of the student (BatchNorm mode ``val_bn_mode``)."""
    logits, _ = self.student_forward(params, rest, val_batch["inputs"], train=self.cfg.val_bn_mode == "train")
    return jnp.mean(losses.cross_entropy(logits, val_batch["labels"]))

  def step_batch(self, state, frozen, batch) -> dict:
    """The training batch ``per_sample_fn`` reads: inputs, labels, index and the teacher's logits."""
    return {"inputs": batch["inputs"], "labels": batch["labels"], "index": batch["index"],
            "teacher_logits": self.batch_teacher_logits(state, frozen, batch)}

  # ---- interface
  def init(self, rng):
    state, frozen = super().init(rng)
    meta = self.init_meta()
    state["meta_params"] = meta
    state["meta_opt_state"] = self.meta_tx.init(meta)
    if self.window_steps:
      state["window"] = self._empty_window(state, frozen)
    return state, frozen

  def _empty_window(self, state, frozen):
    """Zeros for K recorded steps: the student state before each step and its step batch (global batch)."""
    source = self.task.train
    sample = source.gather(np.arange(self.config.batch_size) % len(source))
    host = {"inputs": sample, "labels": np.zeros(self.config.batch_size, np.int32),
            "index": np.zeros(self.config.batch_size, np.int32)}
    shapes = jax.eval_shape(lambda b: self.step_batch(state, frozen, b), jax.tree.map(jnp.asarray, host))
    k = self.window_steps
    stack = lambda x: jnp.zeros((k, *jnp.shape(x)), jnp.result_type(x))  # noqa: E731
    # Plain dicts (not StudentState): the window is checkpointed with the rest of the state.
    return {"trajectory": jax.tree.map(stack, self._student(state)._asdict()),
            "batches": jax.tree.map(stack, shapes)}

  def step_kind(self, step: int) -> str:
    m = self.cfg.meta_interval
    if self.window_steps:
      position = step % (m * self.window_steps)
      if position < self.window_steps - 1:
        return "record"
      return "window_end" if position == self.window_steps - 1 else "plain"
    return "meta" if step % m == 0 else "plain"

  @staticmethod
  def _student(state) -> bilevel.StudentState:
    return bilevel.StudentState(state["params"], state["rest"], state["opt_state"])

  @staticmethod
  def _with_student(state, student: bilevel.StudentState, **updates) -> dict:
    return dict(state, params=student.params, rest=student.rest, opt_state=student.opt_state,
                step=state["step"] + 1, **updates)

  def train_step(self, state, frozen, batch, kind="meta"):
    b = self.step_batch(state, frozen, batch)
    per_sample = self.per_sample_fn(frozen)
    student = self._student(state)
    if kind == "plain":
      return self._plain_step(state, student, per_sample, b)
    if kind in ("record", "window_end"):
      return self._window_step(state, student, per_sample, b, batch, last=kind == "window_end")
    result = self.hypergrad(self.weight_fn, state["meta_params"], per_sample, b, self.val_loss_fn, batch["val"],
                            student, self.tx)
    state, meta_metrics = self._meta_update(state, result.meta_grad, result.diagnostics)
    if self.cfg.ordering == "lookahead":
      return self._plain_step(state, student, per_sample, b, meta_metrics)
    d = result.diagnostics
    return self._with_student(state, result.student), self._metrics(d["train_loss"], d["student_logits"],
                                                                    b["labels"], d["alpha"], meta_metrics)

  def _meta_update(self, state, meta_grad, diagnostics):
    updates, meta_opt_state = self.meta_tx.update(meta_grad, state["meta_opt_state"], state["meta_params"])
    meta_params = optax.apply_updates(state["meta_params"], updates)
    meta_metrics = {"val_loss": diagnostics["val_loss"], "meta_grad_norm": optax.tree.norm(meta_grad)}
    if "solve_residual" in diagnostics:
      meta_metrics.update(solve_residual=diagnostics["solve_residual"],
                          solve_converged=diagnostics["solve_converged"].astype(jnp.float32),
                          solve_contracting=diagnostics["solve_contracting"].astype(jnp.float32))
    return dict(state, meta_params=meta_params, meta_opt_state=meta_opt_state), meta_metrics

  def _plain_step(self, state, student, per_sample, b, meta_metrics=None):
    """A real student step on the fused loss with α(φ) a constant (φ from ``state``)."""
    meta = jax.lax.stop_gradient(state["meta_params"])
    new_student, (loss, alpha, logits) = bilevel.weighted_step(self.weight_fn, meta, per_sample, b, student,
                                                                self.tx)
    return self._with_student(state, new_student), self._metrics(loss, logits, b["labels"], alpha, meta_metrics)

  def _window_step(self, state, student, per_sample, b, batch, *, last: bool):
    """A real step of an unroll window: records (θ_k, rest_k, optimizer state, batch) at position k, and after
    the last step of the window updates φ by reverse mode through the K recorded steps."""
    k = (state["step"] % (self.cfg.meta_interval * self.window_steps)).astype(jnp.int32)
    write = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, jnp.asarray(x, buf.dtype), k, 0)  # noqa: E731
    window = {"trajectory": jax.tree.map(write, state["window"]["trajectory"], student._asdict()),
              "batches": jax.tree.map(write, state["window"]["batches"], b)}
    meta = jax.lax.stop_gradient(state["meta_params"])
    new_student, (loss, alpha, logits) = bilevel.weighted_step(self.weight_fn, meta, per_sample, b, student,
                                                                self.tx)
    meta_metrics = None
    state = dict(state, window=window)
    if last:
      meta_grad, val_loss = bilevel.unroll_from_trajectory(
          self.weight_fn, state["meta_params"], per_sample, window["batches"],
          bilevel.StudentState(**window["trajectory"]), new_student, self.val_loss_fn, batch["val"], self.tx)
      state, meta_metrics = self._meta_update(state, meta_grad, {"val_loss": val_loss})
    return self._with_student(state, new_student), self._metrics(loss, logits, b["labels"], alpha, meta_metrics)

  def epoch_report(self, state, frozen, workdir, epoch):
    """α by group over (up to ``analysis_examples`` of) the training examples; see ``alpha_report``."""
    if not self.cfg.analysis_examples:
      return super().epoch_report(state, frozen, workdir, epoch)
    source = self.task.train
    n = min(len(source), self.cfg.analysis_examples)
    # A fixed, seed-independent sample so epochs (and runs) are compared on the same examples; outliers kept.
    indices = np.sort(np.random.default_rng(0).permutation(len(source))[:n])
    outliers = self.task.outlier_mask
    if outliers is not None:
      indices = np.union1d(indices, np.flatnonzero(outliers))
    if not hasattr(self, "_alpha_fn"):
      def alpha_fn(state, frozen, inputs, labels, index):
        logits = self.predict(state, frozen, inputs)
        batch = {"inputs": inputs, "labels": labels, "index": index}
        # From the cached table when there is one (the indices are training-split positions): the analytics
        # then cost no teacher forward.
        teacher_logits = self.batch_teacher_logits(state, frozen, batch)
        alpha = self.alpha(state["meta_params"], frozen, batch, logits, teacher_logits)
        s, t = jax.nn.softmax(logits), jax.nn.softmax(teacher_logits)
        p_label = jnp.take_along_axis(t, labels[:, None], axis=-1)[:, 0]
        return alpha, jnp.argmax(teacher_logits, -1) == labels, jnp.sum((t - s) ** 2, -1), p_label
      self._alpha_fn = jax.jit(alpha_fn)
    parts = []
    for start in range(0, len(indices), 1000):
      idx = indices[start:start + 1000]
      parts.append(jax.device_get(self._alpha_fn(state, frozen, source.gather(idx), source.labels[idx],
                                                 idx.astype(np.int32))))
    alpha, teacher_correct, gap, p_label = (np.concatenate(x) for x in zip(*parts))
    shift = self.study_teacher_shift
    summary = alpha_report.write(workdir, epoch, int(state["step"]), alpha, teacher_correct, gap,
                                 None if outliers is None else outliers[indices],
                                 None if shift is None else shift[indices] > 0, p_label)
    super().epoch_report(state, frozen, workdir, epoch)
    return {k: v for k, v in summary.items() if k.startswith(("alpha_", "auc_"))}

  def _metrics(self, loss, logits, labels, alpha, meta_metrics):
    # Every step kind returns the same metrics so the trainer can average them; a step without a φ update
    # reports zeros for the meta quantities (with meta_interval m their logged averages are scaled by 1/m).
    zero = jnp.zeros((), jnp.float32)
    names = ["val_loss", "meta_grad_norm"] + (["solve_residual", "solve_converged", "solve_contracting"]
                                              if self.cfg.hypergrad == "implicit" else [])
    meta_metrics = {name: (meta_metrics or {}).get(name, zero) for name in names}
    return {"loss": loss, "accuracy": base.batch_accuracy(logits, labels), "alpha_mean": jnp.mean(alpha),
            "alpha_std": jnp.std(alpha), **meta_metrics}


