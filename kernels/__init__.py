"""Triton kernels of pefops (installed as pefops.kernels), one file per op family.

Only @triton.jit functions and their launchers live here: tensors in, outputs allocated, grid and
config chosen. Autograd, modules and backend dispatch live in pefops.ops. Importing this package
does not import Triton; importing one of its modules does.
"""
