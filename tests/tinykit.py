"""The smallest model the tests build, shared so every file means the same "tiny".

48 px images in 12 px patches (16 patches) with the plain patch stem (12 is not a power of two),
one encoder block, a 32-wide decoder with one KV head. Files add their own decoder depth,
context and data limits.
"""

TINY_PARTS = (
    "encoder.image_size=48", "encoder.patch_size=12", "encoder.stem=patch", "encoder.width=32", "encoder.depth=1",
    "encoder.n_heads=2", "encoder.mlp_dim=64",
    "decoder.width=32", "decoder.n_heads=2", "decoder.n_kv_heads=1", "decoder.mlp_dim=64",
)
