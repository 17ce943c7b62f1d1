"""The CUDA sources of gpucabac's GPU engine, shipped as package data (`gpucabac.kernels`).

The repository keeps them in the top-level kernels/ directory; pyproject.toml maps it into the
package. gpucabac/engines/kernel_source.py reads and assembles them; gpucabac/engines/gpu.py compiles them.
"""
