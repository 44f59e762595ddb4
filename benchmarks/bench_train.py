"""Train-step throughput: diffusion_jax vs PyTorch/diffusers, 8 fake devices, real data.

  python benchmarks/bench_train.py [--batch 8] [--steps 5] [--models ddpm_cifar10,DiT-S/2]

Prints the machine, then for each model: images/s of the jitted JAX step (forward, backward,
Adam, EMA) and of the same step in PyTorch (diffusers UNet2DModel for the U-Net,
DiTTransformer2DModel for DiT; Adam + EMA), and their ratio measured in the same run.
`--devices8` (a separate process with 8 fake CPU devices) reports pmap steps/s on the tiny digits
model; `--data` compares the digits step time with real data against a fixed batch.
"""
import argparse
import os
import platform
import subprocess
import sys
import time


def machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return (f"processor={platform.processor() or platform.machine()} cores={os.cpu_count()} "
          f"jax={jax.__version__} backend={jax.default_backend()} devices={jax.device_count()}")


def _time(fn, steps):
  fn()  # warm-up / compile
  fn()
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t) / steps


def jax_step_time(name: str, batch: int, steps: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections
  import numpy as np
  from diffusion_jax.training import components, step as step_lib
  from experiments.configs import ddpm_cifar10, dit_cifar10
  config = (dit_cifar10.get_config(name) if name.startswith("DiT") else ddpm_cifar10.get_config())
  config.train.num_steps = 1000
  comp = components.build(config, (32, 32, 3))
  state = jax.tree.map(jax.numpy.asarray, components.init_state(config, comp, jax.random.PRNGKey(0)))
  sc = step_lib.StepConfig(num_classes=comp.num_classes, label_dropout=0.1 if comp.num_classes else 0)
  fn = jax.jit(step_lib.make_train_step(comp.model.apply, components.make_loss_fn(
      config.diffusion, comp.schedule), comp.tx, comp.lr_fn, sc, axis_name=None), donate_argnums=0)
  rs = np.random.RandomState(0)
  b = {"image": jax.numpy.asarray(rs.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)),
       "label": jax.numpy.asarray(rs.randint(0, 10, (batch,)).astype(np.int32))}
  rng = jax.random.PRNGKey(0)
  box = [state]

  def run():
    box[0], m = fn(box[0], b, rng)
    jax.block_until_ready(m)
  return _time(run, steps)


def torch_step_time(name: str, batch: int, steps: int) -> float:
  import copy  # pylint: disable=g-import-not-at-top
  import torch
  from diffusers import UNet2DModel, DiTTransformer2DModel
  torch.manual_seed(0)
  if name.startswith("DiT"):
    size, patch = name[4:].split("/")
    depth, width, heads = {"S": (12, 384, 6), "B": (12, 768, 12)}[size]
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads,
                                  in_channels=3, out_channels=6, num_layers=depth,
                                  sample_size=32, patch_size=int(patch), num_embeds_ada_norm=10)
  else:
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                        block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        dropout=0.1, attention_head_dim=None, norm_eps=1e-6,
                        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
  ema = copy.deepcopy(model).requires_grad_(False)
  opt = torch.optim.Adam(model.parameters(), lr=2e-4)
  x0 = torch.rand(batch, 3, 32, 32) * 2 - 1
  labels = torch.randint(0, 10, (batch,))
  abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

  def run():
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if name.startswith("DiT"):
      out = model(xt, timestep=t, class_labels=labels).sample[:, :3]
    else:
      out = model(xt, t).sample
    loss = ((out - noise) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(0.9999).add_(p, alpha=1e-4)
  return _time(run, steps)


def devices8(steps: int) -> None:
  """Runs in a child with 8 fake devices: pmap steps/s of the digits step, and real-data vs
  fixed-batch step time through the trainer's own loop pieces."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from diffusion_jax import data as data_lib
  from diffusion_jax.training import components, parallel, step as step_lib
  from experiments.configs import digits
  config = digits.get_config()
  config.data.data_dir = os.environ.get("BENCH_DATA_DIR", "/tmp/bench_tfds")
  comp = components.build(config, (8, 8, 1))
  state = components.init_state(config, comp, jax.random.PRNGKey(0))
  for mode in ("pmap", "shard_map"):
    ps = parallel.make_parallel_step(step_lib.make_train_step(
        comp.model.apply, components.make_loss_fn(config.diffusion, comp.schedule), comp.tx,
        comp.lr_fn, step_lib.StepConfig()), mode)
    it = data_lib.make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                      seed=0, process_index=0, process_count=1,
                                      num_local_devices=jax.local_device_count())
    fixed = ps.prepare_batch({k: v[None] for k, v in next(it).items()})
    box = [ps.put_state(state)]
    rng = jax.random.PRNGKey(0)

    def run(real):
      b = ps.prepare_batch({k: v[None] for k, v in next(it).items()}) if real else fixed
      box[0], m = ps.step(box[0], b, rng)
      jax.block_until_ready(m)
    t_fixed = _time(lambda: run(False), steps)
    t_real = _time(lambda: run(True), steps)
    print(f"  {mode:9s} 8 devices, digits batch {config.train.batch_size}: "
          f"{1 / t_fixed:.2f} steps/s fixed batch, {1 / t_real:.2f} steps/s real data "
          f"(real/fixed step time {t_real / t_fixed:.2f})", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--models", default="ddpm_cifar10,DiT-S/2")
  p.add_argument("--devices8", action="store_true", help="(internal) run the 8-device part")
  args = p.parse_args()
  if args.devices8:
    devices8(args.steps)
    return
  print(machine(), flush=True)
  for name in args.models.split(","):
    tj = jax_step_time(name, args.batch, args.steps)
    tt = torch_step_time(name, args.batch, args.steps)
    print(f"{name:13s} batch {args.batch}: JAX {args.batch / tj:.2f} images/s, PyTorch "
          f"{args.batch / tt:.2f} images/s, JAX/PyTorch speed ratio {tt / tj:.2f}", flush=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, __file__, "--devices8", f"--steps={args.steps}"], env=env,
                 check=True)


if __name__ == "__main__":
  main()
