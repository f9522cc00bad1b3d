"""The three levels every dataset, model and table shares.

``bin``: the target units (Visium HD 8 or 16 um bins, Visium 55 um spots, legacy ST
100 um spots), each with an image patch centred on it. ``spot``: a non-overlapping grid of
spot-sized tiles (56 um over 8 um bins); each unit lies in the tile that holds its centre.
``region``: a coarser grid of tiles (128 um) for tissue context.
"""

LEVELS: tuple[str, str, str] = ("bin", "spot", "region")
