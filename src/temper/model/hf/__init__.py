"""Hugging Face interoperability: checkpoints and PEFT adapters, both ways.

files.py reads a checkpoint's weight files; config.py maps config.json <-> ModelConfig; weights.py maps state dicts by
one list of weight rules per architecture; checkpoint.py loads and saves whole directories with them; peft.py reads
and writes adapters. Nothing is re-exported here: import from the module.
"""
