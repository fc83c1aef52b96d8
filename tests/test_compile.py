"""--compile (Config.compile_model): each stage's whole step is one graph, compiled once for a whole run."""

from __future__ import annotations

from collections import Counter

import torch

from medvq.module import VQVAEModule
from medvq.run_files import CHECKPOINT_NAME
from medvq.train import train_local


def test_a_compiled_run_compiles_each_stages_whole_step_once_and_its_checkpoint_loads_eager(
    tiny_config, tmp_path, monkeypatch
):
    """Trains as jobs/train.py --compile does (train_local), with torch.compile's own inductor backend, for two epochs
    of three steps, counting the graphs it compiles: one for the training step (forward, the codebook's EMA update,
    the loss with SSIM, the metrics' sums) and one for validation, none again in the second epoch. fullgraph=True
    makes any graph break an error, and with it any read of a tensor's value in the step (.item(), a branch on a
    tensor, a shape that depends on data): the step never waits for its device."""
    compile_, compiled = torch.compile, Counter()

    def counted(function, **options):
        def backend(graph, example_inputs):
            compiled[function.__name__] += 1
            return torch._dynamo.lookup_backend("inductor")(graph, example_inputs)

        return compile_(function, backend=backend, **options)

    monkeypatch.setattr(torch, "compile", counted)
    torch._dynamo.reset()  # nothing cached from an earlier test
    config = tiny_config(compile_model=True, epochs=2, ssim_weight=0.5)
    final = train_local(config, tmp_path)
    assert compiled == {"_train_step": 1, "_val_step": 1}
    assert torch.isfinite(torch.tensor(final["val_nmse"])) and final["train_ssim"] > 0
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["state_dict"]
    VQVAEModule(config.with_changes(compile_model=False)).load_state_dict(state)  # strict: same keys
