"""`train_and_evaluate(config, workdir)`: the training loop.

A launch on a workdir, in order:
1. host 0 takes `<workdir>/.lock` (a second trainer on the workdir is refused, `workdir_lock`);
2. the config is compared with the run's `config.json`: a change that alters the state's
   structure or meaning is a `run_config.ConfigChangeError`, before anything is written;
3. the newest readable checkpoint is restored (state and data iterator); unreadable ones are
   moved aside (`checkpoint`); `metrics.jsonl` rows past the restored step are dropped;
4. host 0 records the config (`config.json` + `configs/<time>.json`) and logs a header;
5. the loop: periodic actions (log, checkpoint, preview samples, and with `config.eval.every`
   > 0 an evaluation) fire at `itstime(step, every)` and at the last step; SIGTERM saves a
   checkpoint and raises `Preempted`; a non-finite loss or gradient raises `NonFiniteError`
   and the last good checkpoint stays the newest.

An evaluation (`evaluation.hook`) samples `config.eval.num_samples` images with the grid's
sample function (the sampler of `config.eval.sampler`/`steps`, else `config.sample`), from the
same noise at every evaluation (keys fold_in(eval key, batch)), logs `eval/<metric>` and, at a
new best (lower is better), saves that step's checkpoint in `<workdir>/best/` (outside
`keep_latest` pruning) before recording it in `<workdir>/eval/best.json`; a resumed run compares
with that record. `training.restore.load_for_sampling(workdir, step='best')` reads it.
Every host computes; host 0 writes logs, metrics, samples and the lock. The grids' and the
evaluations' samples are drawn on host 0, spread over its local devices (`_ImageSampler`).

References: the Flax examples and big_vision train loops; Ho et al. 2020 (EMA samples).
"""
from typing import Any
import contextlib
import json
import signal
import threading
import time

from absl import logging
import jax
import numpy as np
from etils import epath

from diffusion_jax import xla_cpu
from diffusion_jax.evaluation import hook as hook_lib
from diffusion_jax.training import checkpoint as ckpt_lib
from diffusion_jax.training import components
from diffusion_jax.training import families
from diffusion_jax.training import latent_decoder
from diffusion_jax.training import local_batch
from diffusion_jax.training import metric_writer
from diffusion_jax.training import parallel
from diffusion_jax.training import progress
from diffusion_jax.training import run_config
from diffusion_jax.training import sampling
from diffusion_jax.training import state as state_lib
from diffusion_jax.training import step as step_lib
from diffusion_jax.training import text_run
from diffusion_jax.training import workdir_lock

PyTree = Any
# fold_in data of the evaluation key (beside the grids' fold_in(sample key, step)): every
# evaluation draws the same noise, so values at different steps differ by the model only.
_EVAL_KEY = 0x6576616C


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


class _Schedule:
  """The run's length and cadences from `config.train`, checked: every count is a multiple of
  `steps_per_call` (k steps run per compiled call)."""

  def __init__(self, train_cfg: Any, eval_every: int = 0):
    self.num_steps = int(train_cfg.num_steps)
    if self.num_steps <= 0:
      raise ValueError(f"config.train.num_steps={self.num_steps} must be >= 1.")
    self.k = int(train_cfg.steps_per_call)
    self.checkpoint_every = int(train_cfg.checkpoint_every)
    self.sample_every = int(train_cfg.sample_every)
    self.log_every = (int(train_cfg.log_every)
                      or max(self.k, self.num_steps // 100 // self.k * self.k))
    for name in ("num_steps", "checkpoint_every", "sample_every", "log_every"):
      if getattr(self, name) % self.k:
        raise ValueError(f"config.train.{name}={getattr(self, name)} must be a multiple of "
                         f"config.train.steps_per_call={self.k}")
    if eval_every % self.k:
      raise ValueError(f"config.eval.every={eval_every} must be a multiple of "
                       f"config.train.steps_per_call={self.k}")


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


def train_and_evaluate(config: Any, workdir: str) -> state_lib.TrainState:
  """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns the final
  host state (numpy leaves).

  Raises:
    ValueError: a bad static setting (num_steps < 1, batch size not divisible by the devices...).
    run_config.ConfigChangeError: the config changes keys the run must keep (lists them).
    workdir_lock.WorkdirLockedError: another live trainer holds the workdir.
    checkpoint.CheckpointMismatchError / NoReadableCheckpointError: see `checkpoint`.
    NonFiniteError: the loss or a gradient became non-finite (message names the step).
    Preempted: SIGTERM arrived; a checkpoint was written first.
  """
  from diffusion_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from diffusion_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(workdir)
  host0 = jax.process_index() == 0
  sched = _Schedule(config.train, int(config.eval.every))
  text = text_run.is_text(config)
  if text:
    text_run.check_sampling(config)
    if int(config.eval.every) > 0:
      raise ValueError("config.eval.every > 0 scores image samples; a text run has no sample "
                       "metric in training: set eval.every=0 and use experiments.evaluate_text.")
  eval_hook = hook_lib.EvalHook(config.eval, config.eval.sampler or config.sample.sampler) \
      if int(config.eval.every) > 0 else None   # checks config.eval before anything is written
  batch_size = int(config.train.batch_size)
  check_batch_size(batch_size, jax.device_count())
  workdir.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as stack:
    stack.enter_context(workdir_lock.WorkdirLock(workdir, active=host0))
    sigterm = stack.enter_context(_SigtermFlag())
    run_config.check_resume(config, workdir)

    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                 num_local_devices=jax.local_device_count())
    if text:
      corpus = text_run.load_text_data(config.data, splits=("train",))
      comp = components.build(config, (int(corpus.train.shape[1]),),
                              vocab_size=corpus.tokenizer.vocab_size)
      it = text_lib.make_text_train_iterator(
          corpus.train, global_batch_size=batch_size, seed=int(config.seed),
          shuffle=bool(config.data.shuffle), num_threads=int(config.data.num_threads),
          prefetch=int(config.data.prefetch), **hosts)
      info = it.info
    else:
      info = data_lib.get_dataset_info(config.data)
      comp = components.build(config, tuple(info.image_shape))
      it = data_lib.make_train_iterator(config.data, global_batch_size=batch_size,
                                        seed=int(config.seed), **hosts)
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)), 3)
    state = components.init_state(config, comp, init_rng)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints",
                                 keep_latest=int(config.train.keep_latest),
                                 snapshot_every=int(config.train.snapshot_every))
    stack.callback(ckpt.close)
    restored = ckpt.restore(state, set_aside=host0)
    if restored is not None:
      _, state, data_state = restored
      if data_state:
        it.set_state(data_state)
    start = int(state.step)
    if host0:
      run_config.record(config, workdir)
      dataset_info = {"image_shape": list(comp.image_shape), "num_classes": int(info.num_classes)}
      if text:
        dataset_info.update(vocab_size=comp.vocab_size, tokenizer=text_run.TOKENIZER_FILE)
        text_lib.save_tokenizer(corpus.tokenizer, str(workdir / text_run.TOKENIZER_FILE))
      (workdir / "dataset_info.json").write_text(json.dumps(dataset_info))
    writer = stack.enter_context(contextlib.closing(
        metric_writer.MetricWriter(workdir, start, active=host0)))
    _log_header(config, comp, state, workdir, start, restored is not None, writer.dropped)

    pstep = _make_parallel_step(config, comp, sched.k)
    hooks = _Hooks(config, comp, sched, pstep, ckpt, writer, workdir, sample_rng, host0,
                   eval_hook, tokenizer=corpus.tokenizer if text else None)
    stack.callback(hooks.close)
    hooks.last_saved = start if restored is not None else None

    step, dstate, pending = start, pstep.put_state(state), None
    while step < sched.num_steps:
      batch = pstep.prepare_batch(_stack([next(it) for _ in range(sched.k)]))
      if pending is not None:   # the previous call ran on the devices while the host read data
        hooks.accumulate(pstep.get_state(pending), step)
        pending = None
      t_call = time.perf_counter()
      dstate, pending = pstep.step(dstate, batch, train_rng)
      step += sched.k
      if step == start + sched.k:
        hooks.compiled(pending, step, time.perf_counter() - t_call)
      preempted = sigterm.any_host()
      due = hooks.due(step, preempted)
      if due:
        hooks.accumulate(pstep.get_state(pending), step)
        pending = None
        hooks.run(due, step, dstate, it)
      if preempted:
        ckpt.wait()
        raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in {ckpt.directory}.")
    ckpt.wait()
    if host0:
      logging.info("Training finished at step %d; the run is in %s.", step, workdir)
    return pstep.get_state(dstate)


def _make_parallel_step(config: Any, comp: components.Components, k: int
                        ) -> parallel.ParallelStep:
  train_cfg = config.train
  step_cfg = step_lib.StepConfig(
      num_classes=comp.num_classes,
      label_dropout=float(train_cfg.label_dropout) if comp.num_classes else 0.0,
      compute_dtype=train_cfg.compute_dtype,
      accumulate=int(config.optim.accumulate), process_count=jax.process_count())
  mode = parallel.resolve_mode(train_cfg.parallel)
  step_fn = step_lib.make_train_step(comp.model.apply, components.run_loss_fn(config, comp),
      comp.tx, comp.lr_fn, step_cfg,
      axis_name=None if mode == "jit" else parallel.AXIS)
  options = xla_cpu.compiler_options(train_cfg.cpu_convolutions, "train.cpu_convolutions")
  if options and jax.process_index() == 0:
    if mode == "pmap":
      logging.info("train.cpu_convolutions=%r does not reach train.parallel='pmap' (jax.pmap "
                   "takes no compiler options): the step compiles with JAX's default kernels.",
                   train_cfg.cpu_convolutions)
    else:
      logging.info("Train step convolutions: XLA:CPU's own (train.cpu_convolutions='xla'; "
                   "'ynnpack' for JAX's default).")
  return parallel.make_parallel_step(step_fn, mode, steps_per_call=k, compiler_options=options)


class _Hooks:
  """The loop's periodic actions: 'log', 'checkpoint', 'samples' and 'eval', each at its cadence
  and at the last step; a preemption runs 'log' and 'checkpoint' only."""

  def __init__(self, config, comp, sched: _Schedule, pstep: parallel.ParallelStep,
               ckpt: ckpt_lib.Checkpointer, writer: metric_writer.MetricWriter,
               workdir: epath.Path, sample_rng, host0: bool,
               eval_hook: hook_lib.EvalHook | None = None, tokenizer: Any = None):
    self.config, self.comp, self.sched, self.pstep, self.ckpt = config, comp, sched, pstep, ckpt
    self.writer, self.workdir, self.sample_rng, self.host0 = writer, workdir, sample_rng, host0
    self.meter = metric_writer.MeanAccumulator()
    self.chrono = progress.Chrono(sched.num_steps)
    self.last_saved: int | None = None
    self.tokenizer = tokenizer
    num_samples = int(config.sample.num_samples)
    make = _make_text_sample_fn if comp.vocab_size else _ImageSampler
    self.sample_fn = make(config, comp, num_samples) if host0 and num_samples > 0 else None
    # A latent run's previews are decoded to pixels (None: a pixel-space run).
    self.decoder = latent_decoder.load_decoder(config) if self.sample_fn is not None else None
    self.every = {"log": sched.log_every, "checkpoint": sched.checkpoint_every,
                  "samples": sched.sample_every if self.sample_fn is not None else -1,
                  "eval": eval_hook.every if eval_hook is not None else -1}
    self.eval_hook = eval_hook
    if eval_hook is not None:
      self._init_eval(config, comp, sample_rng)

  def _init_eval(self, config, comp, sample_rng) -> None:
    """The evaluation's sample function (host 0), key, best checkpointer and best record."""
    self.eval_batch = min(int(config.eval.batch_size), int(config.eval.num_samples))
    self.eval_sample_fn = _ImageSampler(config, comp, self.eval_batch,
                                        sampler=config.eval.sampler,
                                        steps=config.eval.steps) if self.host0 else None
    self.eval_rng = jax.random.fold_in(sample_rng, _EVAL_KEY)
    self.best_ckpt = ckpt_lib.Checkpointer(self.workdir / hook_lib.BEST_DIR, keep_latest=2,
                                           async_save=False)
    self.best = hook_lib.read_best(self.workdir)
    # Keep the recorded step's checkpoint, even when the record is about to be replaced: it
    # stays `load_for_sampling(step='best')` until a new best is recorded.
    self._prune_best(self.best["step"] if self.best is not None else None)
    if self.best is not None and self.best.get("settings") != self.eval_hook.settings:
      if self.host0:
        logging.warning("The best record %s was made with other config.eval settings (%s; now "
                        "%s): the next evaluation starts a new record.",
                        self.workdir / hook_lib.BEST_RECORD, self.best.get("settings"),
                        self.eval_hook.settings)
      self.best = None

  def _prune_best(self, keep: int | None) -> None:
    """Deletes best/ checkpoints other than `keep` (a kill between saving a new best and
    recording it leaves one behind)."""
    for s in self.best_ckpt.all_steps():
      if s != keep:
        self.best_ckpt.delete(s)

  def close(self) -> None:
    if self.eval_hook is not None:
      self.best_ckpt.close()

  def due(self, step: int, preempted: bool) -> list[str]:
    """The actions due at `step`; after a SIGTERM only 'log' and 'checkpoint' (the grace period
    before a SIGKILL is for the checkpoint, not for a sample grid or an evaluation)."""
    if preempted:
      return ["log", "checkpoint"]
    last = self.sched.num_steps
    return [name for name, every in self.every.items()
            if every >= 0 and progress.itstime(step, every, last)]

  def compiled(self, metrics: dict, step: int, seconds_since_call: float) -> None:
    """After the first call: report the compile time; speeds are measured from here."""
    jax.block_until_ready(metrics)
    if self.host0:
      logging.info("Compiled and ran the first %d step(s) in %.1f s.", self.sched.k,
                   seconds_since_call)
    self.chrono.mark(step)

  def accumulate(self, metrics: dict, end_step: int) -> None:
    """Adds one call's per-step metrics [k]; NonFiniteError if a step was not finite."""
    metrics = jax.tree.map(lambda m: np.asarray(m).reshape(-1), metrics)
    bad = np.flatnonzero(metrics["nonfinite"] > 0)
    if bad.size:
      at = end_step - metrics["nonfinite"].size + int(bad[0]) + 1
      kept = f"step {self.last_saved}" if self.last_saved is not None else "none"
      raise NonFiniteError(
          f"Non-finite loss or gradient at step {at} (loss={metrics['loss'][bad[0]]}, "
          f"grad_norm={metrics['grad_norm'][bad[0]]}); training stopped. The last good "
          f"checkpoint is kept: {kept} in {self.ckpt.directory}.")
    self.meter.add(metrics)

  def run(self, due: list[str], step: int, device_state: PyTree, data_iterator: Any) -> None:
    """Runs the due actions at `step` (the metrics are already accumulated)."""
    if "log" in due:
      self.log(step)
    host_state = self.pstep.get_state(device_state) if len(due) > due.count("log") else None
    if "checkpoint" in due:
      self.ckpt.save(step, host_state, data_iterator.get_state())
      self.last_saved = step
      if self.host0:
        logging.info("Checkpoint at step %d: %s", step, self.ckpt.directory / str(step))
    if "samples" in due:
      self.samples(step, host_state)
    if "eval" in due:
      self.evaluate(step, host_state, data_iterator)

  def log(self, step: int) -> None:
    means = self.meter.pop()
    if not means:
      return
    sps = self.chrono.steps_per_sec(step)
    batch = int(self.config.train.batch_size)
    if text_run.is_text(self.config):   # a text example is seq_len tokens, not an image
      unit, rate = "tokens", sps * batch * int(self.config.data.seq_len)
    else:
      unit, rate = "images", sps * batch
    means.update({"steps_per_sec": sps, f"{unit}_per_sec": rate})
    self.writer.write_scalars(step, means)
    if self.host0:
      logging.info("step %d/%d | loss %.5f | grad_norm %.3f | lr %.3g | %.2f steps/s | "
                   "%.1f %s/s | ETA %s", step, self.sched.num_steps, means["loss"],
                   means["grad_norm"], means["lr"], sps, rate, unit,
                   self.chrono.eta(step, sps))

  def samples(self, step: int, host_state: state_lib.TrainState) -> None:
    t0 = time.perf_counter()
    params, which = self._sampling_params(host_state)
    # One fused call with no progress of its own, so say what runs first: all T steps of a large
    # model take many minutes on CPU.
    cfg = self.config.sample
    steps = cfg.get("steps", None)
    what = ("texts" if self.comp.vocab_size else
            f"images ({cfg.sampler}, {f'{steps} steps' if steps else 'its default steps'})")
    logging.info("Sampling %d %s with the %s params for step %d ...", int(cfg.num_samples), what,
                 which, step)
    (self.workdir / "samples").mkdir(exist_ok=True)
    if self.comp.vocab_size:
      tokens = self.sample_fn(params, jax.random.fold_in(self.sample_rng, step))
      texts = text_run.decode(self.tokenizer, np.asarray(tokens))
      path = self.workdir / "samples" / f"step_{step:07d}.txt"
      path.write_text("".join(f"=== sample {i} ===\n{t}\n" for i, t in enumerate(texts)))
      logging.info("Wrote %d text samples (%s params) to %s (%.1f s). The first:\n%s",
                   len(texts), which, path, time.perf_counter() - t0, texts[0])
      return
    images = latent_decoder.to_images(
        self.sample_fn(params, jax.random.fold_in(self.sample_rng, step)), self.decoder)
    path = self.workdir / "samples" / f"step_{step:07d}.png"
    sampling.save_grid(images, str(path))
    logging.info("Wrote %d samples (%s params) to %s (%.1f s).", images.shape[0], which, path,
                 time.perf_counter() - t0)

  def _sampling_params(self, host_state: state_lib.TrainState) -> tuple[PyTree, str]:
    return state_lib.params_for_sampling(host_state, self.config.train.ema_decays,
                                         ema_decay=self.config.sample.ema_decay)

  def evaluate(self, step: int, host_state: state_lib.TrainState, data_iterator: Any) -> None:
    """Scores `config.eval.num_samples` samples, logs eval/<metric>, keeps the best checkpoint."""
    t0 = time.perf_counter()
    hook, key = self.eval_hook, f"eval/{self.eval_hook.metric}"
    value, which, failure = float("nan"), "", None
    if self.host0:
      try:
        params, which = self._sampling_params(host_state)
        params = self.eval_sample_fn.place(params)
        num = int(self.config.eval.num_samples)
        images = np.concatenate([
            sampling.to_uint8(self.eval_sample_fn(params, jax.random.fold_in(self.eval_rng, i)))
            for i in range(-(-num // self.eval_batch))])[:num]
        value = hook(images)[key]
      except Exception as e:  # pylint: disable=broad-except
        failure = e           # raised below, after the other hosts have heard of it
    value, failed = _from_host0(value, failure is not None)
    if failure is not None:
      raise failure
    if failed:   # else the other hosts would wait for host 0 at their next collective forever
      raise RuntimeError(f"The evaluation at step {step} failed on host 0 (see its log).")
    self.writer.write_scalars(step, {key: value})
    new_best = bool(np.isfinite(value)) and hook_lib.is_new_best(self.best, value, hook.settings)
    if not np.isfinite(value) and self.host0:
      logging.warning("Eval at step %d: %s is not finite (%r); not a best.", step, hook.metric,
                      value)
    if new_best:
      if step not in self.best_ckpt.all_steps():
        self.best_ckpt.save(step, host_state, data_iterator.get_state())
        self.best_ckpt.wait()
      if self.host0:
        hook_lib.write_best(self.workdir, step, value, hook.settings)
      self.best = {"metric": hook.metric, "value": value, "step": step, "settings": hook.settings}
      self._prune_best(step)
    if self.host0:
      logging.info("Eval at step %d: %s %.5g (%d samples, %s params, %.1f s) | best %.5g at step "
                   "%d%s", step, hook.metric, value, int(self.config.eval.num_samples), which,
                   time.perf_counter() - t0, self.best["value"] if self.best else float("nan"),
                   self.best["step"] if self.best else -1,
                   f" (kept in {self.best_ckpt.directory / str(step)})" if new_best else "")
    self.chrono.mark(step)   # the next log's steps/s measures training, not this evaluation


def _from_host0(value: float, failed: bool) -> tuple[float, bool]:
  """Host 0's (value, whether its evaluation raised) on every host (the evaluation runs on host
  0 only)."""
  if jax.process_count() == 1:
    return float(value), failed
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  value, failed = multihost_utils.broadcast_one_to_all((np.float64(value), np.int32(failed)))
  return float(value), bool(failed)


def _log_header(config, comp: components.Components, state: state_lib.TrainState,
                workdir: epath.Path, start: int, resumed: bool, dropped_rows: int) -> None:
  """The few lines a user reads before the progress lines (host 0)."""
  if jax.process_index() != 0:
    return
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  shape = "x".join(str(d) for d in comp.image_shape)
  classes = f", {comp.num_classes} classes" if comp.num_classes else ""
  logging.info("Model %s: %s parameters | data %s, images %s%s", config.model.name,
               f"{num_params:,}", config.data.name, shape, classes)
  logging.info("Devices: %d x %s (%d process(es)) | batch %d | %d steps | workdir %s",
               jax.device_count(), jax.devices()[0].platform, jax.process_count(),
               int(config.train.batch_size), int(config.train.num_steps), workdir)
  if resumed:
    logging.info("Resumed from %s at step %d%s.", workdir / "checkpoints", start,
                 f" (dropped {dropped_rows} metrics.jsonl rows past it)" if dropped_rows else "")
  else:
    logging.info("Starting from step 0.")


def _stack(batches: list[dict]) -> dict:
  """The k batches of one call stacked on a new leading axis (image and label, or tokens)."""
  keys = [k for k in ("image", "label", "tokens") if k in batches[0]]
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}


class _ImageSampler:
  """sample(params, rng) -> [num, H, W, C] in [-1, 1]: the grids' sampler, or `sampler` / `steps`
  (None: config.sample's), on the params' sampling schedule, spread over `devices` (default this
  host's local devices; one device when they do not divide `num`).

  Spread (`local_batch`): the params are replicated (`place`) and the model's input is
  batch-sharded, so an 8-device host draws an evaluation's batches 8x wider than one device
  would; the images equal one device's up to float32 rounding (a smaller batch per device may
  use kernels that sum in another order: up to 1.4e-6 apart on the Quickstart's digits model).
  The schedule (a learned VDM schedule is read from the params) and its respacing are computed
  eagerly; the sampler runs jitted, compiled once (the plan's static settings do not depend on the
  schedule's values).
  """

  def __init__(self, config: Any, comp: components.Components, num: int,
               sampler: str | None = None, steps: int | None = None,
               devices: list[jax.Device] | None = None):
    self.local = local_batch.LocalBatch.dividing(num, devices)
    self.config, self.comp, self.sampler, self.steps = config, comp, sampler, steps
    self.labels = sampling.default_labels(num, comp.num_classes)
    self.shape = (num,) + tuple(comp.image_shape)
    self._draw = None

  def place(self, params: PyTree) -> PyTree:
    """params on every device of the sampler (a no-op for params already placed)."""
    return self.local.place(params)

  def __call__(self, params: PyTree, rng: jax.Array) -> jax.Array:
    params = self.place(params)
    config, model = self.config, self.comp.model
    schedule = families.sampling_schedule(config, model, params, self.comp.schedule)
    run, schedule, per_call = sampling.plan_sampling(config, schedule, self.sampler, self.steps)
    if self._draw is None:
      def draw(p, s, c, r):
        model_fn = sampling.guided_model_fn(config, model, p, self.labels)
        spread = lambda x, t: model_fn(self.local.constrain(x), t)
        return run(spread, s, self.shape, r, **c)
      self._draw = jax.jit(draw, out_shardings=self.local.sharded)
    return self._draw(params, schedule, per_call, rng)


def _make_text_sample_fn(config: Any, comp: components.Components, num: int):
  """jitted sample_fn(params, rng) -> tokens [num, L] (`text_run.generate` with `sample.*`)."""
  steps = config.sample.text_steps

  @jax.jit
  def sample_fn(params, rng):
    return text_run.generate(config, comp.model, params, rng, num, comp.image_shape[0],
                             comp.vocab_size, steps=steps, temperature=config.sample.temperature,
                             top_p=config.sample.top_p)[0]
  return sample_fn
