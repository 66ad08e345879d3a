"""`labkit.training.sharding` on two CPU processes sharded by torch's FSDP 2 (`fully_shard` over gloo), as
`accelerate launch --config_file configs/accelerate/fsdp.yaml` shards a model on GPUs (Accelerate 1.16 enables FSDP
for GPU processes only, so its own wrapping cannot run here; what is ours, gathering for evaluation and saving, can).

The tiny MLLM is built twice from one seed on each process: once whole, once with every decoder layer and the root
sharded (TRANSFORMER_BASED_WRAP on the decoder layer). Inside `full_parameters` stage 2's own evaluation and its
plain-caption `<s>` probe (which calls the LLM itself, not the sharded root's forward) give the whole model's numbers;
`full_state_dict` gives its tensors bit for bit; afterwards the parameters are shards again and a training step
runs. (Without `full_parameters` the probe fails: the embedding is a shard.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from labkit.core.paths import project_root

pytestmark = pytest.mark.slow  # launches two processes

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from labkit.core.presets import get_preset
    from labkit.data.frames import load_frames
    from labkit.data.storystream_mini import load_tokenizer
    from labkit.inference.attention import plain_bos_ratios
    from labkit.training.lm import caption_probe
    from labkit.models.mllm import SeedStoryMLLM
    from labkit.training.sharding import full_parameters, full_state_dict, is_sharded
    from labkit.training.stage2 import StoryChunks, evaluate, validation_batches, _loss

    sample, result = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    preset, tokenizer = get_preset("tiny"), load_tokenizer(sample)
    captions = load_frames(sample, "val").captions
    generator = torch.Generator().manual_seed(0)
    sizes = preset.visual_tokenizer
    shape = (len(captions), len(captions[0]), sizes.num_features, sizes.feature_dim)
    features = torch.randn(shape, generator=generator)
    chunks = StoryChunks.from_split(captions, features, preset.data.chunk_length)
    batches = validation_batches(chunks, tokenizer, preset)

    def build():
        torch.manual_seed(1)
        return SeedStoryMLLM(preset, tokenizer.vocab_size).eval()

    whole, sharded = build(), build()
    for layer in sharded.causal_lm.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    probe = caption_probe(tokenizer, captions)
    expected = plain_bos_ratios(whole.causal_lm, probe, tokenizer.pad_id), evaluate(whole, batches, tokenizer)

    def backward():  # as a training step leaves the model (no optimizer step: the weights stay the whole model's)
        sharded.train()
        loss, _ = _loss(sharded, batches[0])
        loss.backward()
        sharded.zero_grad(set_to_none=False)
        return loss

    backward()
    # the probe first: it calls the LLM itself, not the root's forward (after which FSDP 2 keeps the root gathered)
    with full_parameters(sharded.eval()):
        inside = plain_bos_ratios(sharded.causal_lm, probe, tokenizer.pad_id), evaluate(sharded, batches, tokenizer)
    state, reference = full_state_dict(sharded), whole.state_dict()
    loss = backward()
    record = {
        "sharded": is_sharded(sharded),
        "metrics_equal": list(inside) == list(expected),
        "metrics": [inside, expected],
        "keys_equal": sorted(state) == sorted(reference),
        "tensors_equal": all(torch.equal(state[k], reference[k]) for k in reference),
        "shards_after": all(isinstance(p, DTensor) for p in sharded.parameters()),
        "loss_finite": bool(torch.isfinite(loss)),
        "gradients": all(p.grad is not None for p in sharded.parameters() if p.requires_grad),
    }
    records = [None, None]
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        open(result, "w").write(json.dumps(records))
    dist.destroy_process_group()
    """
)


def test_sharded_mllm_evaluates_and_saves_as_the_whole_model(tmp_path):
    script, result = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER, encoding="utf-8")
    sample = project_root() / "data_samples" / "storystream-mini"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        [*command, str(sample), str(result)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    first = done.stderr.find("Traceback")  # a worker's own traceback comes before torchrun's summary of it
    assert done.returncode == 0, done.stderr[first : first + 4000] if first >= 0 else done.stderr[-4000:]
    for rank, record in enumerate(json.loads(result.read_text())):
        assert record["sharded"] and record["shards_after"], rank
        assert record["metrics_equal"], (rank, record["metrics"])
        assert record["keys_equal"] and record["tensors_equal"], rank
        assert record["loss_finite"] and record["gradients"], rank
