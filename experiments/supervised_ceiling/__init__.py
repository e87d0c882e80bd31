"""How far labels lift the bundled architecture under its head on a held-out tile (``ceiling``),
and the committed results (``*.json``); LOG.md, "How far labels go"."""
