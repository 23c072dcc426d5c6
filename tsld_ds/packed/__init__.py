"""The packed format: compressed-tensors "pack-quantized" integer weights and the matmul's PyTorch
reference (`format`), the Linear modules that compute with them at inference (`linear`, through
the Triton kernels of `tsld_ds.ops` where they run), and loading a packed directory as a causal LM
(`load`). Import from the submodules."""
