"""Where bytes and facts rest on the node: the content-addressed blob store (``blobs``), the
SQLite index (``index``) and the symlink views path-based frameworks open (``views``).

May import: ``records``, ``config``, ``safetensors_format``, ``uris``; nothing of ingest, cache
or the edges (docs/architecture.md, "Packages").
"""
