"""beit: BEiT pre-training of Vision Transformers from an offline dVAE token store."""

__version__ = "0.1.0"
