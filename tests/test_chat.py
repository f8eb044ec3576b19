"""Chat templates (Hugging Face's, rendered in Jinja2's sandbox), generation_config.json, and
`bitcompile chat` in a terminal."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitcompile.runtime.chat import ChatError, ChatTemplate, generation_defaults
from bitcompile.tools.synth import BITNET_CHAT_TEMPLATE


def test_the_bitnet_template_renders_role_turns_and_the_generation_prompt():
    template = ChatTemplate(BITNET_CHAT_TEMPLATE, "<s>", "<|eot_id|>")
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert template.render(messages) == ("<s>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>"
                                         "User: Bye<|eot_id|>Assistant: ")
    assert template.render(messages[:2], add_generation_prompt=False) == "<s>System: Be brief.<|eot_id|>User: Hi<|eot_id|>"


@pytest.mark.parametrize("messages, message", [
    ([], "messages must be a non-empty list"),
    ("hi", "messages must be a non-empty list"),
    ([{"role": "user"}], r"messages\[0\].content must be a string"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\].role is 'tool'"),
])
def test_bad_messages_are_refused_by_name(messages, message):
    with pytest.raises(ChatError, match=message):
        ChatTemplate(BITNET_CHAT_TEMPLATE).render(messages)


def test_the_template_runs_sandboxed_and_can_refuse():
    with pytest.raises(ChatError, match="the chat template refused the messages: no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatError, match="failed on these messages"):  # the sandbox: no attribute games
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatError, match="does not parse"):
        ChatTemplate("{% for %}").render([{"role": "user", "content": "x"}])


def test_generation_config_gives_eos_ids_and_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7], "temperature": 0.6,
                                                                 "top_p": 0.9}))
    assert generation_defaults(tmp_path, 10) == ([3, 7], {"temperature": 0.6, "top_p": 0.9})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 12}))
    with pytest.raises(ChatError, match=r"eos_token_id must be a token id or a list of token ids in 0\.\.9, got 12"):
        generation_defaults(tmp_path, 10)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))
    assert generation_defaults(tmp_path, 10) == ([2], {"temperature": 0.0})


def test_the_artifact_carries_the_template_and_the_eos_ids(engine):
    assert engine.chat_template is not None and engine.chat_template.eos_token == "<|eot_id|>"
    assert engine.tokenizer.token_to_id("<|eot_id|>") in engine.eos_token_ids
    assert engine.generation_defaults == {"temperature": 0.6, "top_p": 0.9}


def test_chat_in_the_terminal_keeps_history_and_resets(engine, artifacts):
    def reply(messages):
        return engine.chat(messages, max_new_tokens=8, temperature=1.0, seed=3)

    first = reply([{"role": "user", "content": "hi"}])
    second = reply([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "and then"}])
    out = subprocess.run([sys.executable, "-m", "bitcompile.cli", "chat", str(artifacts["autobitlinear"]),
                          "--temperature", "1", "--seed", "3", "-n", "8"], input="hi\nand then\n/reset\nhi\n/exit\n",
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("> ")[1:5] == [first + "\n", second + "\n", "", first + "\n"]  # "" : /reset
    stats = [line for line in out.stderr.splitlines() if line.startswith("[")]
    prompts = [int(line[1:].split()[0]) for line in stats]
    reused = [int(line.split(", ")[1].split()[0]) for line in stats]
    assert prompts[1] > prompts[0] == prompts[2]  # the second turn carries the first; /reset starts over
    assert reused[1] > prompts[0] // 2 and reused[2] == prompts[0] - 1  # earlier turns come from the cache
