"""Bringing a model onto the node: the job registry (``jobs``) and one job as its waiters see
it (``job``), one job's pipeline, list → headers → download → verify → commit (``pipeline``),
what running downloads hold (``ledger``), the safetensors headers read first (``headers``),
the snapshot clients use while it downloads (``early``), download order (``schedule``), the
download engine (``engine``) and resume records (``resume``).

May import: ``storage``, ``sources``, ``observe``, ``records``, ``config`` and layer 0; never
``cache``, the edges or the server (docs/architecture.md, "Packages").
"""
