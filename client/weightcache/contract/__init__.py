"""The contract the client, the daemon and cachectl share, in one place both sides import.

- ``errors``: the error tree and its one table to and from gRPC status codes.
- ``paths``: socket names, default locations, and how a socket directory is resolved.
- ``fdproto``: the framing of fd.sock (length-prefixed protobuf, descriptors as SCM_RIGHTS).
- ``ranges``: sorted, merged byte ranges (what a streaming download has on disk).
- ``readahead``: asking the kernel for a file range ahead of use, one readahead window a call.

The messages themselves are generated from ``protos/weightcache/v1/weightcache.proto`` into
``weightcache.v1``. ``weightcache.errors`` and ``weightcache.paths`` are the public names of
the first two for client code.
"""
