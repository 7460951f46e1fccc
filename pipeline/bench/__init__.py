"""``pulse bench``: side-by-side benchmarks of the pipeline against a floor and a naive baseline."""
