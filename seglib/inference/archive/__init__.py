"""Archive-scale inference on dask.distributed: thousands of rasters or one huge mosaic, one
legend, the same command on a laptop (a local cluster of N worker processes) or a cluster.

    python -m seglib.predict --input 'ortho/*.tif' --k 6 --output labels/ --shared-legend --workers 2
    python -m seglib.predict --input county.vrt --k 6 --output labels/ --scheduler tcp://host:8786

- ``jobs``: settings, inputs (folder, glob, file, VRT) and the row blocks of large rasters;
- ``tasks``: what the workers run (a file, a block, a legend sample), each returning a record;
- ``record``: the resume manifest and the run summary;
- ``run``: the client (``segment_archive``, ``fit_archive_legend``); ``cluster``: starting the client.

Only ``run`` and ``cluster`` import dask; the single-process command never imports this package.
"""

from .jobs import BLOCK_SIZE, Settings, expand_inputs
from .run import fit_archive_legend, segment_archive

__all__ = ["BLOCK_SIZE", "Settings", "expand_inputs", "fit_archive_legend", "segment_archive"]
