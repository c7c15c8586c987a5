"""Counterparts of `horovod.common` that PyTorch scripts import."""
