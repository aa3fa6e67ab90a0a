"""Models built from the leaf layers: config, blocks, stacks, language models."""
