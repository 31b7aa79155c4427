"""The model runtime: a compact Llama-family transformer that applies each row's packs."""
