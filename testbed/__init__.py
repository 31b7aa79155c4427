"""What the tests and the benchmarks share, so that neither imports the other: tiny real models
(`tiny_models`) and a real server driven under load (`load`)."""
