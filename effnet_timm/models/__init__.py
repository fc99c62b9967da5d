"""The network: architecture table, TF-exact layers and blocks, the EffNetV1 module, memory-lean training, fusion."""
