"""Simulation environments and the subprocess worker pool; imports no model code."""
