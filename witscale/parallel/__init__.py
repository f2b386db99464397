"""Parallelism: the layout/topology, tensor-parallel communication and layers."""
