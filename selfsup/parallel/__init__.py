"""Placement over devices and hosts: the mesh and sharding rules (`sharding`), and several
processes as one program (`distributed`: `jax.distributed`, barriers, the stop vote).
"""
