"""`sample.generate(batch_size=...)`: batching changes speed, not which images come out."""

from __future__ import annotations

import numpy as np


def test_batched_generation_matches_one_at_a_time(tiny_pipeline_dir):
    from flowtrain.sample import generate, load_sampling_pipeline
    from flowtrain.testing.data import tiny_model

    model = tiny_model(tiny_pipeline_dir, max_sequence_length=16)
    pipe = load_sampling_pipeline(model, device="cpu")
    kw = dict(seed=5, steps=2, guidance_scale=2.0, height=32, width=32, output_type="np")
    prompts = ["a photo number 1", "a dog", "a red square"]
    one = generate(pipe, prompts, model, images_per_prompt=2, **kw)
    batched = generate(pipe, prompts, model, images_per_prompt=2, batch_size=4, **kw)  # chunks of 4 and 2
    assert len(one) == len(batched) == 6
    for a, b in zip(one, batched, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)
    assert not np.allclose(one[0], one[1])  # each (prompt, k) keeps its own seed
