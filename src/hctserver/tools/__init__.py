"""What a person runs: the command line, the demo, the benchmarks, top."""
