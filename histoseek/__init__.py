"""HistoSeek's ground: the small torch-free pieces every stage shares.

Dataset manifests, image decoding, slide reading (`slides/`), atomic writes, checksums,
retrieval metrics, errors and child processes. It imports no stage (`training`, `export`,
`server`, `demo`, `benchmarks`) and not the command line (`histoseek_cli`), so that every
stage, including the torch-free `server/` and `demo/`, can build on it.
"""
