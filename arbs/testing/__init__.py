"""Test support: slow, obviously-correct numpy references and hypothesis strategies."""
