"""The pack library: format, fingerprint, build, compression, budget, merge, PEFT I/O, the
`model: auto` classifier and the `skillpack` CLI. Research code sits above it, in skillpack_evals."""
