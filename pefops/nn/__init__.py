"""Drop-in torch.nn modules built on pefops.ops."""
