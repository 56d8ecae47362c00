"""MultiID-2M builder and reader: photo collections → paired multi-person WebDataset shards (Ray Data).

Heavy dependencies (ray, faiss, webdataset, matplotlib) are imported inside the functions that need them.
"""

from .errors import DatasetError, InputError, UnsafePickleError

__all__ = ["DatasetError", "InputError", "UnsafePickleError", "build_dataset", "iter_samples", "iter_references",
           "read_cluster_centers", "read_negative_pool", "load_npy_restricted"]


def __getattr__(name: str):
    if name == "build_dataset":
        from .pipeline import build_dataset

        return build_dataset
    if name in ("iter_samples", "iter_references", "read_cluster_centers", "read_negative_pool",
                "load_npy_restricted"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(name)
