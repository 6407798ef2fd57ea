"""Stead benchmarks: ``python -m bench [NAME...] [--quick]`` (see ``bench/__main__.py``).

Each benchmark runs real agents in a lab and prints a ratio against a baseline measured in
the same run (the raw link, the passive's disk, rsync over the same link, a bare Python
process), with the absolute figures beside it, its goal and whether the goal is met.
"""
