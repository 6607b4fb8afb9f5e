"""Peer implementations of the MAML speed benchmark, one subprocess per library.

Every module here imports only the standard library, torch, numpy and (lazily) the peer library,
never metafunc: the peers run in their own virtual environment (``.peers-venv``). See
``benchmarks/peers/README.md`` for the protocol: spec JSON in, result JSON out.
"""
