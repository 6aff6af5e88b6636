"""Test support shared by the test suite and by anyone checking a probe end to end.

`value_jax.testing.planted`: tiny UNITER / LXMERT checkpoints and Flickr30k Entities data whose
weights and features are set so that each VALUE analysis has a known answer.
"""
