"""Reading and writing user files: images and their band policy (``images``), rasters read window
by window (``rasters``), results written atomically (``outputs``)."""
