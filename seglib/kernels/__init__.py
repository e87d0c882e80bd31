"""Fused formulations of the hot ops, each beside its reference version.

``numerics`` picks the formulation (fused training / reference / inference); ``kmeans`` the soft
k-means EM iterations (custom backward) and the farthest-point initialisation; ``bilateral`` the
head's denoising filter; ``pooling`` window and block means; ``adamw`` the flat-buffer AdamW
with its on-device step skip; ``weighted_sum`` a loss's weighted terms as one dot product.
``tests/test_kernels.py`` holds every fused form against its reference.
"""
