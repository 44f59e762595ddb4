"""One side of a benchmark, run in its own process by bench_models / bench_train / bench_sampling.

  python benchmarks/workloads.py --side jax|torch --task forward|train|ddpm|ddim \
      --model ddpm_cifar10|DiT-S/2 --batch 8 --iters 3 [--steps N] [--threads K] [--dtype ...]

Prints `RESULT {json}` with compile_s (JAX: lower + compile; PyTorch: the first, warm-up call)
and times_s (one entry per timed call, after one untimed warm-up call).

Workloads (float32 unless --dtype):
- forward: one network evaluation on a batch (ddpm_cifar10: 32x32x3; DiT-S/2: 32x32x4 latents,
  class labels, no learned sigma, as in issue 12).
- train: the step a notebook user writes: `get_model` + `dj.training_loss` (eps, MSE, linear
  T=1000 schedule) + `optax.adam(2e-4)` under `jax.jit`; PyTorch: the same loss on the diffusers
  model (`UNet2DModel`, `DiTTransformer2DModel` with the same configuration) + `torch.optim.Adam`.
- JAX on CPU uses JAX's default (YNNPACK) convolutions; `--convolutions=xla` measures the
  opt-in XLA kernels (`diffusion_jax.xla_cpu`).
- ddpm / ddim: sampling `--steps` steps of ddpm_cifar10 (ancestral over the full schedule
  respaced to `--steps`; DDIM eta=0) with the fused-scan samplers, against diffusers'
  `DDPMPipeline` / `DDIMPipeline` with `num_inference_steps=--steps`. Per-step work does not
  depend on the number of steps, so per-image time at 1000 steps is extrapolated linearly when
  fewer steps are run (the parent says so).
Weights are random: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import protocol

UNET_DIFFUSERS = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "attention_head_dim": None,
    "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "norm_eps": 1e-6,
    "norm_num_groups": 32, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "dropout": 0.0}
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _shape(model: str) -> tuple[int, int, int, int]:
  """(size, channels, num_classes, learn_sigma-free out channels) of the benchmarked input."""
  if model.startswith("DiT-"):
    return 32, 4, 1000, 4
  return 32, 3, 0, 3


# ----------------------------------------------------------------------------------------- JAX
def jax_setup(model: str, batch: int, dtype: str, size: int | None = None, params=None,
              attention: str | None = None):
  """(module, params, x [B, size, size, C], t [B], y [B] or None) with random weights: the
  benchmarked network (DiT without learned sigma, U-Net without dropout) computing in `dtype`.
  size: the input's side (default `_shape`'s: 32). params: reuse these weights (e.g. those of
  an earlier setup at another batch size) instead of drawing new ones. attention: the model's
  attention kernel (`layers.attention`'s implementation; None: the library's default)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp

  import diffusion_jax as dj

  default_size, cin, ncls, _ = _shape(model)
  size = size or default_size
  kw = {"learn_sigma": False} if model.startswith("DiT-") else {"dropout": 0.0}
  kw["attention"] = attention
  module = dj.get_model(model, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, **kw)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, cin)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  y = jnp.asarray(rng.integers(0, ncls, batch), jnp.int32) if ncls else None
  if params is not None:
    return module, params, x, t, y
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, y)["params"])
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  return module, params, x, t, y


def jax_train_step(model: str, batch: int, dtype: str = "float32", size: int | None = None,
                   setup: tuple | None = None, attention: str | None = None):
  """(jitted step, its argument list) of the 'train' task: `dj.training_loss` (eps, MSE, linear
  T = 1000) + `optax.adam(2e-4)`; step(params, opt_state, x, key) -> (params, opt_state, loss),
  params and opt_state donated. setup: `jax_setup`'s result, if the caller already made it."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax

  import diffusion_jax as dj

  module, params, x, _, y = setup or jax_setup(model, batch, dtype, size, attention=attention)
  schedule = dj.get_schedule("linear", 1000)
  tx = optax.adam(2e-4)

  def loss(p, x, key):
    model_fn = lambda xt, tt: module.apply({"params": p}, xt, tt, y)
    return dj.training_loss(model_fn, schedule, x, key).mean()

  def step(p, opt, x, key):
    value, grads = jax.value_and_grad(loss)(p, x, key)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value
  return jax.jit(step, donate_argnums=(0, 1)), [params, tx.init(params), x, jax.random.key(1)]


def jax_side(task: str, model: str, batch: int, iters: int, steps: int, dtype: str,
             attention: str | None = None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  import diffusion_jax as dj
  from diffusion_jax.samplers import ancestral, ddim, respacing

  if task not in ("forward", "train", "ddpm", "ddim"):
    raise ValueError(f"task must be forward, train, ddpm or ddim, got {task!r}")
  if task == "train":
    fn, args = jax_train_step(model, batch, dtype, attention=attention)
  else:
    module, params, x, t, y = jax_setup(model, batch, dtype, attention=attention)
    if task == "forward":
      fn = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t, y))
      args = (params, x, t)
    else:
      model_fn = lambda p: (lambda xt, tt: module.apply({"params": p}, xt, tt, y))
      sched, timesteps = respacing.respace(dj.get_schedule("linear", 1000), steps)
      if task == "ddpm":
        fn = jax.jit(lambda p, key: ancestral.sample(model_fn(p), sched, x.shape, key,
                                                     timesteps=timesteps))
      else:
        fn = jax.jit(lambda p, key: ddim.sample(model_fn(p), sched, x.shape, key,
                                                timesteps=timesteps))
      args = (params, jax.random.key(2))

  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0

  if task == "train":
    def run():
      args[0], args[1], value = compiled(*args)
      value.block_until_ready()
  else:
    run = lambda: jax.block_until_ready(compiled(*args))
  faults: list[int] = []
  return {"compile_s": compile_s, "times_s": protocol.timed(run, iters, faults), "faults": faults}


# ------------------------------------------------------------------------------------- PyTorch
def torch_side(task: str, model: str, batch: int, iters: int, steps: int, threads: int,
               dtype: str = "float32") -> dict:
  """PyTorch's side of `task` on the GPU when one is visible (TF32 allowed, as JAX's default
  precision does there; cuDNN autotuned, as XLA autotunes), else on the CPU with `threads`.
  bfloat16 runs the network under `torch.autocast`."""
  import contextlib  # pylint: disable=g-import-not-at-top

  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bfloat16"
              else contextlib.nullcontext)
  size, cin, ncls, cout = _shape(model)
  if model.startswith("DiT-"):
    from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top
    depth, width, heads = DIT_SIZES[model[4:].split("/")[0]]
    net = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=cin,
        out_channels=cout, num_layers=depth, sample_size=size,
        patch_size=int(model.split("/")[1]), num_embeds_ada_norm=ncls, norm_eps=1e-6)
  else:
    from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
    net = UNet2DModel(**UNET_DIFFUSERS)
  net = net.to(device)
  gen = torch.Generator().manual_seed(0)
  x0 = (torch.rand(batch, cin, size, size, generator=gen) * 2 - 1).to(device)
  labels = torch.randint(0, max(ncls, 1), (batch,), generator=gen).to(device)
  call = ((lambda xt, tt: net(xt, timestep=tt, class_labels=labels).sample) if ncls
          else (lambda xt, tt: net(xt, tt).sample))
  abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
  abar = abar.to(device)

  if task == "forward":
    net.eval()
    tt = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def work():
      with torch.inference_mode(), autocast():
        call(x0, tt)
  elif task == "train":
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)

    def work():
      tt = torch.randint(0, 1000, (batch,), device=device)
      noise = torch.randn_like(x0)
      a = abar[tt].view(-1, 1, 1, 1)
      with autocast():
        out = call(a.sqrt() * x0 + (1 - a).sqrt() * noise, tt)
      loss = ((out.float() - noise) ** 2).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
  elif task in ("ddpm", "ddim"):
    if ncls:
      raise ValueError("sampling pipelines are benchmarked for the unconditional U-Net only")
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler  # pylint: disable=g-import-not-at-top
    net.eval()
    if task == "ddpm":
      pipe = DDPMPipeline(unet=net, scheduler=DDPMScheduler(num_train_timesteps=1000))
    else:
      pipe = DDIMPipeline(unet=net, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def work():
      with torch.inference_mode(), autocast():
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np")
  else:
    raise ValueError(f"task must be forward, train, ddpm or ddim, got {task!r}")

  def run():
    work()
    if cuda:
      torch.cuda.synchronize()

  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  faults: list[int] = []
  return {"compile_s": first, "times_s": protocol.timed(run, iters, faults), "faults": faults,
          "threads": threads, "torch": torch.__version__,
          "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--side", choices=("jax", "torch"), required=True)
  p.add_argument("--task", choices=("forward", "train", "ddpm", "ddim"), required=True)
  p.add_argument("--model", default="ddpm_cifar10")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--steps", type=int, default=50, help="sampling steps (ddpm / ddim)")
  p.add_argument("--threads", type=int, default=protocol.cores(), help="PyTorch threads")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (JAX: the module's; PyTorch: autocast)")
  p.add_argument("--convolutions", default="ynnpack", choices=("xla", "ynnpack"),
                 help="XLA:CPU convolutions: YNNPACK's (JAX's default) or XLA's own (opt-in)")
  p.add_argument("--host_memory", default="release", choices=("release", "keep"),
                 help="JAX side: glibc's default malloc, or freed memory kept (opt-in)")
  p.add_argument("--attention", default=None, choices=("einsum", "xla"),
                 help="JAX side: the models' attention kernel (default: the library's choice)")
  a = p.parse_args()
  if a.side == "jax":
    protocol.use_host_memory(a.host_memory)
    protocol.use_convolutions(a.convolutions)
    res = jax_side(a.task, a.model, a.batch, a.iters, a.steps, a.dtype, a.attention)
    import diffusion_jax  # pylint: disable=g-import-not-at-top
    res["package"] = os.path.dirname(os.path.abspath(diffusion_jax.__file__))
  else:
    res = torch_side(a.task, a.model, a.batch, a.iters, a.steps, a.threads, a.dtype)
  protocol.emit(res)


if __name__ == "__main__":
  main()
