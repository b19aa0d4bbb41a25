"""beit: BEiT pre-training of Vision Transformers from an offline dVAE token store.

The Python API (`beit.api`, imported when first used, so that `import beit` stays light):

    beit.open_store(location) -> beit.Store      a token store and what it holds, its views
    beit.MaskedImageDataset(location, seed=0)    its samples for a torch DataLoader
    beit.load_model(path) -> torch.nn.Module     any checkpoint beit reads
    beit.load_tokenizer(path) -> torch.nn.Module images -> token grids
    beit.ModelConfig, beit.BeitForMIM, beit.BeitClassifier   the models, to build your own
"""

__version__ = "0.1.0"

_API = (
    "Store", "MaskedImageDataset", "open_store", "load_model", "load_tokenizer",
    "ModelConfig", "BeitForMIM", "BeitClassifier",
)  # fmt: skip
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from beit import api

        return getattr(api, name)
    raise AttributeError(f"module 'beit' has no attribute {name!r}")
