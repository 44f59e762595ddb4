"""diffusion_jax.data: TFDS (ArrayRecord, no TensorFlow) / image-folder / digits input pipeline.

`make_train_iterator(data_config, *, global_batch_size, seed, process_index, process_count,
num_local_devices)` yields {'image': float32 [devices, per_device_batch, H, W, C] in [-1, 1],
'label': int32 [devices, per_device_batch]} with get_state()/set_state(); `make_eval_iterator`
gives a finite, masked pass over the test split. Knows nothing of models.
"""
from diffusion_jax.data.digits import Digits, digits_to_uint8, uint8_to_digits
from diffusion_jax.data.options import DataOptions, default_data_dir
from diffusion_jax.data.pipeline import (EvalIterable, ShuffledStream, TrainIterator, flip_mask,
                                         get_dataset_info, load_split_as_numpy,
                                         make_eval_iterator, make_train_iterator, to_float)
from diffusion_jax.data.sources import ArraySource, DatasetInfo, TfdsSource, open_source
from diffusion_jax.data.folder import FolderSource, open_folder
from diffusion_jax.data.synthetic import SyntheticImages

__all__ = [
    "ArraySource", "DataOptions", "DatasetInfo", "Digits", "EvalIterable", "FolderSource",
    "ShuffledStream", "SyntheticImages", "TfdsSource", "TrainIterator", "default_data_dir", "digits_to_uint8",
    "flip_mask", "get_dataset_info", "load_split_as_numpy", "make_eval_iterator",
    "make_train_iterator", "open_folder", "open_source", "to_float", "uint8_to_digits",
]
