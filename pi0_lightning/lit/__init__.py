"""Lightning integration, the only library code that imports Lightning: module, datamodule, logger."""
