"""HistoSeek: content-based retrieval of H&E histopathology patches.

This package holds the command line and the small torch-free pieces that every stage
shares (dataset manifests, image decoding, atomic writes, retrieval metrics), so that
`server/` and `demo/` can use them without importing torch or `training/`.
"""
