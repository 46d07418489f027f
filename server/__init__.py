"""The search service: everything between a running Triton and a client, torch-free.

Top level (reached by the API and the CLI alike): the Triton client (`triton`, `embedder`),
the search core (`search`, `image_cost`, `job`), the served evaluation and the CLI's search.
Rooms: `index/` (index folders, their store and backends, builds; imports only the top's
embedder), `slides/` (slide search and viewing; imports index and the core), `api/` (the
FastAPI app and the HTTP edge; imports everything here, nothing here imports it).
Never imports torch, `training/`, `benchmarks/` or the command line.
"""
