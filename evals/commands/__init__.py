"""The `skillpack` sub-commands that run research code (eval, fusion-eval, graft), one module each.

skillpacks/cli.py names them by module path and imports only the one that runs.
"""
