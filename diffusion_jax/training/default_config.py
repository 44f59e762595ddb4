"""Every configuration key, with its default and what it means.

The experiment configs (`experiments/configs/`: `digits.py`, `ddpm_cifar10.py`, `dit_cifar10.py`,
`tpu.py`) start from `get_config()` here and change only what differs; the code reads keys directly
(`config.train.num_steps`), so a key exists here or nowhere. Any key can be overridden on the
command line (`--config.optim.lr=1e-4`); a key that is not declared here is refused with the
nearest valid names.

`None` (a typed placeholder) means "derived" or "the component's own default", as each comment
says. The model keys are the constructor arguments of the registered models (`UNet`, `DiT`):
those left at None take the value of the `model.name` preset, and keys that belong to the other
backbone (e.g. a U-Net's `ch` when `model.name` is a DiT) are ignored with a warning, so a
backbone is swapped with overrides alone:

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits_dit \
      --config.model.name=DiT-S/2 --config.model.patch_size=1

References: the Flax examples' `configs/default.py`; STYLE.md 9 and 17.
"""
import ml_collections
from ml_collections import config_dict

_ph = config_dict.placeholder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default configuration (an unconditional DDPM on the offline digits data)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0                          # initialisation, data order and training noise

  # Data (`diffusion_jax.data.DataOptions` documents each key; it accepts exactly these).
  c.data = d = ml_collections.ConfigDict()
  d.name = "digits"                   # 'digits', 'folder', 'latents', or a TFDS name ('cifar10')
  d.data_dir = _ph(str)               # TFDS data dir; None: $DIFFUSION_JAX_DATA_DIR or ~/tensorflow_datasets
  d.split = "train"                   # training split (TFDS split syntax, e.g. 'train[:90%]')
  d.eval_split = "test"               # evaluation split (experiments.evaluate_bpd)
  d.image_size = _ph(int)             # side of the square images; None: the native size
  d.random_flip = False               # random horizontal flips while training
  d.folder = _ph(str)                 # the image folder when name == 'folder'
  d.on_corrupt = "raise"              # unreadable image: 'raise' or 'skip' (with a warning)
  d.crop = "center"                   # 'center' (central square, then resize) or 'none'
  d.resize_method = "bicubic"         # PIL filter used to resize
  d.channels = 3                      # folder images: 1 (grey) or 3 (RGB)
  d.in_memory = "auto"                # decode the split into memory: 'auto' (<= 1 GiB), True, False
  d.shuffle = True                    # shuffle the training stream each epoch
  d.download = False                  # let TFDS download and prepare a missing dataset
  d.num_threads = 4                   # grain read threads (0: read synchronously)
  d.prefetch = 4                      # prefetch depth in batches
  d.num_workers = 0                   # > 0: make batches in that many processes
  d.image_key = "image"               # TFDS feature holding the image
  d.label_key = "label"               # TFDS feature holding the label
  d.latents_dir = _ph(str)            # name == 'latents': a directory of experiments.encode_latents
  d.latent_sample = True              # latents: train on posterior samples (False: the means)
  # Text (name 'text', diffusion.family 'masked' or 'autoregressive'; `training.text_run`).
  d.text_dir = _ph(str)               # prepared corpus: train.txt, valid.txt, tokenizer.json (experiments.prepare_text)
  d.seq_len = 256                     # tokens per packed training sequence
  d.tokenizer = "char"                # 'char' (text_dir/tokenizer.json; TFDS: the train split's characters), 'byte' (UTF-8 bytes, V = 256), or 'package.module:function' returning a tokenizer
  d.tfds_name = _ph(str)              # text from TFDS instead of text_dir ('lm1b'): records of text_key in split / eval_split, from data_dir
  d.text_key = "text"                 # TFDS feature holding the text
  d.text_cache_dir = _ph(str)         # TFDS text: save the tokenized splits here once (None: encode at every start)

  # The autoencoder of a latent-diffusion run: samples are decoded by it before they are written
  # (trainer previews, experiments.sample) or measured (experiments.evaluate).
  c.autoencoder = a = ml_collections.ConfigDict()
  a.workdir = _ph(str)                # directory of experiments.train_autoencoder / convert; None: pixels
  a.decode_batch_size = 64            # latents decoded per compiled call (over the local devices)

  # Model: a preset of `diffusion_jax.models.get_model` and its constructor arguments.
  c.model = m = ml_collections.ConfigDict()
  m.name = "unet_digits"              # preset: 'unet_digits', 'ddpm_cifar10', 'DiT-S/2', ...
  # Both backbones.
  m.in_channels = _ph(int)            # None: the data's channel count
  m.num_classes = _ph(int)            # > 0: class-conditional (label num_classes = null class)
  m.learn_sigma = _ph(bool)           # output 2C channels (prediction and variance)
  m.norm_eps = _ph(float)             # GroupNorm / LayerNorm epsilon
  m.remat = _ph(bool)                 # rematerialise blocks in the backward pass
  m.attention = _ph(str)              # kernel: None ('einsum' on CPU, else JAX's), 'einsum', 'xla', 'cudnn'
  m.dtype = _ph(str)                  # computation dtype of the module ('float32', 'bfloat16')
  m.param_dtype = _ph(str)            # parameter dtype
  m.dropout = _ph(float)              # U-Net residual-block dropout
  # U-Net only.
  m.ch = _ph(int)                     # base channels; level i has ch * ch_mult[i]
  m.ch_mult = _ph(tuple)              # channel multiplier per resolution level
  m.num_res_blocks = _ph(int)         # residual blocks per level
  m.attention_levels = _ph(tuple)     # levels (0 = full resolution) with self-attention
  m.head_dim = _ph(int)               # channels per attention head (None in the preset: one head)
  m.num_groups = _ph(int)             # GroupNorm groups
  m.scale_shift = _ph(bool)           # FiLM time conditioning (ADM) instead of additive
  m.resblock_updown = _ph(bool)       # resample inside residual blocks (ADM)
  m.downsample_padding = _ph(str)     # 'asymmetric' (DDPM) or 'symmetric'
  m.mid_attention = _ph(bool)         # attention in the middle block
  m.time_embed_dim = _ph(int)         # time-embedding width (None in the preset: 4 * ch)
  m.time_flip_sin_to_cos = _ph(bool)  # [cos, sin] order of the sinusoidal time embedding
  m.time_freq_shift = _ph(float)      # denominator shift of the time-embedding frequencies
  m.fourier_exponents = _ph(tuple)    # VDM's Fourier features of the input, e.g. (6, 7); () none
  # DiT only.
  m.patch_size = _ph(int)             # side of the square patches
  m.hidden_size = _ph(int)            # transformer width
  m.depth = _ph(int)                  # number of DiT blocks
  m.num_heads = _ph(int)              # attention heads
  m.mlp_ratio = _ph(float)            # MLP width / hidden_size
  m.freq_shift = _ph(float)           # denominator shift of the time-embedding frequencies
  m.scan_blocks = _ph(bool)           # blocks as one lax.scan (unset: scanned on CPU, else unrolled)
  # Text transformer only ('text_tiny', 'text_small'; also hidden_size, depth, num_heads, mlp_ratio).
  m.vocab_size = _ph(int)             # data tokens V (id V is the mask / BOS token); 256 for bytes
  m.time_conditioning = _ph(bool)     # adaLN-Zero conditioning on t (False: the network ignores t)
  m.causal = _ph(bool)                # causal attention: the autoregressive twin
  m.tie_embeddings = _ph(bool)        # output logits through the token embedding table
  m.rope_base = _ph(float)            # rotary position embedding base

  # Diffusion: the schedule and the training objective.
  c.diffusion = f = ml_collections.ConfigDict()
  f.family = "ddpm"                   # 'ddpm' (beta schedule below), 'vdm' (c.vdm), 'edm' (c.edm); text: 'masked' (c.masked), 'autoregressive'
  f.schedule = "cosine"               # beta schedule: 'linear', 'scaled_linear', 'cosine', 'sigmoid'
  f.num_timesteps = 250               # T (vdm, edm: the steps of the schedule the samplers see)
  f.zero_terminal_snr = False         # rescale so that alpha_bar_{T-1} = 0 (pair with v prediction)
  f.prediction = "eps"                # the network's target: 'eps', 'x0' or 'v'
  f.loss_type = "mse"                 # 'mse', 'l1', 'kl' (the VLB) or 'hybrid' (mse + VLB)
  f.weighting = "none"                # regression-loss weighting: 'none', 'min_snr', 'p2'
  f.variance = _ph(str)               # reverse variance; None: 'learned_range' for hybrid, else 'fixed_small'
  f.min_snr_gamma = 5.0               # gamma of the min-SNR weighting
  f.p2_gamma = 1.0                    # gamma of the P2 weighting
  f.p2_k = 1.0                        # k of the P2 weighting
  f.vlb_weight = 0.001                # lambda of the hybrid loss
  # Arguments of the beta schedule (None: the schedule's default; set only those it takes).
  f.schedule_kwargs = s = ml_collections.ConfigDict()
  s.beta_start = _ph(float)           # 'linear', 'scaled_linear': first beta
  s.beta_end = _ph(float)             # 'linear', 'scaled_linear': last beta
  s.rescale = _ph(bool)               # 'linear': scale the betas by 1000 / T
  s.s = _ph(float)                    # 'cosine': offset s
  s.max_beta = _ph(float)             # 'cosine', 'sigmoid': beta clip
  s.start = _ph(float)                # 'sigmoid': start of the sigmoid range
  s.end = _ph(float)                  # 'sigmoid': end of the sigmoid range
  s.tau = _ph(float)                  # 'sigmoid': temperature

  # VDM (diffusion.family = 'vdm'; diffusion.prediction must be 'eps'): the continuous-time VLB
  # in the log-SNR gamma(t), trained in bits/dim (`training.families`, `diffusion_jax.vdm`).
  c.vdm = v = ml_collections.ConfigDict()
  v.gamma = "learned"                 # 'learned' (monotonic network, learned end points), 'linear', 'cosine'
  v.gamma_min = -13.3                 # gamma(0) (the learned schedule's initial value)
  v.gamma_max = 5.0                   # gamma(1) (the learned schedule's initial value)
  v.num_features = 1024               # hidden width of the learned schedule's monotonic network
  v.antithetic = True                 # low-discrepancy times over the batch
  v.variance_minimising = False       # learned shape follows grad of E[L^2] (VDM sec. 5.2; 2x the step's cost)
  v.num_steps = 0                     # 0: continuous-time bound; T > 0: the T-step discrete bound
  v.decoder = "8bit"                  # reconstruction term: '8bit' (256-level softmax) or 'gaussian'

  # EDM (diffusion.family = 'edm'; diffusion.prediction must be 'x0'): the preconditioned
  # denoiser and its loss (`diffusion_jax.edm`); sampled on the rho = 7 grid (sampler 'heun').
  c.edm = e = ml_collections.ConfigDict()
  e.precond = "edm"                   # preconditioning: 'edm', 've' or 'vp' (EDM table 1)
  e.sigma_data = 0.5                  # data standard deviation in c_skip, c_out, c_in
  e.p_mean = -1.2                     # training ln(sigma) ~ N(p_mean, p_std^2)
  e.p_std = 1.2
  e.sigma_min = 0.002                 # the sampling table's (and Karras grid's) smallest sigma
  e.sigma_max = 80.0                  # and largest

  # Masked diffusion (diffusion.family = 'masked'; `diffusion_jax.masked`): the training NELBO.
  c.masked = k = ml_collections.ConfigDict()
  k.schedule = "linear"               # mask schedule: 'linear', 'cosine', 'polynomial'
  k.schedule_kwargs = ml_collections.ConfigDict({"exponent": _ph(float)})  # 'polynomial': exponent
  k.num_steps = 0                     # 0: continuous-time bound; T > 0: the T-step bound
  k.t_min = 0.0                       # times drawn in (t_min, 1] (> 0 lowers the variance; then not a bound)

  # Optimizer: clip, Adam / AdamW, warmup then decay.
  c.optim = o = ml_collections.ConfigDict()
  o.name = "adam"                     # 'adam' or 'adamw'
  o.lr = 2e-3                         # peak learning rate
  o.warmup_steps = 100                # linear warmup from 0
  o.decay = "cosine"                  # after warmup: 'constant', 'cosine' or 'linear'
  o.end_lr_factor = 0.0               # final lr = end_lr_factor * lr (cosine, linear)
  o.grad_clip = 1.0                   # clip by global norm (0 or None: no clipping)
  o.weight_decay = 0.0                # AdamW decoupled weight decay
  o.b1 = 0.9                          # Adam beta1
  o.b2 = 0.999                        # Adam beta2
  o.eps = 1e-8                        # Adam epsilon
  o.accumulate = 1                    # > 1: average gradients over that many steps per update

  # Training loop.
  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 2000                  # optimizer steps
  t.batch_size = 64                   # global batch (a multiple of the device count)
  t.steps_per_call = 1                # steps fused in one compiled call (lax.scan)
  t.parallel = "auto"                 # 'auto' (jit on one device, pmap on several), 'jit', 'pmap', 'shard_map'
  t.compute_dtype = "float32"         # forward-pass dtype: 'float32' or 'bfloat16'
  t.cpu_convolutions = "xla"          # CPU train step's convolutions (jit / shard_map modes): 'xla' or 'ynnpack' (diffusion_jax/xla_cpu.py)
  t.ema_decays = (0.999,)             # EMA copies of the params, one per decay
  t.label_dropout = 0.1               # class-conditional models: label -> null class with this probability
  t.checkpoint_every = 500            # steps between checkpoints (0: only at the end)
  t.snapshot_every = 0                # checkpoints at multiples of this are kept forever (0: none)
  t.keep_latest = 2                   # other checkpoints kept
  t.log_every = 100                   # steps between log lines (0: about 100 per run)
  t.sample_every = 0                  # steps between sample grids (0: one grid at the end)

  # Sample grids written while training (experiments.sample takes its own flags).
  c.sample = p = ml_collections.ConfigDict()
  p.sampler = "ddpm"                  # a sampler of `diffusion_jax.samplers.get_sampler`
  p.num_samples = 100                 # images in each grid (0: none)
  p.variance = _ph(str)               # None: the run's diffusion.variance
  p.clip_denoised = True              # clip predicted x0 to [-1, 1] (ddpm, ddim)
  p.ema_decay = _ph(float)            # EMA params used; None: the first of train.ema_decays
  p.steps = _ph(int)                  # steps on the sampler's default grid; None: all T (ddpm)
  p.guidance_scale = 1.0              # classifier-free guidance (class-conditional models)
  p.kwargs = ml_collections.ConfigDict()  # further settings of the sampler (from a config file)
  # Text runs: the previews are `num_samples` texts in samples/step_N.txt.
  p.text_steps = _ph(int)             # masked diffusion sampler steps; None: data.seq_len
  p.temperature = 1.0                 # text: divides the log-probabilities
  p.top_p = 1.0                       # text: nucleus mass (1: off)

  # In-training evaluation (`diffusion_jax.evaluation.hook`): a metric of samples every
  # `every` steps, logged as eval/<metric>; the best step's checkpoint is kept in DIR/best/.
  c.eval = e = ml_collections.ConfigDict()
  e.every = 0                         # steps between evaluations (0: off; also at the last step when on)
  e.num_samples = 500                 # samples per evaluation (a Frechet distance's bias grows ~1/N)
  e.metric = "digits_fd"              # 'digits_fd' (digits classifier features) or 'fid' (Inception)
  e.ref = "digits"                    # 'digits' (held-out digits), or a statistics .npz for 'fid'
  e.inception_weights = _ph(str)      # pytorch-fid's pt_inception-2015-12-05-6726825d.pth ('fid')
  e.sampler = _ph(str)                # None: sample.sampler (with sample.* settings)
  e.steps = _ph(int)                  # sampler steps on its default grid; None: the sampler's default
  e.batch_size = 100                  # samples per sampling call and images per feature batch
  return c
