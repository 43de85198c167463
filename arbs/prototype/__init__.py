"""Experimental update rules and kernels, kept here until a benchmark earns them a place."""
