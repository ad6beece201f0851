"""The server on the real embedded SmolLM2 (marked `real`): routed chat through the openai client."""

import openai
import pytest
from support.serving import load_served, pick_domain_texts, running
from support.tiny import REAL_DOMAINS

from temporal_lora.server import create_app

pytestmark = pytest.mark.real


def test_real_model_chat_is_routed_and_streams_like_the_whole_answer(real_bundle):
    _, path = real_bundle
    tl = load_served(path)
    assert "im_start" in tl.tokenizer.chat_template  # the model's own template, not a test one
    texts = pick_domain_texts(tl)
    with running(create_app(tl)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["auto", *REAL_DOMAINS, "base"]
        for domain in REAL_DOMAINS:
            messages = [{"role": "user", "content": "Continue this text:\n" + texts[domain]}]
            kwargs = {"model": "auto", "messages": messages, "max_tokens": 8, "temperature": 0, "seed": 0}
            whole = client.chat.completions.create(**kwargs)
            assert whole.model_extra["routing"]["domain"] == domain
            assert whole.choices[0].message.content.strip()
            parts = list(client.chat.completions.create(stream=True, **kwargs))
            assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == \
                whole.choices[0].message.content
