"""layerpar_fast: layer-parallel training of deep residual networks.

The serial-parallel hybrid (SPH) method: K stages trained in parallel on penalty or
augmented-Lagrangian local losses with per-sample auxiliary variables at the cuts, downsampling
filters on what is stored and sent, then a serial back-propagation phase with augmentation.
See README.md and docs/ALGORITHM.md.
"""
__version__ = "0.1.0"
