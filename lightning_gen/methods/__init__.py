"""Methods: one LightningModule per file under ssl/ and generative/, registered by name."""
