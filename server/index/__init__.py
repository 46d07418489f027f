"""Index folders: manifest, item store, vector backends (FAISS, Milvus), filters, builds, Ray.

May import the ground (`histoseek`), `export.repository` and the Triton client
(`server.embedder`); never the search core, `server.slides` or `server.api`.
"""
