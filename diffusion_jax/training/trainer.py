"""`train_and_evaluate(config, workdir)`: the training loop.

Resumes automatically from the newest readable checkpoint in `workdir` (state and data
iterator); SIGTERM saves a checkpoint and raises `Preempted`; a non-finite loss or gradient
raises `NonFiniteError` naming the step and leaves the last good checkpoint as the newest.
Host 0 writes `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`), a progress line and
sample grids `samples/step_<N>.png` drawn with EMA params by the fused sampler; every host
computes.

References: the Flax examples and big_vision train loops; Ho et al. 2020 (EMA samples).
"""
from typing import Any
import json
from absl import logging
import signal
import threading
import time

import jax
import numpy as np
from etils import epath

from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import components
from diffusion_jax.training import parallel
from diffusion_jax.training import sampling
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib

PyTree = Any


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf; training stopped without saving that state."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was written before this was raised."""


def check_batch_size(batch_size: int, num_devices: int) -> int:
  """Per-device batch; ValueError unless `batch_size` is a positive multiple of `num_devices`."""
  if batch_size <= 0 or batch_size % num_devices:
    raise ValueError(f"config.train.batch_size={batch_size} must be a positive multiple of the "
                     f"number of devices ({num_devices}: {jax.process_count()} process(es) x "
                     f"{jax.local_device_count()} local devices); e.g. "
                     f"{max(num_devices, batch_size // num_devices * num_devices)}.")
  return batch_size // num_devices


class _SigtermFlag:
  """Sets a flag on SIGTERM (installed only from the main thread); restores the old handler."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def any_host(self) -> bool:
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.raised))))


class _Logger:
  """Host-0 metrics sink: metrics.jsonl, TensorBoard, progress line."""

  def __init__(self, workdir: epath.Path, num_steps: int, batch_size: int, active: bool):
    self.active = active
    self.num_steps, self.batch_size = num_steps, batch_size
    self._sums: dict[str, float] = {}
    self._count = 0
    self._t0 = time.perf_counter()
    self._s0: int | None = None
    if active:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(workdir / "tb"))
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

  def add(self, metrics: dict[str, np.ndarray]) -> None:
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(np.sum(v))
    self._count += int(np.size(next(iter(metrics.values()))))

  def start(self, step: int) -> None:
    self._s0, self._t0 = step, time.perf_counter()

  def flush(self, step: int) -> None:
    if not self._count:
      return
    means = {k: v / self._count for k, v in self._sums.items()}
    dt = time.perf_counter() - self._t0
    done = step - (self._s0 if self._s0 is not None else step)
    sps = done / dt if dt > 0 and done > 0 else float("nan")
    means.update(steps_per_sec=sps, images_per_sec=sps * self.batch_size)
    self._sums, self._count = {}, 0
    self.start(step)
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in means.items()}}) + "\n")
    self._jsonl.flush()
    for k, v in means.items():
      self._tb.add_scalar(f"train/{k}", v, step)
    self._tb.flush()
    eta = (self.num_steps - step) / sps if sps == sps and sps > 0 else float("nan")
    logging.info("step %d/%d | %.2f steps/s | %.1f images/s | loss %.5f | grad_norm %.3f | "
                 "lr %.3g | ETA %s", step, self.num_steps, sps, sps * self.batch_size,
                 means["loss"], means["grad_norm"], means["lr"], _fmt_eta(eta))

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


def _fmt_eta(seconds: float) -> str:
  if seconds != seconds:
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


def _stack(batches: list[dict]) -> dict:
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in ("image", "label")}


def train_and_evaluate(config: Any, workdir: str) -> state_lib.TrainState:
  """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns the final
  host state (numpy leaves).

  Raises:
    ValueError: a bad static setting (batch size not divisible by the devices, ...).
    NonFiniteError: the loss or a gradient became non-finite (message names the step).
    Preempted: SIGTERM arrived; a checkpoint was written first.
  """
  from diffusion_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  host0 = jax.process_index() == 0
  train_cfg = config.train
  num_steps = int(train_cfg.num_steps)
  batch_size = int(train_cfg.batch_size)
  k = int(train_cfg.steps_per_call)
  per_device = check_batch_size(batch_size, jax.device_count())
  every = {name: int(train_cfg[name])
           for name in ("checkpoint_every", "log_every", "sample_every")}
  for name, v in list(every.items()) + [("num_steps", num_steps)]:
    if v % k:
      raise ValueError(f"config.train.{name}={v} must be a multiple of "
                       f"config.train.steps_per_call={k}")

  info = data_lib.get_dataset_info(config.data)
  comp = components.build(config, tuple(info.image_shape))
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, train_rng, sample_rng = jax.random.split(rng, 3)
  state = components.init_state(config, comp, init_rng)

  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints",
                               keep_latest=int(train_cfg.keep_latest),
                               snapshot_every=int(train_cfg.snapshot_every))
  it = data_lib.make_train_iterator(
      config.data, global_batch_size=batch_size, seed=int(config.seed),
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_local_devices=jax.local_device_count())
  restored = ckpt.restore(state)
  last_saved = None
  if restored is not None:
    last_saved, state, data_state = restored
    if data_state:
      it.set_state(data_state)
    logging.info("Resumed from %s at step %d.", ckpt.directory, last_saved)
  if host0:
    (workdir / "dataset_info.json").write_text(json.dumps(
        {"image_shape": list(comp.image_shape), "num_classes": int(info.num_classes)}))
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2)
                                         if hasattr(config, "to_json_best_effort")
                                         else json.dumps(dict(config), indent=2, default=str))

  step_cfg = step_lib.StepConfig(
      num_classes=comp.num_classes,
      label_dropout=float(train_cfg.label_dropout) if comp.num_classes else 0.0,
      compute_dtype=train_cfg.compute_dtype,
      accumulate=int(config.optim.accumulate), process_count=jax.process_count())
  mode = parallel.resolve_mode(train_cfg.parallel)
  step_fn = step_lib.make_train_step(comp.model.apply, components.make_loss_fn(
      config.diffusion, comp.schedule), comp.tx, comp.lr_fn, step_cfg,
      axis_name=None if mode == "jit" else parallel.AXIS)
  pstep = parallel.make_parallel_step(step_fn, mode, steps_per_call=k)
  num_samples = int(config.sample.num_samples)
  sample_fn = _make_sample_fn(config, comp) if host0 and num_samples > 0 else None

  step = int(state.step)
  dstate = pstep.put_state(state)
  logger = _Logger(workdir, num_steps, batch_size, host0)
  logger.start(step)
  log_every = every["log_every"] or max(k, num_steps // 100 // k * k)

  def check(metrics: dict, end_step: int) -> None:
    metrics = jax.tree.map(lambda m: np.asarray(m).reshape(-1), pstep.get_state(metrics))  # [k]
    bad = np.flatnonzero(metrics["nonfinite"] > 0)
    if bad.size:
      at = end_step - metrics["nonfinite"].size + int(bad[0]) + 1
      where = f"step {last_saved}" if last_saved is not None else "none"
      raise NonFiniteError(
          f"Non-finite loss or gradient at step {at} (loss={metrics['loss'][bad[0]]}, "
          f"grad_norm={metrics['grad_norm'][bad[0]]}); training stopped. The last good "
          f"checkpoint is kept: {where} in {ckpt.directory}.")
    logger.add(metrics)

  pending = None
  first_call = True
  try:
    with _SigtermFlag() as sigterm:
      while step < num_steps:
        host_batch = pstep.prepare_batch(_stack([next(it) for _ in range(k)]))
        if pending is not None:   # the previous call ran while the host read data
          check(*pending)
          pending = None
        t_call = time.perf_counter()
        dstate, metrics = pstep.step(dstate, host_batch, train_rng)
        step += k
        if first_call:   # exclude compilation from the steps/s figures
          jax.block_until_ready(metrics)
          logging.info("First call (compile + %d step(s)) took %.1f s.", k,
                       time.perf_counter() - t_call)
          first_call = False
          logger.start(step)
        pending = (metrics, step)
        at = lambda n: n > 0 and step % n == 0
        preempt = sigterm.any_host()
        if at(every["checkpoint_every"]) or at(every["sample_every"]) or at(log_every) \
            or step == num_steps or preempt:
          check(*pending)
          pending = None
          if at(log_every) or step == num_steps or preempt:
            logger.flush(step)
          if at(every["checkpoint_every"]) or step == num_steps or preempt:
            ckpt.save(step, pstep.get_state(dstate), it.get_state())
            last_saved = step
          if sample_fn is not None and (at(every["sample_every"]) or step == num_steps):
            _write_samples(sample_fn, config, comp, pstep.get_state(dstate),
                           jax.random.fold_in(sample_rng, step), workdir, step)
          if preempt:
            ckpt.wait()
            raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in {ckpt.directory}.")
  finally:
    ckpt.close()
    logger.close()
  return pstep.get_state(dstate)


def _ema_for_samples(config: Any, state: state_lib.TrainState) -> PyTree:
  key = config.sample.ema_decay
  if key is None:
    decays = tuple(config.train.ema_decays)
    return state.ema_params[state_lib.ema_key(decays[0])] if decays else state.params
  return state.ema_params[state_lib.ema_key(float(key))]


def _make_sample_fn(config: Any, comp: components.Components):
  num = int(config.sample.num_samples)
  labels = sampling.default_labels(num, comp.num_classes)

  @jax.jit
  def sample_fn(params, rng):
    return sampling.generate(config, comp.model, comp.schedule, params, rng, num,
                             comp.image_shape, labels)
  return sample_fn


def _write_samples(sample_fn, config, comp, host_state, rng, workdir, step) -> None:
  t0 = time.perf_counter()
  images = sampling.to_uint8(sample_fn(_ema_for_samples(config, host_state), rng))
  (workdir / "samples").mkdir(exist_ok=True)
  path = workdir / "samples" / f"step_{step:07d}.png"
  sampling.save_grid(images, str(path))
  logging.info("Wrote %d samples to %s (%.1f s).", images.shape[0], path, time.perf_counter() - t0)
