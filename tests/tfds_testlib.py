"""Builds one of the offline synthetic TFDS datasets (diffusion_jax.data.synthetic*) in a test."""
import tensorflow_datasets as tfds


def build_array_record(data_dir: str, name: str) -> str:
  """Prepares TFDS dataset `name` (e.g. 'synthetic_images/tiny') as ArrayRecord in data_dir,
  with the real TFDS machinery and no TensorFlow; returns data_dir."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  assert "array_record" in str(builder.info.file_format).lower()
  return data_dir
