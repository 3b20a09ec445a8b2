"""Data for sslops-train: .beton writing (ffcv) and a decode-once multi-view loader."""
from .beton import embedded_dataset, write_beton, write_embedded
from .convert import ConvertError, write_arrays, write_imagefolder, write_npz
from .loader import BetonError, ViewLoader, eval_batches, split_indices

__all__ = ["embedded_dataset", "write_beton", "write_embedded", "ViewLoader", "eval_batches", "split_indices",
           "BetonError", "ConvertError", "write_arrays", "write_imagefolder", "write_npz"]
