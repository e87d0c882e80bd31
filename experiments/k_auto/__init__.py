"""The study behind ``--k auto``'s rule (``study``); ``python -m experiments.k_auto`` runs it."""
