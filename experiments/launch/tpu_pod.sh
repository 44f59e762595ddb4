#!/usr/bin/env bash
# Launch a training run on every worker of a TPU pod slice. Each worker runs the same command;
# --distributed makes experiments.train call jax.distributed.initialize() (auto-detected on TPU).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket \
#     experiments/launch/tpu_pod.sh experiments/configs/tpu.py:ddpm_cifar10 runs/ddpm_c10
#
# Rerunning the same command after a preemption resumes from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?config, e.g. experiments/configs/tpu.py:ddpm_cifar10}
RUN=${2:?run name under the bucket, e.g. runs/ddpm_c10}
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET}"
REPO_URL=${REPO_URL:-https://github.com/YOUR_ORG/diffusion_jax.git}
shift 2
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d diffusion_jax ]; then git clone $REPO_URL diffusion_jax; fi
  cd diffusion_jax && git pull --ff-only
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q --no-deps -e .
  python -m experiments.train --config=$CONFIG --workdir=$BUCKET/$RUN --distributed \
    --config.data.data_dir=$BUCKET/tensorflow_datasets $*
"
