"""The leave-one-tile-out study of the dev split: its research methods (``methods``), its command
(``python -m experiments.loto``), the committed results (``*.json``) and the compute curve (``curve``)."""
