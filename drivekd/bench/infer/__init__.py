"""`drivekd bench infer`: deployment figures per model (the paper's Table 1 columns).

Every model (and the optional int8 variant of the last one) runs in a fresh process
(`drivekd.bench.isolated`, which calls `worker.measured(spec)` and prints its result; by hand:
`python -m drivekd.bench.infer --worker SPEC_JSON`). Per model:

- params: parameter count (of the float model, before any quantisation);
- peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set of the worker
  (`VmHWM`) while it serves the prompt, i.e. with the model loaded (and quantised) and running. The
  load transient is excluded (peak reset once the model is ready; `load_peak_mb` keeps it) so an
  int8 variant quantised on the fly is not charged for its float copy. `ru_maxrss` is not used: after
  fork+exec Linux carries the parent's peak into it;
- first-token latency: prefill (vision encoder + prompt) and the greedy pick of the first token, batch
  already tokenised and on the device (`preprocess_s` reports the image/tokenising step separately);
- decode throughput: `batch * (new_tokens - 1)` tokens over the time of the remaining decode steps.
  EOS is suppressed, so exactly `new_tokens` tokens are generated (as `min_new_tokens` does in HF).

`driver` checks the arguments and starts the workers; `worker` measures one model, with `int8`
(quantisation), `timing` (greedy decoding over the KV cache) and `memory` (peaks).
"""

from drivekd.bench.infer.driver import bench_infer, render_table

__all__ = ["bench_infer", "render_table"]
