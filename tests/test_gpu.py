"""Device-dependent paths, run on every device present: the CPU here, CUDA on a GPU machine
(`pytest -m gpu`, gpu/check-real-size.sh). Autocast training steps, peak-memory figures, and the
attention capture against eager `output_attentions` on the device."""

import pytest
import torch

from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.data.formats import load_split
from drivekd.models.capture import capture, text_rows
from drivekd.models.loading import LoadOptions, load_backend

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
)
DEVICES = ["cpu", CUDA]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "data"
    generate(out, GenerateConfig(scenes=2, seed=31))
    return load_split(out, "train")[:4]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_autocast_training_steps_lower_the_loss(device, precision, samples):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from drivekd.train.sft import cross_entropy

    if device == "cpu" and precision != "no":
        pytest.skip("autocast is what a GPU runs (bf16 matrix products on this CPU are ~70x slower)")
    AcceleratorState._reset_state(reset_partial_state=True)  # one process, several precisions
    torch.manual_seed(0)
    backend = load_backend("tiny-internvl-student", LoadOptions(device=device))
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    optimizer = torch.optim.AdamW(backend.model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(backend.model, optimizer)
    batch = backend.build_batch(samples).to(device)
    losses = []
    for _ in range(8):
        with accelerator.autocast():
            loss = cross_entropy(model, batch)["ce"]
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert next(backend.model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize("device", DEVICES)
def test_peak_memory_figure_covers_the_weights(device):
    from drivekd.bench.memory import peak_mb, reset_peak

    dev = torch.device(device)
    reset_peak(dev)
    backend = load_backend("tiny-internvl-teacher", LoadOptions(device=device))
    weights = sum(p.numel() * p.element_size() for p in backend.model.parameters()) / 2**20
    peak, source = peak_mb(dev)
    assert peak >= weights > 0
    assert ("cuda" in source) == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_capture_equals_eager_on_the_device(device, samples):
    backend = load_backend("tiny-qwen25vl-student", LoadOptions(device=device))
    backend.model.eval()
    batch = backend.build_batch(samples[:3]).to(device)
    valid = batch.inputs["attention_mask"].bool()
    index, row_valid = text_rows(batch.inputs["attention_mask"], batch.visual_mask)
    with torch.no_grad():
        backend.set_attention("eager")
        eager = backend.model(**batch.inputs, output_attentions=True).attentions
        backend.set_attention("sdpa")
        with capture(backend, [0], row_layers=[1], row_index=index) as maps:
            backend.model(**batch.inputs)
    rows = valid[:, :, None].expand(-1, -1, valid.shape[1])
    assert (maps[0] - eager[0].mean(1))[rows].abs().max() < 1e-4
    want = eager[1].mean(1).gather(1, index[:, :, None].expand(-1, -1, valid.shape[1]).to(device))
    assert (maps.rows[1] - want)[row_valid].abs().max() < 1e-4
