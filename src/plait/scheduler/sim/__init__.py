"""Trace-driven simulation of cluster scheduling policies on the Pollux artifact's workloads."""
