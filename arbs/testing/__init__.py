"""Test support: numpy references of the kernels (reference), the one random valid state, trit packer and exact
compare of every test and benchmark (states, numpy only), and hypothesis strategies built on them (strategies)."""
