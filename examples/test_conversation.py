"""A multi-turn conversation built from the server's own answers.

Each turn sends every conversation so far plus the model's last answer and a new
question, so its prefix is the previous turn's prompt: the offload tier must serve
it. ``kv_load.send`` measures one round like any other and gives each answer's text.
"""

import pytest

SYSTEM = "you are a careful assistant that answers briefly and cites the document " * 400


@pytest.mark.kvcache(backend="cpu", phase="multiturn")
def test_history_comes_from_the_tier(kv_load):
    conversations = [f"{SYSTEM} user {i} asks about topic {i} assistant" for i in range(8)]
    for turn in range(1, 4):
        answers = kv_load.send(conversations, output_len=16, concurrency=8, round_name=f"turn {turn}")
        assert answers.complete, answers.invalid_reason or [r.error for r in answers.records if r.error]
        if turn > 1:  # everything but the newest answer and question was sent before
            assert answers.telemetry["hit_ratio"] > 0.8, answers.telemetry
        conversations = [f"{c} {text} user asks a follow up question assistant"
                         for c, text in zip(conversations, answers.texts)]
