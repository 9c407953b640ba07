"""`kvloom generate` and `kvloom chat` as a user types them."""
import io

from kvloom import LLM, SamplingParams
from kvloom.cli import main


def test_generate_streams_the_greedy_text(tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    assert main(["generate", "The for statement", "--model", model, "--raw", "--max-tokens", "6",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    llm = LLM(model)
    want = llm.generate("The for statement", SamplingParams(temperature=0.0, max_tokens=6))[0].text
    assert printed == want + "\n"


def test_chat_keeps_the_conversation(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\nexit\n"))
    assert main(["chat", "--model", tiny_model_dir("llama"), "--max-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 2  # one streamed reply per message


def test_errors_exit_2_with_a_message(capsys):
    assert main(["generate", "hi", "--model", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
