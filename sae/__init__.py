"""Sparse autoencoders: models (one small module per architecture), trainers, metrics, checkpoints, interop.

Public entry points: `sae.checkpoint.load_saes / load_sae` (loader), `sae.train.train` (strata train),
`sae.evaluate.evaluate` (strata eval), `sae.saelens.export_saelens / import_saelens`.
"""
