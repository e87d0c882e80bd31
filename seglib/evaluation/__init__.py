"""Measuring segmenters: metrics and baselines, scores on labelled sets (``scores``), the
leave-one-tile-out protocol (``loto``), diagnostics and benchmarks."""
