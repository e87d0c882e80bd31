"""Research experiments on seglib, run from the repository root (``python -m experiments.<name>``);
README.md lists them with their commands, LOG.md is the dated lab log."""
