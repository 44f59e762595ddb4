"""The DiT learns digits: `experiments/configs/dit_digits.py` trained once, sampled, scored.

One session fixture trains the class-conditional, learned-sigma variant
(`dit_digits.py:cond,learned_sigma`: the DiT paper's recipe with label dropout 0.1 and the hybrid
loss) with `experiments.train` on one CPU device, as a user would. The checks score its samples
with the library's digits metric (`diffusion_jax.evaluation.digits`):

- 500 samples (labels 0..9 cycled, guidance 1) against the held-out digits: Frechet distance and
  classifier confidence held to the issue's rule "within 1.3x of the U-Net". The U-Net is not
  trained here (a second 2,000-step run would double the slow job); its figure is stood in for by
  real training digits, 500 at a time, scored the same way, which the digits U-Net matches
  (README table), so the bound is 1.3 x the real 500-image figure.
- 500 samples at guidance 3: the classifier must read the asked label (the U-Net reaches 1.00
  at guidance 3; bound 0.9, decided before the DiT was measured).
- the run samples with its learned variance (`learned_range` in the saved config, two output
  channels).

The 1.3x rule (issue 17) and the 0.9 accuracy were written before any DiT figure was measured;
the real stand-in was first one 500-image subset, then the mean over three once the subsets were
seen to differ by 26 (a change toward the U-Net's own figure, not toward the DiT's).
"""
import os
import subprocess
import sys

import digits_quality
import numpy as np
import pytest
import shared_runs
import training_testlib as tl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dit")]

NUM_SAMPLES = 500
CONFIG = "experiments/configs/dit_digits.py:cond,learned_sigma"


@pytest.fixture(scope="session")
def dit_run(tmp_path_factory):
  """Workdir of the DiT digits run (trained once per test run, shared by the xdist workers)."""
  def build(root):
    workdir, data_dir = str(root / "run"), str(root / "tfds")
    cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
    if os.environ.get("DIGITS_TEST_STEPS"):
      steps = int(os.environ["DIGITS_TEST_STEPS"])
      cmd += [f"--config.train.num_steps={steps}", f"--config.train.checkpoint_every={steps}"]
    proc = subprocess.run(cmd, env=tl.subprocess_env(1), cwd=tl.REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"workdir": workdir}

  return shared_runs.run_once(tmp_path_factory, "dit_digits_shared", build)[1]["workdir"]


def _sample(workdir: str, out: str, *flags: str) -> tuple[np.ndarray, np.ndarray]:
  proc = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={workdir}",
                         f"--num_samples={NUM_SAMPLES}", f"--out={out}", "--seed=0", *flags],
                        env=tl.subprocess_env(1), cwd=tl.REPO, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = np.load(out)
  return data["images"], data["labels"]


def _probs(images: np.ndarray) -> np.ndarray:
  from diffusion_jax.evaluation import digits  # pylint: disable=import-outside-toplevel
  logits, _ = digits._forward(images, digits.DEFAULT_SETTINGS, 500)  # pylint: disable=protected-access
  logits = logits.astype(np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True)


# Issue 17: the patch 1 DiT at 2,000 steps scored 148-190 against this bound; the patch 2 DiT
# trained for 9,000 steps (in ~1.7x the U-Net's time) is the config now (docs/dit_digits_table.md).
def test_dit_samples_are_as_good_as_the_unets(dit_run, tmp_path):
  from diffusion_jax.evaluation import digits  # pylint: disable=import-outside-toplevel
  images, labels = _sample(dit_run, str(tmp_path / "s.npz"))
  assert images.shape == (NUM_SAMPLES, 8, 8, 1)
  np.testing.assert_array_equal(labels, np.arange(NUM_SAMPLES) % 10)
  train = digits._split("train")[0]  # pylint: disable=protected-access
  held_out = digits._split("test")[0]  # pylint: disable=protected-access
  # The U-Net's stand-in: real digits scored with the same N. One 500-image subset is a noisy
  # reference (the three disjoint thirds of the training split score 70, 96 and 96), so the mean
  # over the thirds; the Quickstart U-Net's 500 samples score about that (89 vs 87, README).
  fd_real = float(np.mean([digits.digits_frechet_distance(train[i:i + NUM_SAMPLES])
                           for i in range(0, len(train) - NUM_SAMPLES + 1, NUM_SAMPLES)]))
  fd = digits.digits_frechet_distance(images)
  conf, conf_real = _probs(images).max(1).mean(), _probs(held_out).max(1).mean()
  print(f"\nDiT: Frechet {fd:.1f}, confidence {conf:.3f}; real: Frechet {fd_real:.1f} "
        f"({NUM_SAMPLES} training digits), confidence {conf_real:.3f} (held-out digits)")
  assert fd < 1.3 * fd_real, (fd, fd_real)
  # The U-Net digits test's rule: mean confidence within 0.1 of real held-out digits'.
  assert conf > conf_real - 0.1, (conf, conf_real)
  # And the U-Net's quality checker (tests/digits_quality.py), on 200 samples as it is run there.
  report, failed = digits_quality.check(images[:200, ..., 0].astype(np.float64) * 16.0 / 255.0)
  assert not failed, (failed, report)


# The patch 1 DiT at 2,000 steps measured 0.896 here (bound 0.9, fixed beforehand; issue 17).
def test_guided_dit_draws_the_asked_digit(dit_run, tmp_path):
  images, labels = _sample(dit_run, str(tmp_path / "g.npz"), "--guidance_scale=3")
  acc = float(np.mean(_probs(images).argmax(1) == labels))
  print(f"\nlabel accuracy at guidance 3: {acc:.3f}")
  assert acc >= 0.9, acc


def test_dit_run_samples_with_its_learned_variance(dit_run):
  from diffusion_jax.training import restore  # pylint: disable=import-outside-toplevel
  loaded = restore.load_for_sampling(dit_run)
  assert loaded.config.diffusion.variance == "learned_range"
  assert loaded.model.learn_sigma and loaded.model.out_channels == 2
