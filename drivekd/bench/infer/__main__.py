"""`python -m drivekd.bench.infer --worker SPEC_JSON`: the worker process that `bench_infer` starts per model."""

import sys

from drivekd.bench.infer.worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
