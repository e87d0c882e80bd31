"""Inference: a trained segmenter on images and rasters of any size (``engine``), one legend for
many images (``legend``), K chosen without labels (``kselect``), polygons (``vector``),
adaptation to the input (``adapt``) and the Python API (``api``, re-exported by ``seglib``)."""
