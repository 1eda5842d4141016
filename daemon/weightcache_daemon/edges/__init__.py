"""The daemon's edges: gRPC handlers (``handlers``), core records → wire messages
(``convert``) and the descriptor socket (``fdserver``). Each validates, calls the core,
converts and maps errors, nothing else.

May import: ``cache`` and every lower layer (docs/architecture.md, "Packages").
"""
