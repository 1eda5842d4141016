"""``cachectl``, the operator CLI: talks to the daemon only over the admin socket (gRPC), so it
imports the client's wire contract and nothing of the daemon's internals.
"""
